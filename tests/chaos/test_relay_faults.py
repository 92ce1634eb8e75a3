"""Relay faults against a real delivery worker process: the relay drops the connection after
the final dot, answers 421, a transient 4xx, a permanent 5xx, or stalls past the SMTP
timeout.  Retries must behave as README documents:

* 4xx, 421, a dropped connection, a timeout: the recipient is deferred (``deferred`` event
  with ``next_attempt``) and sent again later; after ``--max-attempts`` a dead letter
  ``expired`` with the attempts and the last reply;
* 5xx: no retry, a dead letter ``rejected`` with the relay's code; the message's other
  recipients are still sent.

Nothing accepted is lost (each id is delivered or dead); a second copy at the relay exists
only where the relay had the whole message but its 250 never reached the worker (dropped
after the dot, or answered after the worker timed out): those copies count as deliveries
here, so ``dup`` is the number of lost 250s that were followed by a retry.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.chaos.delivery_chaos_util import Fleet, dead_letters, enqueue_many, observe, recipient
from tests.chaos.ledger import Ledger, id_in_raw
from tests.chaos.scenario import seconds, size
from tests.delivery_util import enqueue, events, send_message, settled
from tests.harness import wait_until
from tests.sinks import RecordingSink

FAULTY = size(5, 20)  # messages (of each run) the fault hits


async def run_worker(redis: aioredis.Redis, sink: RecordingSink, redis_url: str,
                     tmp_path: Path, *extra: str, timeout: float = 30) -> float:  # fmt: skip
    """One worker process until everything is settled; returns the seconds it took."""
    fleet = Fleet(redis_url, sink.url, ("--concurrency", "4", *extra), tmp_path / "w.log")
    started = time.monotonic()
    fleet.start()
    try:
        await wait_until(lambda: settled(redis), timeout=timeout)
        assert not fleet.crashed(), "the worker died"
    finally:
        fleet.close()
    return time.monotonic() - started


async def load(redis: aioredis.Redis, ledger: Ledger, prefix: str) -> list[str]:
    ids = [f"{prefix}{n}" for n in range(size(20, 200))]
    for message_id, entry in (await enqueue_many(redis, ids)).items():
        ledger.accept(message_id, entry)
    return ids


def by_id(rows: list[dict[str, Any]], kind: str) -> Counter[str]:
    return Counter(row["id"] for row in rows if row["event"] == kind)


async def test_disconnect_after_final_dot_retries_and_duplicates_only_those(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    ledger = Ledger("relay-fault-disconnect-after-dot")
    await load(redis, ledger, "drop")
    sink.drop_after_dot(times=FAULTY)
    elapsed = await run_worker(redis, sink, redis_url, tmp_path)
    await observe(ledger, redis, sink)
    # the relay had those copies (it read the dot): count them as deliveries (pessimistic)
    lost_250 = [id_in_raw(r.data) for r in sink.dropped]
    ledger.record_all("delivered", lost_250)
    ledger.report(lost_250=len(lost_250), seconds=round(elapsed, 1))
    assert len(lost_250) == FAULTY
    ledger.check(max_duplicates=len(lost_250))
    assert set(ledger.duplicate_ids()) == set(lost_250)  # exactly those, each once more
    deferred = by_id(await events(redis), "deferred")
    assert set(deferred) == set(lost_250)


async def test_421_and_4xx_are_retried_until_accepted_or_expired(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    ledger = Ledger("relay-fault-421-4xx")
    ids = await load(redis, ledger, "soft")
    sink.refuse_data("421 4.4.2 closing connection", times=FAULTY)
    for message_id in ids[:3]:  # two 451s, then accepted at the third attempt
        sink.refuse_rcpt(recipient(message_id), "451 4.3.0 try again later", times=2)
    sink.refuse_rcpt(recipient(ids[-1]), "452 4.2.2 mailbox full")  # always: expires
    elapsed = await run_worker(redis, sink, redis_url, tmp_path, "--max-attempts", "3")
    await observe(ledger, redis, sink)
    rows = await events(redis)
    deferred = by_id(rows, "deferred")
    ledger.report(deferred=sum(deferred.values()), seconds=round(elapsed, 1))
    ledger.check(max_duplicates=0)
    assert all(deferred[i] == 2 for i in ids[:3])
    assert all(r.get("next_attempt") for r in rows if r["event"] == "deferred")
    assert sum(deferred.values()) >= FAULTY + 3 * 2 + 2
    [expired] = await dead_letters(redis)
    assert expired["message_id"] == ids[-1]
    assert (expired["reason"], expired["attempts"], expired["smtp_code"]) == ("expired", "3", "452")
    assert "gave up after 3 attempts" in expired["error"]
    assert set(ledger.settled(["delivered"])) == set(ids[:-1])


async def test_5xx_dead_letters_at_once_and_the_other_recipients_are_sent(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    ledger = Ledger("relay-fault-5xx")
    ids = await load(redis, ledger, "hard")
    rejected = ids[:FAULTY]
    for message_id in rejected:
        sink.refuse_rcpt(recipient(message_id), "550 5.1.1 no such user")
    # one message to two recipients, one of them refused: the other still gets it
    pair = send_message([recipient("pair"), "refused@example.com"], message_id="pair")
    pair["headers"]["x-ledger-id"] = "pair"
    ledger.accept("pair", await enqueue(redis, pair))
    sink.refuse_rcpt("refused@example.com", "550 5.1.1 no such user")
    elapsed = await run_worker(redis, sink, redis_url, tmp_path)
    await observe(ledger, redis, sink)
    ledger.report(relay_5xx=len(rejected) + 1, seconds=round(elapsed, 1))
    ledger.check(max_duplicates=0)
    letters = {row["message_id"]: row for row in await dead_letters(redis)}
    assert set(letters) == {*rejected, "pair"}
    for row in letters.values():
        assert (row["reason"], row["attempts"], row["smtp_code"]) == ("rejected", "1", "550")
    assert letters["pair"]["recipients"] == '["refused@example.com"]'
    assert by_id(await events(redis), "deferred") == Counter()  # never retried
    assert [r.rcpt_tos for r in sink.received if id_in_raw(r.data) == "pair"] == [
        (recipient("pair"),)
    ]


@pytest.mark.timeout(300)
async def test_stall_past_the_smtp_timeout_is_retried_after_the_relay_recovers(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    """The relay takes the message and then says nothing for ``stall`` seconds (30 s in the
    full form; short: 3 s against --smtp-data-timeout 1).  The worker times out, defers, retries;
    copies the stalled relay completed later are the only duplicates allowed."""
    stall, timeout = seconds(3, 30), seconds(1, 10)
    ledger = Ledger("relay-fault-stall")
    sink.stall_data = stall
    ids = await load(redis, ledger, "stall")
    fleet = Fleet(redis_url, sink.url, ("--concurrency", "4", "--smtp-data-timeout", str(timeout),
                                        "--claim-after", str(3 * timeout + 1)),
                  tmp_path / "w.log")  # fmt: skip
    started = time.monotonic()
    fleet.start()
    try:
        await asyncio.to_thread(sink.data_arrived.wait, 20)
        await asyncio.sleep(stall)  # the relay stalls this long, then recovers
        sink.stall_data = 0.0
        await wait_until(lambda: settled(redis), timeout=3 * stall + 30)
        assert not fleet.crashed(), "the worker died"
    finally:
        fleet.close()
    elapsed = time.monotonic() - started
    await observe(ledger, redis, sink)
    timeouts = [r for r in await events(redis)
                if r["event"] == "deferred" and "Timeout" in r.get("error", "")]  # fmt: skip
    ledger.report(timeouts=len(timeouts), stall=stall, seconds=round(elapsed, 1))
    assert timeouts, "the stall never hit the SMTP timeout"
    ledger.check(max_duplicates=len(timeouts))
    assert set(ledger.duplicate_ids()) <= {r["id"] for r in timeouts}
    assert set(ledger.settled(["delivered"])) == set(ids)
