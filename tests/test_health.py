"""/healthz answers while the loop turns (even with Redis gone); /readyz follows Redis and
the listener; /metrics exposes the stream gauges."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

import redis.asyncio as aioredis

from tests.harness import RedisServer, free_port
from workers.health import redis_ready, serving_health
from workers.streams.connection import connect
from workers.streams.layout import StreamKeys


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_probes_follow_redis_and_listener(make_redis: Callable[..., RedisServer]) -> None:
    server = make_redis()
    redis = connect(server.url, retries=0, socket_timeout=0.5)
    listening = True
    await redis.xadd("email.send", {"data": b"x"})
    async with serving_health(
        "127.0.0.1:0", redis, StreamKeys(), lambda: listening, stream_gauges=True
    ) as http:
        assert http is not None
        assert await asyncio.to_thread(_get, http.port, "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(_get, http.port, "/readyz") == (200, "ready\n")
        status, metrics = await asyncio.to_thread(_get, http.port, "/metrics")
        assert status == 200
        assert 'mailpool_stream_length{stream="email.send"} 1.0' in metrics

        listening = False
        assert (await asyncio.to_thread(_get, http.port, "/readyz"))[0] == 503
        listening = True
        server.stop(kill=True)
        assert (await asyncio.to_thread(_get, http.port, "/readyz"))[0] == 503
        assert await asyncio.to_thread(_get, http.port, "/healthz") == (200, "ok\n")
        assert (await asyncio.to_thread(_get, http.port, "/nope"))[0] == 404
    await redis.aclose()


async def test_no_address_serves_nothing(redis: aioredis.Redis) -> None:
    async with serving_health(None, redis, StreamKeys(), lambda: True) as http:
        assert http is None


async def test_ready_while_any_partitions_redis_answers(redis_url: str) -> None:
    """Partitioned, /readyz pings every partition's client: one shard failing over (here a
    port where nothing listens) does not take every ingest pod out of its Service."""
    good = connect(redis_url)
    gone = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        assert await redis_ready([gone, good], lambda: True)() is True
        assert await redis_ready([gone], lambda: True)() is False
        assert await redis_ready([good], lambda: False)() is False  # not listening
    finally:
        await good.aclose()
        await gone.aclose()
