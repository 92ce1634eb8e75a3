"""Redis stalled (SIGSTOP) while senders are mid-DATA: one 250 is one entry.

While Redis is stopped, the XADDs of the messages in flight wait in a socket buffer and run
when it resumes, whether or not ingest still waits for the reply.  A client that gave up on
the connection and sent the batch again on a new one (redis-py's ``Retry``) made two entries
for one 250.  Now:

* a stall shorter than ``--store-timeout`` only delays the replies: every sender gets its 250
  when Redis resumes, with exactly one entry, and no 451 at all;
* a stall longer than ``--store-timeout`` gets 451 for the messages in flight; the ones whose
  XADD had gone out are stored when Redis resumes (ingest logs each one,
  ``message_stored_after_deferral``, with its entry id), the ones still queued never are.

Senders are patient, as MTAs are (RFC 5321: 10 minutes for the reply to the final dot), and
do not retry a 4xx here, so that every ledger id is one attempt with one reply.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import (
    FULL,
    Replies,
    ids_until,
    receive_ledger_id,
    send_with_ledger,
    size,
    stored_entries,
)
from tests.delivery_util import redis_stalled
from tests.harness import RedisServer
from tests.ingest_util import IngestProcess, SMTPConn

SENDERS = size(16, 32)
WORKERS = 2
PATIENT = 120.0  # seconds a sender waits for the reply to its final dot
# Longer than the 5 s socket timeout after which the old client sent the batch again.
STALLS = [20.0, 7.0] if FULL else [6.0]
SHORT_STORE_TIMEOUT = 2.0  # for the stall that outlasts it
LONG_STALL = 12.0 if FULL else 5.0


@pytest.fixture(autouse=True)
def patient_senders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SMTPConn, "reply_timeout", PATIENT)


@dataclass
class StallRun:
    replies: list[Replies]  # one per sender
    stalled_at: float
    resumed_at: float

    def codes(self) -> list[tuple[float, int]]:
        return sorted(pair for replies in self.replies for pair in replies.codes)

    def held(self) -> int:
        """Senders whose transaction was in flight through the whole stall: no reply from
        just after Redis stopped until it resumed."""
        return sum(
            1
            for replies in self.replies
            if min((at for at, _ in replies.codes if at > self.stalled_at + 0.2), default=0)
            >= self.resumed_at
        )


async def run_stall(
    server: RedisServer, workers: list[IngestProcess], ledger: Ledger, stall: float
) -> StallRun:
    """Senders load the workers, Redis stops for ``stall`` s, load goes on 1.5 s after it
    resumes."""
    replies = [Replies() for _ in range(SENDERS)]
    stop = asyncio.Event()
    senders = [
        asyncio.create_task(
            send_with_ledger(
                workers[n % len(workers)].port, ledger, ids_until(stop, f"s{n}"), replies[n],
                retry_4xx=False, pause=0.02,
            )
        )
        for n in range(SENDERS)
    ]  # fmt: skip
    try:
        await asyncio.sleep(1.0)  # pipelines busy when Redis stops
        with redis_stalled(server) as stalled_at:
            await asyncio.sleep(stall)
        resumed_at = time.monotonic()
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*senders), timeout=PATIENT + 10)
    return StallRun(replies, stalled_at, resumed_at)


@dataclass
class Stored:
    ledger_ids: dict[str, str]  # entry id -> ledger id
    message_ids: set[str]  # ingest's id of each stored message (in its log lines too)


async def record_stored_by_entry(server: RedisServer, ledger: Ledger) -> Stored:
    """Record every entry in the ledger; which ledger id each entry holds."""
    client = aioredis.Redis.from_url(server.url)
    try:
        entries = await stored_entries(client)
    finally:
        await client.aclose()
    by_entry = {entry_id: receive_ledger_id(message) or "?" for entry_id, message in entries}
    ledger.record_all("stored", by_entry.values())
    return Stored(by_entry, {message["id"] for _, message in entries})


def events(workers: list[IngestProcess], name: str) -> list[dict[str, object]]:
    lines = (line for worker in workers for line in worker.log_lines() if f'"{name}"' in line)
    return [json.loads(line) for line in lines]


@pytest.mark.timeout(600 if FULL else 60)
@pytest.mark.parametrize("stall", STALLS)
async def test_a_stall_shorter_than_the_store_timeout_gives_one_entry_per_250(
    stall: float,
    make_redis: Callable[..., RedisServer],
    ingest_workers: Callable[..., IngestProcess],
) -> None:
    server = make_redis()
    workers = [ingest_workers(server.url) for _ in range(WORKERS)]
    ledger = Ledger(f"ingest-redis-stall-{stall:g}s")
    run = await run_stall(server, workers, ledger, stall)
    await record_stored_by_entry(server, ledger)

    codes = run.codes()
    during = [code for at, code in codes if run.stalled_at + 0.2 < at < run.resumed_at]
    unexplained = ledger.unexplained_duplicates("stored")
    phantoms = ledger.phantoms(["stored"])
    ledger.report(
        ["stored"],
        stall_s=stall,
        senders=SENDERS,
        held_through_stall=run.held(),
        replies_during_stall=len(during),
        replies_4xx=sum(1 for _, code in codes if 400 <= code < 500),
        dup_without_retry=len(unexplained),
        entries_for_451=len(phantoms),
    )
    assert run.held() >= SENDERS // 2, "few messages were in flight: the stall tested nothing"
    assert not unexplained, f"several entries for one 250: {sorted(unexplained.items())[:5]}"
    ledger.check(["stored"], max_duplicates=0)
    assert not during, f"replies while Redis was stopped: {during[:10]}"
    assert {code for _, code in codes} == {250}, "a stall under --store-timeout costs no 4xx"
    assert not ledger.indeterminate


@pytest.mark.timeout(600 if FULL else 60)
async def test_a_stall_longer_than_the_store_timeout_defers_and_logs_what_is_stored(
    make_redis: Callable[..., RedisServer],
    ingest_workers: Callable[..., IngestProcess],
) -> None:
    server = make_redis()
    workers = [
        ingest_workers(server.url, "--store-timeout", str(SHORT_STORE_TIMEOUT))
        for _ in range(WORKERS)
    ]
    ledger = Ledger("ingest-redis-stall-over-store-timeout")
    run = await run_stall(server, workers, ledger, LONG_STALL)
    stored = await record_stored_by_entry(server, ledger)

    deferred = events(workers, "message_deferred")
    maybe_stored = [e for e in deferred if e.get("stored") == "unknown"]
    not_stored = {str(e["id"]) for e in deferred if e.get("stored") == "no"}
    late = {str(e["entry"]) for e in events(workers, "message_stored_after_deferral")}
    phantom_entries = {
        entry for entry, ledger_id in stored.ledger_ids.items() if ledger_id in ledger.rejected
    }
    ledger.report(
        ["stored"],
        stall_s=LONG_STALL,
        store_timeout_s=SHORT_STORE_TIMEOUT,
        senders=SENDERS,
        replies_451=len(ledger.rejected),
        deferred_maybe_stored=len(maybe_stored),
        deferred_not_stored=len(not_stored),
        entries_for_451=len(phantom_entries),
        logged_stored_after_451=len(late),
    )
    assert ledger.rejected, "no 451: the stall did not outlast --store-timeout"
    assert set(ledger.rejected.values()) == {451}
    assert len(deferred) == len(ledger.rejected)
    ledger.check(["stored"], max_duplicates=0)  # one entry per 250, and per 451 at most one
    # What a 451 left stored is exactly what ingest logged as stored after its deferral, and
    # only a 451 that said "stored: unknown" can have an entry.
    assert phantom_entries == late
    assert len(phantom_entries) <= len(maybe_stored)
    assert not not_stored & stored.message_ids, "a 451 that said 'stored: no' was stored"
    after = [code for at, code in run.codes() if at > run.resumed_at + 0.5]
    assert after and set(after) == {250}, "ingest did not resume after the stall"
