"""Ingest over partitions passes over one that fails: while a shard is down or failing
over, the other partitions take the mail and senders still get 250.  A message whose append
failed with nothing stored goes to the next partition; one that may be stored is never sent
again (its sender gets the 451).  A real redis-server with three partitions; partition 1's
stream made unwritable by a key of the wrong type (every XADD to it refused)."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.ingest_util import ingest, send_one
from workers.streams import layout
from workers.streams.layout import StreamKeys

PARTITIONS = 3
KEYS = layout.partitions(StreamKeys(), PARTITIONS, tagged=True)


async def lengths(redis: aioredis.Redis) -> list[int]:
    return [await redis.xlen(k.receive) for k in KEYS]


async def test_a_failing_partition_is_passed_over_and_every_sender_gets_250(
    redis: aioredis.Redis, redis_url: str
) -> None:
    await redis.set(KEYS[1].receive, "not a stream")  # WRONGTYPE for every XADD
    async with ingest(redis_url, partitions=PARTITIONS) as server:
        codes = [(await send_one(server.port))[0] for _ in range(9)]
    assert codes == [250] * 9
    await redis.delete(KEYS[1].receive)
    assert sum(await lengths(redis)) == 9


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
