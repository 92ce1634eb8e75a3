"""Ingest soak: smtp-source with 50 sessions against two ingest workers; every 250 has
exactly one entry in ``email.receive`` and no message has two."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import (
    FULL,
    finish_smtp_source,
    rss_kib,
    run_smtp_source,
    size,
    stored_entries,
)
from tests.harness import RedisServer
from tests.ingest_util import IngestProcess

MESSAGES = size(4000, 20_000)
SESSIONS = 50
WORKERS = 2


@pytest.mark.timeout(900 if FULL else 60)
async def test_every_250_has_exactly_one_entry(
    make_redis: Callable[..., RedisServer], ingest_workers: Callable[..., IngestProcess]
) -> None:
    server = make_redis()
    workers = [ingest_workers(server.url) for _ in range(WORKERS)]
    per_worker = MESSAGES // WORKERS
    started = time.monotonic()
    # One smtp-source per worker, each with its half of the sessions; "w<k>" keeps the
    # numbered recipients (the ledger ids) of the two runs apart.
    sources = [
        run_smtp_source(
            worker.port, messages=per_worker, sessions=SESSIONS // WORKERS, recipient=f"w{k}@x.test"
        )
        for k, worker in enumerate(workers)
    ]
    runs = [
        await asyncio.to_thread(finish_smtp_source, source, 900 if FULL else 50)
        for source in sources
    ]
    elapsed = time.monotonic() - started
    for run in runs:
        assert run.returncode == 0, run.stderr_tail

    client = aioredis.Redis.from_url(server.url)
    try:
        entries = await stored_entries(client)
    finally:
        await client.aclose()

    ledger = Ledger("ingest-soak")
    for k in range(WORKERS):
        for number in range(1, per_worker + 1):
            ledger.send(f"{number}w{k}")
    by_entry = {}
    for entry_id, message in entries:
        ledger_id = message["to"][0].partition("@")[0]
        ledger.record("stored", ledger_id)
        by_entry[entry_id] = ledger_id
    receipts = [receipt for run in runs for receipt in run.receipts]
    for receipt in receipts:
        # a 250 whose entry is missing is a loss: it keeps a ledger id of its own
        ledger.accept(by_entry.get(receipt, f"missing:{receipt}"), receipt=receipt)

    figures = ledger.report(
        ["stored"],
        workers=WORKERS,
        sessions=SESSIONS,
        replies_250=len(receipts),
        entries=len(entries),
        rate=MESSAGES / elapsed,
        rss_mib=max(rss_kib(w.process.pid) for w in workers if w.process) / 1024,
    )
    ledger.check(["stored"])
    assert len(receipts) == MESSAGES == len(set(receipts))  # every message got its 250
    assert len(entries) == len(receipts)  # ... and no entry exists without one
    assert ledger.settled(["stored"]) == ledger.sent
    assert figures["lost"] == 0 and figures["dup"] == 0
    for worker in workers:
        assert worker.process is not None and worker.process.poll() is None
