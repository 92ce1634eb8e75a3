"""``mailpool redis-setup``: load the Redis functions library that the roles call.

Run it once per Redis, and again after an upgrade that brings a new library version, as a
Redis user allowed ``FUNCTION LOAD`` (the ``setup`` user of ``deploy/redis/users.acl``; the
roles' own users may only ``FCALL``).  Loading is idempotent.  Redis keeps functions in its
RDB and AOF and sends them to replicas, so a restart or a failover keeps them.  Workers whose
Redis user may load functions (the embedded Redis of ``mailpool run``, a Redis without
ACLs) load the library themselves at start.

On a Redis Cluster (``redis+cluster://``) functions are per node: a primary passes them to
its own replicas only, never to another shard.  So the library is loaded on every primary
the cluster lists (``CLUSTER SHARDS``, primaries with or without slots); the replicas get it
from theirs.  A primary added later (``redis-cli --cluster add-node``, then slots moved to
it) has no library until redis-setup runs again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from workers.config import CommonConfig, ConfigError
from workers.streams import functions
from workers.streams.cluster import is_cluster_url, parse_cluster_url
from workers.streams.connection import (
    ONE_SHOT_SOCKET_TIMEOUT,
    RedisUnavailable,
    as_text,
    describe_failure,
    one_shot_client,
)


@dataclass
class RedisSetupConfig(CommonConfig):
    """``mailpool redis-setup``: the Redis options only."""


def library_names(reply: Any) -> list[str]:
    """Library names of a ``FUNCTION LIST`` reply (RESP2 flat lists or RESP3 maps)."""
    names = []
    for library in reply or []:
        if isinstance(library, dict):
            name = library.get(b"library_name", library.get("library_name"))
        else:
            name = dict(zip(library[::2], library[1::2], strict=True)).get(b"library_name")
        if name is not None:
            names.append(as_text(name))
    return names


async def other_libraries(redis: aioredis.Redis) -> list[str]:
    """Other releases' mailpool libraries still loaded (empty when this user may not list)."""
    try:
        reply = await redis.function_list(library=f"{functions.LIBRARY_PREFIX}*")
    except NoPermissionError:
        return []
    return sorted(name for name in library_names(reply) if name != functions.LIBRARY)


async def main(config: RedisSetupConfig) -> int:
    if config.redis_url and is_cluster_url(config.redis_url):
        return await _setup_cluster(config.redis_url)
    async with one_shot_client(config.redis_url) as redis:
        await _setup_node(redis)
    return 0


async def _setup_cluster(url: str) -> int:
    """The library on every primary of the cluster, one line per primary."""
    target = parse_cluster_url(url)
    try:
        primaries = await target.topology().primaries()
        for host, port in primaries:
            node = target.node_client(host, port, socket_timeout=ONE_SHOT_SOCKET_TIMEOUT)
            try:
                await _setup_node(node, where=f" on {host}:{port}")
            finally:
                await node.aclose()
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(url, describe_failure(exc)) from exc
    print(f"{len(primaries)} primaries ready; their replicas copy the library from them "
          "(run redis-setup again after adding a primary)", file=sys.stderr)  # fmt: skip
    return 0


async def _setup_node(redis: aioredis.Redis, where: str = "") -> None:
    """Load this build's library on one Redis (``where`` names the node of a cluster)."""
    try:
        loaded = await functions.ensure_library(redis)
    except functions.FunctionsNotLoaded:
        raise ConfigError(
            f"this Redis user may not load {functions.LIBRARY} (FUNCTION LOAD){where}: "
            "run redis-setup as an admin user (the `setup` user of deploy/redis/users.acl)"
        ) from None
    state = "loaded" if loaded else "already loaded"
    print(f"{functions.LIBRARY} {state}{where} (digest {functions.DIGEST})")
    for name in await other_libraries(redis):
        print(f"{name} is loaded too{where} (another release's): once no worker of that "
              f"release runs, remove it with FUNCTION DELETE {name}", file=sys.stderr)  # fmt: skip
