"""Rolling restart with SIGTERM under load: a producer keeps enqueueing while each worker in
turn is told to stop (SIGTERM), drains, exits 0 and is replaced by a new one (a new consumer
name, as in a Deployment's rollout).

Guarantee: 0 lost and 0 duplicates.  A stopping worker finishes and settles its sends in
flight within ``--shutdown-grace``; entries it read but did not start it releases, and the
others claim them within a second; nothing it sent is sent again.
"""

from __future__ import annotations

import asyncio
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


async def produce(redis: aioredis.Redis, ledger: Ledger, total: int, rate: float) -> None:
    """Enqueue ``total`` messages at about ``rate`` per second, in small pipelined bursts."""
    burst = 20
    started = time.monotonic()
    for first in range(0, total, burst):
        ids = [f"roll{n}" for n in range(first, min(first + burst, total))]
        for message_id, entry in (await enqueue_many(redis, ids)).items():
            ledger.accept(message_id, entry)
        ahead = started + (first + burst) / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


@pytest.mark.timeout(600)
async def test_rolling_sigterm_restart_under_load_loses_and_duplicates_nothing(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    total, rounds = size(1500, 10_000), size(2, 4)
    rate = total / seconds(8, 40)  # the producer outlasts the restarts
    sink.stall_data = 0.05  # sends are in flight at every SIGTERM
    ledger = Ledger("rolling-restart")
    extra = ("--concurrency", str(CONCURRENCY), "--smtp-timeout", "1", "--claim-after", "3.5",
             "--shutdown-grace", "5")  # fmt: skip
    fleet = Fleet(redis_url, sink.url, extra, tmp_path / "workers.log")
    restarts, exit_codes = 0, []
    started = time.monotonic()
    for _ in range(WORKERS):
        fleet.start()
    producer = asyncio.create_task(produce(redis, ledger, total, rate))
    try:
        for _ in range(rounds):
            for name in sorted(fleet.workers):
                await asyncio.sleep(seconds(1.5, 4))
                exit_codes.append(await asyncio.to_thread(fleet.stop, name))
                restarts += 1
                fleet.start()
        await producer
        await wait_until(lambda: settled(redis), timeout=seconds(30, 120))
        assert not fleet.crashed(), "a worker died on its own"
    finally:
        producer.cancel()
        fleet.close()
    elapsed = time.monotonic() - started
    await observe(ledger, redis, sink)
    ledger.report(restarts=restarts, seconds=round(elapsed, 1))
    assert exit_codes == [0] * restarts, "SIGTERM must drain and exit 0"
    assert len(ledger.accepted) == total
    ledger.check(max_duplicates=0)
    assert ledger.outcomes["dead"] == []
