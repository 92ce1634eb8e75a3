"""Redis connections: one place that decides URLs, timeouts and reconnect back-off."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, overload

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.errors import Unavailable, mask_url_password
from workers.streams.cluster import ClusterTopology, is_cluster_url, parse_cluster_url
from workers.streams.layout import StreamKeys
from workers.streams.sentinel import is_sentinel_url, parse_sentinel_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Where `mailpool run` records the URL of the private redis-server it started, so that
# `mailpool send/listen/status` without --redis-url find the same pool.
EMBEDDED_URL_FILE = "redis.url"
# Commands that run once (status, send, dead) give up within seconds: a Redis that is down,
# or a port where something else listens (an HTTP server, a silent TCP service), must not
# keep an operator waiting through the nested connect and command retries of `connect`.
FIRST_REPLY_TIMEOUT = 3.0
ONE_SHOT_SOCKET_TIMEOUT = 5.0
# No retry: redis-py's Retry sends a command again after a lost reply, and `send` (an XADD)
# would then be enqueued twice.  A one-shot command fails with one line instead.
ONE_SHOT_RETRIES = 0
NOT_REDIS_HINT = "is a Redis server listening there?"


def data_dir() -> Path:
    return Path(os.environ.get("MAILPOOL_DATA_DIR", ".mailpool"))


def resolve_redis_url(url: str | None) -> str:
    """The explicit URL, else the running embedded server's, else the local default."""
    if url:
        return url
    recorded = data_dir() / EMBEDDED_URL_FILE
    if recorded.is_file():
        return recorded.read_text().strip()
    return DEFAULT_REDIS_URL


def client_for(
    url: str, *, key: str = "", topology: ClusterTopology | None = None, **options: Any
) -> aioredis.Redis:
    """A client of the Redis at ``url``; of the current master for a Sentinel URL
    (:mod:`workers.streams.sentinel`), whose connections follow it across failovers; of the
    primary serving ``key``'s slot for a cluster URL (:mod:`workers.streams.cluster`),
    sharing ``topology`` with the caller's other partitions."""
    if is_sentinel_url(url):
        return parse_sentinel_url(url).master_client(**options)
    if is_cluster_url(url):
        target = parse_cluster_url(url)
        return target.slot_client(topology or target.topology(), key, **options)
    return aioredis.Redis.from_url(url, **options)


def partition_clients(
    url: str, partitions: Sequence[StreamKeys], make: Callable[..., aioredis.Redis], **options: Any
) -> list[aioredis.Redis]:
    """One client per partition, made by ``make`` (:func:`connect`, :func:`connect_for_writes`):
    on a cluster each serves its partition's slot; elsewhere all partitions share one."""
    if not is_cluster_url(url):
        return [make(url, **options)] * len(partitions)
    topology = parse_cluster_url(url).topology()
    return [make(url, key=keys.send, topology=topology, **options) for keys in partitions]


async def close_all(clients: Sequence[aioredis.Redis]) -> None:
    """Close each distinct client once (partitions of a standalone Redis share one)."""
    for client in {id(c): c for c in clients}.values():
        await client.aclose()


def connect(
    url: str, *, retries: int = 3, socket_timeout: float = 5.0, **routing: Any
) -> aioredis.Redis:
    """A client that retries a dropped connection a few times with jittered back-off.

    Only for commands that may safely run twice (reads, and writes made idempotent by the
    caller): a retry sends the command, or a whole pipeline, again after a timeout or a
    dropped connection, and Redis may still run the first copy.  A write that must not run
    twice uses :func:`connect_for_writes`.  Long outages are ridden out by the roles' own
    loops, which reconnect with back-off.
    """
    return client_for(
        url,
        **routing,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=15,
        retry=Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def connect_for_writes(url: str, *, connect_timeout: float = 5.0, **routing: Any) -> aioredis.Redis:
    """A client for a write that must not run twice (ingest's XADD): no retries and no
    socket timeout.

    After a timeout, redis-py's ``Retry`` sends a pipeline again on a new connection, and
    Redis runs both copies: the first one waits in a socket buffer while Redis stalls, and
    runs when it resumes.  So the caller sets its own deadline on each write, sized to the
    bytes it sends (:class:`workers.streams.receive.ReceiveStream`), waits for the replies
    on the same connection, and decides itself what it may send again: only what never
    left.  ``connect_timeout`` bounds the TCP connect; the caller bounds the handshake.
    """
    return client_for(
        url,
        **routing,
        decode_responses=False,
        socket_timeout=None,
        socket_connect_timeout=connect_timeout,
        health_check_interval=0,  # the caller probes an idle connection before it writes
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
    )


class RedisUnavailable(Unavailable):
    """Redis at ``url`` could not be used; the message masks the URL's password."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"cannot use Redis at {mask_url_password(url)}: {problem}")


def describe_failure(exc: BaseException) -> str:
    """What went wrong talking to Redis, in words an operator can act on."""
    if isinstance(exc, InvalidResponse):
        return f"the reply is not Redis protocol ({exc}): {NOT_REDIS_HINT}"
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return f"{exc or 'timed out'} ({NOT_REDIS_HINT})"
    return str(exc) or type(exc).__name__


async def first_reply_problem(redis: aioredis.Redis) -> str | None:
    """None when Redis answers a PING within FIRST_REPLY_TIMEOUT, else what went wrong."""
    try:
        await asyncio.wait_for(redis.ping(), FIRST_REPLY_TIMEOUT)
    except TimeoutError:
        return f"no reply within {FIRST_REPLY_TIMEOUT:g} s ({NOT_REDIS_HINT})"
    except (RedisError, OSError) as exc:
        return describe_failure(exc)
    return None


@contextlib.asynccontextmanager
async def one_shot_client(url_option: str | None) -> AsyncIterator[aioredis.Redis]:
    """A client for a command that runs once and ends (status, send, dead).

    It checks that Redis answers before the command starts, and any Redis failure inside
    the block becomes :class:`RedisUnavailable` (one line naming the URL; the CLI exits
    with status 1) instead of a traceback or a wait of minutes.
    """
    async with one_shot_partitions(url_option, (StreamKeys(),)) as (client,):
        yield client


@contextlib.asynccontextmanager
async def one_shot_partitions(
    url_option: str | None, partitions: Sequence[StreamKeys]
) -> AsyncIterator[list[aioredis.Redis]]:
    """:func:`one_shot_client` for each partition (one client shared off a cluster)."""
    url = resolve_redis_url(url_option)
    clients = partition_clients(
        url, partitions, connect, retries=ONE_SHOT_RETRIES, socket_timeout=ONE_SHOT_SOCKET_TIMEOUT
    )
    try:
        for client in {id(c): c for c in clients}.values():
            problem = await first_reply_problem(client)
            if problem is not None:
                raise RedisUnavailable(url, problem)
        yield clients
    except BrokenPipeError:
        raise  # the command's own output went to a reader that left (``| head``), not Redis
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(url, describe_failure(exc)) from exc
    finally:
        await close_all(clients)


@overload
def as_text(value: bytes | str) -> str: ...
@overload
def as_text(value: bytes | str | None) -> str | None: ...
def as_text(value: bytes | str | None) -> str | None:
    """A Redis reply value (bytes: clients run without decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else value
