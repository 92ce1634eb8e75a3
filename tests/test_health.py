"""/healthz answers while the loop turns (even with Redis gone); /readyz follows Redis and
the listener; /metrics exposes the stream gauges."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

import redis.asyncio as aioredis

from tests.harness import RedisServer, free_port, wait_until
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
        assert (await asyncio.to_thread(_get, http.port, "/metrics"))[0] == 200
        # The gauges come from a refresh in the background: on a busy machine, after the
        # first /metrics (CI's lowest-versions run once read it before).
        await wait_until(lambda: _stream_length_shown(http.port), "the stream gauge", timeout=10)

        listening = False
        assert (await asyncio.to_thread(_get, http.port, "/readyz"))[0] == 503
        listening = True
        server.stop(kill=True)
        assert (await asyncio.to_thread(_get, http.port, "/readyz"))[0] == 503
        assert await asyncio.to_thread(_get, http.port, "/healthz") == (200, "ok\n")
        assert (await asyncio.to_thread(_get, http.port, "/nope"))[0] == 404
    await redis.aclose()


async def _stream_length_shown(port: int, length: int = 1) -> bool:
    status, metrics = await asyncio.to_thread(_get, port, "/metrics")
    return status == 200 and f'mailpool_stream_length{{stream="email.send"}} {length}.0' in metrics


async def test_gauges_come_soon_once_redis_answers(make_redis: Callable[..., RedisServer]) -> None:
    """A refresh that failed (Redis not up yet) is tried again within a second or two, not
    after the 15 s between refreshes: /metrics would lack the gauges all that time."""
    server = make_redis()
    server.stop()
    redis = connect(server.url, retries=0, socket_timeout=0.5)
    async with serving_health(
        "127.0.0.1:0", redis, StreamKeys(), lambda: True, stream_gauges=True
    ) as http:
        assert http is not None
        await asyncio.sleep(0.3)  # the first refresh fails
        server.start()  # on the same port
        for _ in range(3):  # a length no other test of this process shows (gauges are global)
            await redis.xadd("email.send", {"data": b"x"})
        shown = lambda: _stream_length_shown(http.port, 3)  # noqa: E731
        await wait_until(shown, "the stream gauge", timeout=5)
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
