"""Group commit waits a moment for more outcomes only while sends are in progress.

A settlement that comes while other sends are still under way waits the settler's linger
for theirs, so that they share one round trip (one transaction) and Redis handles fewer,
larger batches.  A worker with nothing else in progress records an outcome at once: an idle
worker's single message is not held back.  Real redis-server; the linger is made long here
so that what joins a batch does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

import workers.streams.outcomes as oc
from tests.delivery_util import enqueue, outcomes_for, send_message
from tests.harness import wait_until
from workers.delivery.settler import Settler
from workers.relay import Reply
from workers.streams import functions, layout

LINGER = 1.0  # seconds: far longer than a round trip on any machine
APART = 0.1  # seconds between the two outcomes: far shorter than LINGER


async def read_two(redis: aioredis.Redis) -> list[str]:
    await functions.ensure_library(redis)
    for n in range(2):
        await enqueue(redis, send_message(message_id=f"m{n}"))
    await redis.xgroup_create("email.send", "delivery", id="0")
    read = await redis.xreadgroup("delivery", "w1", {"email.send": ">"})
    return [entry_id.decode() for entry_id, _ in read[0][1]]


def delivered(entry_id: str, message_id: str) -> oc.Settlement:
    ref = layout.MessageRef(message_id, entry_id, b"")
    event = layout.event("delivered", ref, ["ann@example.com"], Reply(250, "ok"), 1.0)
    return oc.Settlement(
        entry_id=entry_id, message_id=message_id, accepted=["ann@example.com"], events=[event]
    )


async def transactions(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


async def settle_two_apart(redis: aioredis.Redis, *, busy: bool) -> tuple[int, list[str]]:
    """Two outcomes APART seconds apart: the transactions they took, and which of them had
    been applied when the second came."""
    first, second = await read_two(redis)
    settled: list[str] = []
    settler = Settler(outcomes_for(redis), on_crash=lambda: None, busy=lambda: busy, linger=LINGER)
    settler.start()
    before = await transactions(redis)
    settler.submit(delivered(first, "m0"), lambda s: settled.append(s.entry_id))
    await asyncio.sleep(APART)
    applied_then = list(settled)
    settler.submit(delivered(second, "m1"), lambda s: settled.append(s.entry_id))
    await wait_until(lambda: len(settled) == 2, timeout=5 * LINGER)
    await settler.close(5.0)
    return await transactions(redis) - before, applied_then


async def test_outcomes_that_come_while_sends_are_in_progress_share_a_round_trip(
    redis: aioredis.Redis,
) -> None:
    taken, applied_then = await settle_two_apart(redis, busy=True)
    assert applied_then == []  # the first waited for the second
    assert taken == 1
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0


async def test_an_idle_workers_outcome_is_recorded_at_once(redis: aioredis.Redis) -> None:
    taken, applied_then = await settle_two_apart(redis, busy=False)
    assert len(applied_then) == 1  # recorded before the next outcome came, not a second later
    assert taken == 2
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0
