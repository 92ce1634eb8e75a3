"""Delivery under churn: workers killed with ``kill -9`` every 2 s and replaced by new ones
(new consumer names, as a Deployment's pods are), while sends are in flight.

Guarantee: nothing accepted (XADD returned an id) is lost; a duplicate is only possible for
a send whose 250 arrived just before the worker died, before its settlement (record + ack)
reached Redis, so duplicates <= kills x concurrency.  The dead worker's pending entries are
claimed by the others after ``--claim-after``.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.chaos.delivery_chaos_util import Fleet, enqueue_many, observe
from tests.chaos.ledger import Ledger
from tests.chaos.scenario import seconds, size
from tests.delivery_util import settled
from tests.harness import wait_until
from tests.sinks import RecordingSink

WORKERS = 2
CONCURRENCY = 8
KILL_EVERY = 2.0


@pytest.mark.timeout(600)
async def test_kill_9_every_2s_loses_nothing_and_bounds_duplicates(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    total = size(1500, 10_000)
    # the sink takes its time per message so that kills land among sends in flight
    # (about 160 msg/s short, 320 msg/s full: runs of ~10 s and ~35 s)
    sink.stall_data = seconds(0.1, 0.05)
    ledger = Ledger("delivery-churn")
    ids = [f"churn{n}" for n in range(total)]
    for message_id, entry in (await enqueue_many(redis, ids)).items():
        ledger.accept(message_id, entry)
    # --claim-after 4 > 3 x --smtp-timeout 1: a live worker slowed by the restarts next to
    # it is not overtaken; --max-deliveries high: churn must not turn entries into poison.
    extra = ("--concurrency", str(CONCURRENCY), "--smtp-timeout", "1", "--claim-after", "4",
             "--max-deliveries", "1000", "--retry-base", "0.2")  # fmt: skip
    fleet = Fleet(redis_url, sink.url, extra, tmp_path / "workers.log")
    rng = random.Random(6)
    kills = 0
    started = time.monotonic()
    deadline = started + seconds(60, 400)
    try:
        for _ in range(WORKERS):
            fleet.start()
        # kill only while work is left to be in flight: the tail drains without kills
        while len(sink.received) < total * 0.95 and time.monotonic() < deadline:
            await asyncio.sleep(KILL_EVERY)
            fleet.kill(rng.choice(sorted(fleet.workers)))
            kills += 1
            fleet.start()
        await wait_until(lambda: settled(redis), timeout=seconds(30, 120))
        assert not fleet.crashed(), "a worker died on its own"
    finally:
        fleet.close()
    elapsed = time.monotonic() - started
    await observe(ledger, redis, sink)
    ledger.report(kills=kills, concurrency=CONCURRENCY, seconds=round(elapsed, 1))
    assert kills >= 3, "the run was too short to churn"
    ledger.check(max_duplicates=kills * CONCURRENCY)
    assert ledger.outcomes["dead"] == [], "churn must not dead-letter anything"
