"""Ingest over partitions: received mail goes out a batch per partition in turn (batches as
large as with one stream), and a partition whose store failed is passed over for a second,
so while a shard is down or failing over the others take the mail.  A batch that could not
be sent at all goes to the next partition; a message that may be stored is never sent again
(its sender gets the 451).  A real redis-server, partitions of it made to fail: a key of the
wrong type (every XADD refused), a client of a port where nothing listens."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from tests.harness import free_port, silent_redis
from tests.ingest_util import ingest, send_one
from workers.streams import layout
from workers.streams.connection import connect_for_writes
from workers.streams.layout import StreamKeys
from workers.streams.receive import ReceiveStream

PARTITIONS = 3
KEYS = layout.partitions(StreamKeys(), PARTITIONS, tagged=True)


def partition_1_at(good: aioredis.Redis, other: aioredis.Redis) -> ReceiveStream:
    """Partitions 0 and 2 written through ``good``, partition 1 through ``other``."""
    return ReceiveStream(
        good, KEYS[0].receive,
        more_partitions=[(other, KEYS[1].receive), (good, KEYS[2].receive)],
    )  # fmt: skip


async def lengths(redis: aioredis.Redis) -> list[int]:
    return [await redis.xlen(k.receive) for k in KEYS]


async def test_a_batch_goes_to_one_partition_and_the_next_batch_to_the_next(
    redis: aioredis.Redis, redis_url: str
) -> None:
    client = connect_for_writes(redis_url)
    stream = ReceiveStream(
        client, KEYS[0].receive, max_in_flight=1,
        more_partitions=[(client, k.receive) for k in KEYS[1:]],
    )  # fmt: skip
    try:
        # Queued before the writer runs: each gather is one batch.
        for _ in range(2):
            await asyncio.gather(*(stream.append(b"m%d" % n) for n in range(30)))
    finally:
        await client.aclose()
    assert await lengths(redis) == [30, 30, 0]


async def test_a_partition_that_cannot_be_reached_is_passed_over_and_nothing_is_lost(
    redis: aioredis.Redis, redis_url: str
) -> None:
    good = connect_for_writes(redis_url)
    nowhere = connect_for_writes(f"redis://127.0.0.1:{free_port()}/0")
    stream = partition_1_at(good, nowhere)
    try:
        for n in range(9):
            await stream.append(b"m%d" % n)
    finally:
        await good.aclose()
        await nowhere.aclose()
    stored = [f[b"data"] for k in KEYS for _, f in await redis.xrange(k.receive)]
    assert sorted(stored) == sorted(b"m%d" % n for n in range(9))
    assert await redis.xlen(KEYS[1].receive) == 0


async def test_a_partition_that_hangs_holds_one_writer_and_the_others_go_on(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A primary that accepts connections and never answers (stalled, or cut off): a writer
    waits on it for CONNECT_TIMEOUT (5 s); the others write the other partitions meanwhile.
    Before, every writer took its turn there and the healthy partitions stalled with it."""
    async with silent_redis() as silent_url:
        good = connect_for_writes(redis_url)
        hangs = connect_for_writes(silent_url)
        stream = partition_1_at(good, hangs)

        async def sender(n: int) -> None:
            for m in range(10):
                await stream.append(b"s%d-%d" % (n, m))

        started = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(asyncio.gather(*(sender(n) for n in range(4))), 4.0)
        finally:
            elapsed = asyncio.get_running_loop().time() - started
            await good.aclose()
            await hangs.aclose()
    assert elapsed < 4.0  # all 40 stored well before the hung connect's 5 s ran out
    assert await redis.xlen(KEYS[0].receive) + await redis.xlen(KEYS[2].receive) == 40


async def test_a_partition_refusing_writes_is_passed_over_after_one_batch(
    redis: aioredis.Redis, redis_url: str
) -> None:
    await redis.set(KEYS[1].receive, "not a stream")  # WRONGTYPE for every XADD
    async with ingest(redis_url, partitions=PARTITIONS) as server:
        codes = [(await send_one(server.port))[0] for _ in range(9)]
    assert sorted(codes) == [250] * 8 + [451]  # the message of the batch that found out
    await redis.delete(KEYS[1].receive)
    assert sum(await lengths(redis)) == 8


async def test_a_message_that_may_be_stored_is_not_sent_to_another_partition(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """WAIT for a replica this Redis does not have: the entry is written, not replicated."""
    async with ingest(
        redis_url, partitions=PARTITIONS, min_replicas=1, replica_timeout=0.05
    ) as server:
        code, _ = await send_one(server.port)
    assert code == 451
    assert sorted(await lengths(redis)) == [0, 0, 1]
