"""500 concurrent SMTP connections, each delivering one message, in bounded time; and fan-out of
the resulting entries: two consumer groups each see every message, two consumers of one group
share them."""

from __future__ import annotations

import asyncio
import time

import msgpack
import redis.asyncio as aioredis

from tests.ingest_util import SMTPConn, entries, ingest, message

CONNECTIONS = 500


async def _deliver(port: int, number: int, start: asyncio.Event) -> int:
    conn = await SMTPConn.open(port)
    try:
        await start.wait()  # every connection is open before any sends
        await conn.ehlo()
        code, _ = await conn.transaction(message(f"concurrent {number}"))
        return code
    finally:
        await conn.close()


async def test_500_concurrent_connections(redis_url: str, redis: aioredis.Redis) -> None:
    # All from 127.0.0.1: the per-client cap is the whole cap here.
    async with ingest(
        redis_url, max_connections=CONNECTIONS, max_connections_per_ip=CONNECTIONS
    ) as server:
        start = asyncio.Event()
        started = time.monotonic()
        tasks = [asyncio.create_task(_deliver(server.port, n, start)) for n in range(CONNECTIONS)]
        while len(server.registry.sessions) < CONNECTIONS and time.monotonic() - started < 20:
            await asyncio.sleep(0.05)
        assert len(server.registry.sessions) == CONNECTIONS
        start.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks), 40)
        elapsed = time.monotonic() - started
    assert codes == [250] * CONNECTIONS
    subjects = {m["headers"]["subject"] for _, m in await entries(redis)}
    assert subjects == {f"concurrent {n}" for n in range(CONNECTIONS)}
    assert elapsed < 40


async def _read_group(
    redis: aioredis.Redis, group: str, consumer: str, count: int = 10
) -> list[str]:
    reply = await redis.xreadgroup(group, consumer, {"email.receive": ">"}, count=count)
    subjects = []
    for _stream, items in reply:
        for entry_id, fields in items:
            subjects.append(msgpack.unpackb(fields[b"data"], raw=False)["headers"]["subject"])
            await redis.xack("email.receive", group, entry_id)
    return subjects


async def test_fan_out_to_two_groups_and_sharing_within_a_group(
    redis_url: str, redis: aioredis.Redis
) -> None:
    for group in ("billing", "archive"):
        await redis.xgroup_create("email.receive", group, id="$", mkstream=True)
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        for number in range(6):
            assert (await conn.transaction(message(f"fan {number}")))[0] == 250
        await conn.close()
    every = {f"fan {n}" for n in range(6)}
    assert set(await _read_group(redis, "archive", "a1", count=100)) == every
    first = await _read_group(redis, "billing", "b1", count=3)
    second = await _read_group(redis, "billing", "b2", count=100)
    assert len(first) == 3 and len(second) == 3
    assert set(first) | set(second) == every
    assert not set(first) & set(second)


async def test_receive_stream_batches_every_append_exactly_once(
    redis: aioredis.Redis,
) -> None:
    """Small batches and few pipelines in flight: every append gets its own entry id back."""
    from workers.streams.receive import ReceiveStream

    stream = ReceiveStream(redis, "email.receive", max_batch=3, max_in_flight=2)

    async def append_later(number: int) -> str:
        await asyncio.sleep((number % 7) / 1000)
        return await stream.append(msgpack.packb({"n": number}))

    ids = await asyncio.gather(*(append_later(n) for n in range(200)))
    assert len(set(ids)) == 200
    stored = {entry_id.decode(): msgpack.unpackb(fields[b"data"])["n"]
              for entry_id, fields in await redis.xrange("email.receive")}  # fmt: skip
    assert sorted(stored.values()) == list(range(200))
    assert set(stored) == set(ids)
