"""Retention: streams are trimmed by age and length, never past an entry a consumer group
has not acknowledged; vanished consumers with nothing pending are removed."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from workers.housekeeping import protected_from, remove_vanished_consumers, trim_stream


async def _fill(redis: aioredis.Redis, stream: str, count: int) -> list[str]:
    return [(await redis.xadd(stream, {"data": f"m{n}"})).decode() for n in range(count)]


async def test_trim_by_length_without_groups(redis: aioredis.Redis) -> None:
    ids = await _fill(redis, "s", 10)
    assert await trim_stream(redis, "s", max_age=3600, max_len=4) == 6
    assert [e[0].decode() for e in await redis.xrange("s")] == ids[6:]


async def test_trim_by_age_without_groups(redis: aioredis.Redis) -> None:
    await _fill(redis, "s", 3)
    await asyncio.sleep(0.05)
    assert await trim_stream(redis, "s", max_age=0.001, max_len=1000) == 3


async def test_pending_and_undelivered_entries_are_never_trimmed(redis: aioredis.Redis) -> None:
    ids = await _fill(redis, "s", 10)
    await redis.xgroup_create("s", "fast", id="0")
    await redis.xgroup_create("s", "slow", id="0")
    await redis.xreadgroup("fast", "f", {"s": ">"}, count=10)
    await redis.xack("s", "fast", *ids)
    await redis.xreadgroup("slow", "s1", {"s": ">"}, count=5)  # 0-4 pending, 5-9 undelivered
    await redis.xack("s", "slow", *ids[:3])  # 3 and 4 stay pending

    assert await protected_from(redis, "s") == ids[3]
    await trim_stream(redis, "s", max_age=0.0001, max_len=1)
    assert [e[0].decode() for e in await redis.xrange("s")] == ids[3:]


async def test_undelivered_entries_protect_a_group_with_nothing_pending(
    redis: aioredis.Redis,
) -> None:
    ids = await _fill(redis, "s", 6)
    await redis.xgroup_create("s", "g", id=ids[1])  # has "delivered" up to ids[1]
    await trim_stream(redis, "s", max_age=0.0001, max_len=1)
    assert [e[0].decode() for e in await redis.xrange("s")] == ids[2:]


async def test_vanished_consumers_with_nothing_pending_are_removed(redis: aioredis.Redis) -> None:
    ids = await _fill(redis, "s", 2)
    await redis.xgroup_create("s", "g", id="0")
    await redis.xreadgroup("g", "busy", {"s": ">"}, count=1)
    await redis.xreadgroup("g", "done", {"s": ">"}, count=1)
    await redis.xack("s", "g", ids[1])
    await asyncio.sleep(0.05)
    assert await remove_vanished_consumers(redis, "s", idle=0.01) == 1
    names = [c["name"] for c in await redis.xinfo_consumers("s", "g")]
    assert names == [b"busy"]


async def test_a_send_stream_no_group_reads_yet_is_not_trimmed(redis: aioredis.Redis) -> None:
    """Sends queued before the first delivery worker started wait for it (its group starts
    at id 0): neither length nor age may remove them."""
    from workers.housekeeping import HousekeepConfig, housekeep_once
    from workers.streams.layout import StreamKeys

    keys = StreamKeys()
    ids = await _fill(redis, keys.send, 20)
    await asyncio.sleep(0.05)
    config = HousekeepConfig(send_max_len=5, send_max_age=0.001)
    await housekeep_once(redis, keys, config)
    assert [e[0].decode() for e in await redis.xrange(keys.send)] == ids

    await redis.xgroup_create(keys.send, "delivery", id="0")  # the first worker
    await redis.xreadgroup("delivery", "w1", {keys.send: ">"}, count=20)
    await redis.xack(keys.send, "delivery", *ids[:18])
    await housekeep_once(redis, keys, config)
    assert [e[0].decode() for e in await redis.xrange(keys.send)] == ids[18:]


class _ReadsDuringTheCheck:
    """A client whose consumer ``reader`` reads an entry right after housekeeping listed
    the consumers (idle, nothing pending): the moment between XINFO and the removal."""

    def __init__(self, redis: aioredis.Redis, reader: str) -> None:
        self._redis, self._reader = redis, reader

    def __getattr__(self, name: str) -> object:
        return getattr(self._redis, name)

    async def xinfo_consumers(self, stream: str, group: str) -> list[dict[str, object]]:
        listed: list[dict[str, object]] = await self._redis.xinfo_consumers(stream, group)
        await self._redis.xreadgroup(group, self._reader, {stream: ">"}, count=1)
        return listed


async def test_a_consumer_that_reads_while_listed_idle_keeps_its_entry(
    redis: aioredis.Redis,
) -> None:
    """The removal checks nothing is pending in the same step as it removes: a bare XGROUP
    DELCONSUMER after the listing would drop the entry just read from the group for good
    (nobody could claim it: no consumer holds it, and the group has read past it)."""
    ids = await _fill(redis, "s", 1)
    await redis.xgroup_create("s", "g", id="$")
    await redis.xgroup_createconsumer("s", "g", "stalled")  # exists, nothing pending
    await redis.xadd("s", {"data": "late"})
    await asyncio.sleep(0.05)
    racing = _ReadsDuringTheCheck(redis, "stalled")
    assert await remove_vanished_consumers(racing, "s", idle=0.01) == 0  # type: ignore[arg-type]
    pending = await redis.xpending("s", "g")
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"stalled", ids
