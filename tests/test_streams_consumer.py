"""Consumer groups: every group sees every entry; consumers of a group share them; stale
entries of a silent consumer are claimed with their delivery count."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from workers.streams.consumer import START_NEW, GroupConsumer


async def test_two_groups_each_see_every_entry_and_one_group_shares(redis: aioredis.Redis) -> None:
    ids = [(await redis.xadd("s", {"data": f"m{n}"})).decode() for n in range(10)]
    a1 = GroupConsumer(redis, "s", "a", "a1", claim_after=60, batch=5, block=0.05)
    a2 = GroupConsumer(redis, "s", "a", "a2", claim_after=60, batch=5, block=0.05)
    b1 = GroupConsumer(redis, "s", "b", "b1", claim_after=60, batch=100, block=0.05)
    for consumer in (a1, a2, b1):
        await consumer.ensure_group()
    first, second = await a1.read(), await a2.read()
    assert {e.id for e in first}.isdisjoint({e.id for e in second})
    assert sorted(e.id for e in first + second) == ids
    assert [e.id for e in await b1.read()] == ids
    assert all(e.deliveries == 1 for e in first)


async def test_group_created_from_new_skips_history(redis: aioredis.Redis) -> None:
    await redis.xadd("s", {"data": "old"})
    consumer = GroupConsumer(redis, "s", "g", "c", claim_after=60, block=0.05)
    assert await consumer.ensure_group(START_NEW)
    assert not await consumer.ensure_group(START_NEW)  # second call finds the group
    await redis.xadd("s", {"data": "new"})
    assert [e.data for e in await consumer.read()] == [b"new"]


async def test_stale_entries_are_claimed_with_bumped_delivery_count(redis: aioredis.Redis) -> None:
    entry_id = (await redis.xadd("s", {"data": "x"})).decode()
    dead = GroupConsumer(redis, "s", "g", "dead", claim_after=0.2, block=0.05)
    await dead.ensure_group()
    assert [e.id for e in await dead.read()] == [entry_id]  # read, never acked: the worker died
    survivor = GroupConsumer(redis, "s", "g", "survivor", claim_after=0.2, block=0.05)
    assert await survivor.read() == []  # not idle long enough yet
    await asyncio.sleep(0.3)
    survivor._next_claim_at = 0  # the survivor's claim timer is due
    claimed = await survivor.read()
    assert [(e.id, e.data, e.deliveries) for e in claimed] == [(entry_id, b"x", 2)]
    assert await survivor.ack(entry_id) == 1


async def test_restarted_consumer_resumes_its_own_pending(redis: aioredis.Redis) -> None:
    entry_id = (await redis.xadd("s", {"data": "x"})).decode()
    before = GroupConsumer(redis, "s", "g", "pod-1", claim_after=60, block=0.05)
    await before.ensure_group()
    await before.read()
    after = GroupConsumer(redis, "s", "g", "pod-1", claim_after=60, block=0.05)
    assert [e.id for e in await after.read()] == [entry_id]


async def test_trimmed_pending_entry_is_reported_not_lost_silently(redis: aioredis.Redis) -> None:
    entry_id = (await redis.xadd("s", {"data": "x"})).decode()
    consumer = GroupConsumer(redis, "s", "g", "c", claim_after=0.1, block=0.05)
    await consumer.ensure_group()
    await consumer.read()
    await redis.xdel("s", entry_id)
    await asyncio.sleep(0.15)
    other = GroupConsumer(redis, "s", "g", "other", claim_after=0.1, block=0.05)
    claimed = await other.claim_stale()
    assert [(e.id, e.fields) for e in claimed] == [(entry_id, None)]
