"""The duplicate class "relay answered after our timeout".

A relay that answers the final dot after delivery stopped waiting (content scanning, a slow
disk) keeps the copy it answered for, while delivery, having seen no reply, defers the
recipient and sends the message again.  Each such late answer is exactly one extra copy.
With ``--smtp-data-timeout`` above the relay's time (the default 600 s is RFC 5321's 10
minutes) there is none.

The relay here answers the final dot of each message's first copy after ``LATE`` seconds,
then promptly.  Against ``--smtp-data-timeout 0.4`` every first copy is answered late: one
duplicate per message; against 3 s, none.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tests.chaos.delivery_chaos_util import Fleet, enqueue_many, observe
from tests.chaos.ledger import Ledger, id_in_raw
from tests.chaos.scenario import size
from tests.delivery_util import events, settled
from tests.harness import wait_until
from tests.sinks import RecordingSink

LATE = 1.0  # seconds the relay takes to answer the final dot of a message's first copy
MESSAGES = size(20, 200)


@dataclass
class LateFirstAnswer(RecordingSink):
    """A recording relay that queues every copy at its final dot and answers the first copy
    of each message ``late`` seconds later, whether anyone is still listening or not."""

    late: float = LATE
    _answered: set[str | None] = field(default_factory=set)
    _seen_lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        ledger_id = id_in_raw(bytes(envelope.original_content))
        with self._seen_lock:
            first = ledger_id not in self._answered
            self._answered.add(ledger_id)
        reply = await super().handle_DATA(server, session, envelope)  # the copy is queued
        if first:  # then answered late (aiosmtpd gives up the wait if the client hangs up)
            await asyncio.sleep(self.late)
        return reply


async def _run(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path, name: str, *flags: str
) -> tuple[Ledger, list[dict[str, Any]], float]:
    """MESSAGES sends through one worker to a LateFirstAnswer relay, until all are settled
    and every late copy has landed; the ledger, the events and the seconds it took."""
    ledger = Ledger(name)
    sink = LateFirstAnswer().start()
    fleet = Fleet(redis_url, sink.url, ("--concurrency", "4", *flags), tmp_path / "w.log")
    started = time.monotonic()
    try:
        ids = [f"late{n}" for n in range(MESSAGES)]
        for message_id, entry in (await enqueue_many(redis, ids)).items():
            ledger.accept(message_id, entry)
        fleet.start()
        await wait_until(lambda: settled(redis), timeout=size(60, 300))
        assert not fleet.crashed(), "the worker died"
        await observe(ledger, redis, sink)
    finally:
        fleet.close()
        sink.stop()
    return ledger, await events(redis), time.monotonic() - started


async def test_each_answer_after_the_data_timeout_is_one_duplicate(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    ledger, rows, took = await _run(
        redis, redis_url, tmp_path, "relay-late-answer-short-timeout",
        "--smtp-data-timeout", "0.4",
    )  # fmt: skip
    late = [r for r in rows if r["event"] == "deferred" and "Timeout" in r.get("error", "")]
    ledger.report(late_answers=len(late), relay_seconds=LATE, seconds=round(took, 1))
    ledger.check(max_duplicates=len(late))
    assert len(late) == MESSAGES  # every first copy was answered after the timeout
    assert ledger.duplicates() == len(late)  # and each late answer is exactly one more copy
    assert ledger.duplicate_ids() == dict.fromkeys(ledger.accepted, 2)  # copies per message


async def test_a_data_timeout_above_the_relays_time_sends_each_message_once(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    ledger, rows, took = await _run(
        redis, redis_url, tmp_path, "relay-late-answer-long-timeout",
        "--smtp-data-timeout", "3", "--claim-after", "8",
    )  # fmt: skip
    ledger.report(relay_seconds=LATE, data_timeout=3, seconds=round(took, 1))
    ledger.check(max_duplicates=0)
    assert [r["event"] for r in rows] == ["delivered"] * MESSAGES
