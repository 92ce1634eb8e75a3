"""Redis connections: one place that decides URLs, timeouts and reconnect back-off."""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Where `mailpool run` records the URL of the private redis-server it started, so that
# `mailpool send/listen/status` without --redis-url find the same pool.
EMBEDDED_URL_FILE = "redis.url"


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


def connect(url: str, *, retries: int = 3, socket_timeout: float = 5.0) -> aioredis.Redis:
    """A client that retries a dropped connection a few times with jittered back-off.

    Retries stay short: a role that must answer a client (ingest) prefers a quick failure
    (451, try later) to holding the SMTP session while Redis is away.  Long outages are
    ridden out by the roles' own loops, which reconnect with back-off.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=15,
        retry=Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


@overload
def as_text(value: bytes | str) -> str: ...
@overload
def as_text(value: bytes | str | None) -> str | None: ...
def as_text(value: bytes | str | None) -> str | None:
    """A Redis reply value (bytes: clients run without decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else value
