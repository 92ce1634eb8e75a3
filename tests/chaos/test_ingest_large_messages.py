"""Many large messages at once, no fault at all: every 250 is stored exactly once and every
451 not at all.

The XADDs of large messages used to go out in one pipeline of any size under a fixed 5 s
socket timeout: a batch of 10 MB messages overran it, and redis-py sent the whole batch
again while Redis went on running the first copy (194 entries for 100 messages).  Batches
are now capped by bytes, and the wait for Redis grows with the bytes ahead of a message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import (
    FULL,
    Replies,
    ledger_message,
    record_stored,
    send_with_ledger,
    size,
)
from tests.harness import RedisServer
from tests.ingest_util import IngestProcess, SMTPConn

SENDERS = size(24, 100)
MEGABYTES = size(8, 10)
PATIENT = 600.0  # RFC 5321's wait for the reply to the final dot
LINE = "x" * 76 + "\r\n"


@pytest.mark.timeout(900 if FULL else 90)
async def test_large_messages_at_once_one_entry_per_250_none_per_451(
    make_redis: Callable[..., RedisServer],
    ingest_workers: Callable[..., IngestProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(SMTPConn, "reply_timeout", PATIENT)
    server = make_redis(appendonly=True)  # as deployed: every XADD written to the AOF
    # A memory budget that lets every message in: this is about the way to Redis.
    budget = SENDERS * (MEGABYTES + 1) << 20
    worker = ingest_workers(server.url, "--memory-budget", str(budget))
    body = LINE * (MEGABYTES * 1024 * 1024 // len(LINE))
    ledger = Ledger(f"ingest-large-{SENDERS}x{MEGABYTES}MB")
    replies = Replies()
    senders = (
        send_with_ledger(
            worker.port, ledger, [f"big{n}"], replies, retry_4xx=False,
            make_message=lambda ledger_id: ledger_message(ledger_id, body),
        )
        for n in range(SENDERS)
    )  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*senders), timeout=PATIENT)

    entries = await record_stored(server.url, ledger)
    phantoms = ledger.phantoms(["stored"])
    ledger.report(
        ["stored"],
        senders=SENDERS,
        megabytes=MEGABYTES,
        replies_250=replies.count(lambda c: c == 250),
        replies_4xx=replies.count(lambda c: 400 <= c < 500),
        entries=entries,
        entries_for_451=len(phantoms),
    )
    assert len(ledger.sent) == SENDERS
    assert not ledger.indeterminate, f"senders without a reply: {sorted(ledger.indeterminate)}"
    ledger.check(["stored"], max_duplicates=0)
    assert not phantoms, f"stored although refused: {sorted(phantoms)}"
    assert replies.count(lambda c: c == 250) == SENDERS, "no fault, yet not every one stored"
