"""``mailpool redis-setup``: load the Redis functions library that the roles call.

Run it once per Redis, and again after an upgrade that brings a new library version, as a
Redis user allowed ``FUNCTION LOAD`` (the ``setup`` user of ``deploy/redis/users.acl``; the
roles' own users may only ``FCALL``).  Loading is idempotent.  Redis keeps functions in its
RDB and AOF and sends them to replicas, so a restart or a failover keeps them.  Workers whose
Redis user may load functions (the embedded Redis of ``mailpool run``, a Redis without
ACLs) load the library themselves at start.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from workers.config import CommonConfig, ConfigError
from workers.streams import functions
from workers.streams.connection import as_text, one_shot_client


@dataclass
class RedisSetupConfig(CommonConfig):
    """``mailpool redis-setup``: the Redis options only."""


def _library_names(reply: Any) -> list[str]:
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
    return sorted(name for name in _library_names(reply) if name != functions.LIBRARY)


async def main(config: RedisSetupConfig) -> int:
    async with one_shot_client(config.redis_url) as redis:
        try:
            loaded = await functions.ensure_library(redis)
        except functions.FunctionsNotLoaded:
            raise ConfigError(
                f"this Redis user may not load {functions.LIBRARY} (FUNCTION LOAD): "
                "run redis-setup as an admin user (the `setup` user of deploy/redis/users.acl)"
            ) from None
        state = "loaded" if loaded else "already loaded"
        print(f"{functions.LIBRARY} {state} (digest {functions.DIGEST})")
        for name in await other_libraries(redis):
            print(f"{name} is loaded too (another release's): once no worker of that release "
                  f"runs, remove it with FUNCTION DELETE {name}", file=sys.stderr)  # fmt: skip
    return 0
