"""Group commit waits a moment for company: a settlement round trip waits up to
--settle-linger after its first settlement for a quarter of --concurrency of them, so a
worker whose sends finish apart (a partition of a cluster sees only its share of them)
still pays Redis one round trip per several messages.  It never waits at the stop.  A real
redis-server; the settlements are real settle calls on entries read in the group."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import outcomes_for
from workers.config import ConfigError, DeliveryConfig, add_arguments, from_arguments
from workers.delivery import Settler
from workers.delivery.worker import settle_fill
from workers.streams.outcomes import Outcomes, Settlement


class CountedOutcomes(Outcomes):
    """Outcomes that count their settlement round trips (a first one also loads the
    functions library and runs again: counted once)."""

    round_trips: list[int]

    async def settle(
        self, settlements: Sequence[Settlement], now: float
    ) -> list[bool | aioredis.RedisError]:
        self.round_trips.append(len(settlements))
        return await super().settle(settlements, now)


async def read_entries(redis: aioredis.Redis, count: int) -> list[str]:
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    for n in range(count):
        await redis.xadd("email.send", {"data": b"x", "n": n})
    read = await redis.xreadgroup("delivery", "w1", {"email.send": ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in read[0][1]]


def counted(redis: aioredis.Redis) -> CountedOutcomes:
    plain = outcomes_for(redis)
    outcomes = CountedOutcomes(plain.redis, plain.keys, group=plain.group,
                               sent_ttl=60, events_maxlen=1000)  # fmt: skip
    outcomes.round_trips = []
    return outcomes


async def test_settlements_finishing_apart_share_one_round_trip(redis: aioredis.Redis) -> None:
    entry_ids = await read_entries(redis, 4)
    outcomes = counted(redis)
    applied: list[str] = []
    settler = Settler(outcomes, lambda: None, fill=4, linger=1.0)
    settler.start()
    try:
        for n, entry_id in enumerate(entry_ids):
            settlement = Settlement(entry_id=entry_id, message_id=f"m{n}", accepted=[f"u{n}@x"])
            settler.submit(settlement, lambda s: applied.append(s.entry_id))
            await asyncio.sleep(0.02)  # sends finishing apart
        while len(applied) < 4:
            await asyncio.sleep(0.01)
    finally:
        await settler.close(5.0)
        await outcomes.aclose()
    assert outcomes.round_trips == [4]
    assert sorted(applied) == sorted(entry_ids)
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0


async def test_a_lone_settlement_waits_no_longer_than_the_linger(redis: aioredis.Redis) -> None:
    [entry_id] = await read_entries(redis, 1)
    outcomes = counted(redis)
    applied: list[float] = []
    settler = Settler(outcomes, lambda: None, fill=4, linger=0.2)
    settler.start()
    try:
        submitted = time.monotonic()
        settler.submit(Settlement(entry_id=entry_id, message_id="m"), lambda s: applied.append(
            time.monotonic() - submitted))  # fmt: skip
        while not applied:
            await asyncio.sleep(0.01)
    finally:
        await settler.close(5.0)
        await outcomes.aclose()
    assert 0.2 <= applied[0] < 2.0
    assert outcomes.round_trips == [1]


async def test_the_stop_flushes_without_waiting_for_the_linger(redis: aioredis.Redis) -> None:
    [entry_id] = await read_entries(redis, 1)
    outcomes = counted(redis)
    settler = Settler(outcomes, lambda: None, fill=4, linger=1.0)
    settler.start()
    settler.submit(Settlement(entry_id=entry_id, message_id="m"), lambda s: None)
    await asyncio.sleep(0)
    began = time.monotonic()
    await settler.close(5.0)
    took = time.monotonic() - began
    await outcomes.aclose()
    assert outcomes.round_trips == [1]
    assert took < 0.5  # well under the linger of a second
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0


def test_a_round_trip_waits_for_a_quarter_of_the_lanes() -> None:
    assert [settle_fill(c) for c in (1, 3, 4, 10, 60)] == [1, 1, 1, 2, 15]


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_settle_linger_out_of_range_names_the_option(value: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DeliveryConfig)
    args = parser.parse_args(["--relay", "maildir:/tmp/m", "--settle-linger", value])
    with pytest.raises(ConfigError, match="--settle-linger"):
        from_arguments(DeliveryConfig, args, {})
