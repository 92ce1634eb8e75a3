"""Entries pending on a delivery worker's consumer that the worker never saw: a read whose
reply was lost (Redis runs a timed-out read when it resumes from a stall, on a connection
the worker has already dropped) hands them out.  They are sent within seconds, not after
``--claim-after``; looking for them costs one XPENDING and bumps no delivery counter."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from tests.delivery_util import make_config, pack, running_worker, send_message, settled
from tests.harness import wait_until
from tests.sinks import RecordingSink
from workers.streams.consumer import GroupConsumer


async def lost_read(redis: aioredis.Redis, consumer: str, count: int) -> list[str]:
    """Enqueue ``count`` sends and, in the same MULTI, read them for ``consumer`` on the
    test's connection: pending on that consumer, and its worker never gets the reply."""
    pipe = redis.pipeline(transaction=True)
    for n in range(count):
        pipe.xadd("email.send", {"data": pack(send_message([f"lost{n}@example.com"]))})
    pipe.xreadgroup("delivery", consumer, {"email.send": ">"}, count=count)
    *ids, _ = await pipe.execute()
    return [entry_id.decode() for entry_id in ids]


async def test_entries_of_a_lost_read_are_sent_within_seconds(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    async with running_worker(make_config(redis_url, sink.url, claim_after=900.0)):
        await wait_until(lambda: group_exists(redis))
        started = time.monotonic()
        await lost_read(redis, "w1", 3)
        await wait_until(lambda: settled(redis), timeout=5)
        took = time.monotonic() - started
    assert sorted(rcpt for r in sink.received for rcpt in r.rcpt_tos) == [
        f"lost{n}@example.com" for n in range(3)
    ]
    assert took < 3.0  # one look at the pending list per second, not --claim-after


async def test_only_unseen_entries_are_read_and_only_they_count_a_delivery(
    redis: aioredis.Redis,
) -> None:
    consumer = GroupConsumer(redis, "email.send", "delivery", "w1", claim_after=900)
    await consumer.ensure_group()
    ids = [(await redis.xadd("email.send", {"data": f"m{n}"})).decode() for n in range(5)]
    assert [e.id for e in await consumer.read_new()] == ids
    in_hand = {ids[0], ids[2], ids[4]}

    unseen = await consumer.read_unseen_own(in_hand, limit=10)
    assert [(e.id, e.data, e.deliveries) for e in unseen] == [
        (ids[1], b"m1", 2),
        (ids[3], b"m3", 2),
    ]
    # Re-read: the unseen ones and, lying between them, ids[2]; not ids[0] or ids[4].
    assert await delivery_counts(redis) == dict(zip(ids, [1, 2, 2, 2, 1], strict=True))

    in_hand.update(ids)  # all in hand now: the look is one XPENDING, nothing is read
    assert await consumer.read_unseen_own(in_hand, limit=10) == []
    assert await delivery_counts(redis) == dict(zip(ids, [1, 2, 2, 2, 1], strict=True))

    first_two = await consumer.read_unseen_own(set(), limit=2)  # a restarted consumer
    assert [e.id for e in first_two] == ids[:2]


async def group_exists(redis: aioredis.Redis) -> bool:
    return bool(await redis.exists("email.send"))  # the worker creates it with the stream


async def delivery_counts(redis: aioredis.Redis) -> dict[str, int]:
    rows = await redis.xpending_range("email.send", "delivery", min="-", max="+", count=100)
    return {row["message_id"].decode(): int(row["times_delivered"]) for row in rows}
