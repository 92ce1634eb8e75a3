"""The delivery worker's invariants, seen from Redis and from the relay: one lane at a time
sends a message id, at most 2 x --concurrency entries are in hand before their outcome, and
a stop in the middle of everything leaves each entry either settled or pending (none lost,
none sent twice)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    make_config,
    run_until_settled,
    running_worker,
    send_message,
)
from tests.harness import wait_until
from tests.sinks import RecordingSink, TimedSink
from workers.streams.outcomes import Outcomes


async def test_one_message_id_is_sent_by_one_lane_at_a_time(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Three entries with one id and three with others, three lanes: the three of one id
    reach the relay one after the other, while the others run beside them."""
    sink = TimedSink(stall_data=0.3)
    sink.start()
    try:
        for rcpt in ["a@example.com", "b@example.com", "c@example.com"]:
            await enqueue(redis, send_message([rcpt], message_id="same"))
        for n in range(3):
            await enqueue(redis, send_message([f"o{n}@example.com"], message_id=f"other{n}"))
        await run_until_settled(redis, make_config(redis_url, sink.url, concurrency=3))
    finally:
        sink.stop()
    same = sorted((s for s in sink.spans if s.recipients[0][0] != "o"), key=lambda s: s.began)
    others = [s for s in sink.spans if s.recipients[0][0] == "o"]
    assert [s.recipients[0] for s in same] == ["a@example.com", "b@example.com", "c@example.com"]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(same, 2))
    assert len(others) == 3
    assert any(o.overlaps(s) for o in others for s in same)  # the lanes did run side by side


async def test_one_lane_sends_many_entries_with_one_id_in_turn(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """--concurrency 1 and twenty entries with one id: each entry after the first waits for
    its id while the reader prepares the next one, often in the loop turn the settler lets
    the id go.  Every one reaches the relay in turn; none is left waiting for an id that a
    later entry took (the only lane would wait for ever, that entry queued behind it)."""
    sink = TimedSink(stall_data=0.02)
    sink.start()
    recipients = [f"r{n:02}@example.com" for n in range(20)]
    try:
        for rcpt in recipients:
            await enqueue(redis, send_message([rcpt], message_id="one"))
        config = make_config(redis_url, sink.url, concurrency=1)
        await run_until_settled(redis, config, timeout=10)
    finally:
        sink.stop()
    spans = sorted(sink.spans, key=lambda s: s.began)
    assert [s.recipients[0] for s in spans] == recipients
    assert not any(a.overlaps(b) for a, b in itertools.combinations(spans, 2))


async def test_at_most_twice_the_concurrency_is_in_hand(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A slow relay and many entries: the worker reads ahead one entry per lane, no more.
    Redis counts an entry pending from its read to its acknowledgement, so the count may
    also hold one settling entry per lane (finished, its outcome on the way)."""
    concurrency = 2
    sink = RecordingSink(stall_data=0.3).start()
    most = 0

    async def pending() -> bool:
        nonlocal most
        most = max(most, int((await redis.xpending("email.send", "delivery"))["pending"]))
        return len(sink.received) == 12

    try:
        for n in range(12):
            await enqueue(redis, send_message([f"u{n}@example.com"], message_id=f"w{n}"))
        await redis.xgroup_create("email.send", "delivery", id="0")  # to count from the start
        async with running_worker(make_config(redis_url, sink.url, concurrency=concurrency)):
            await wait_until(pending, "all 12 sent", timeout=15, interval=0.02)
    finally:
        sink.stop()
    assert 2 * concurrency <= most <= 3 * concurrency


async def test_a_stop_leaves_every_entry_settled_or_pending(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A stop while two entries are sending (one per connection), one waits for its message
    id and one for a connection: the worker stops cleanly (its own check finds nothing
    undecided), the sent ones are settled, the other two stay pending, and a restarted
    worker sends each recipient exactly once."""
    sink = RecordingSink(stall_data=0.5).start()
    try:
        await enqueue(redis, send_message(["a@example.com"], message_id="x"))
        await enqueue(redis, send_message(["b@example.com"], message_id="x"))
        for n in range(4):
            await enqueue(redis, send_message([f"d{n}@example.com"], message_id=f"d{n}"))
        config = make_config(
            redis_url, sink.url, concurrency=2, smtp_data_timeout=3.0, claim_after=30.0
        )
        async with running_worker(config) as stop:
            await asyncio.to_thread(sink.data_arrived.wait, 5)
            stop.set()
        assert sorted(r.rcpt_tos for r in sink.received) == [
            ("a@example.com",),
            ("d0@example.com",),
        ]
        assert (await redis.xpending("email.send", "delivery"))["pending"] == 2
        sink.stall_data = 0.0
        await run_until_settled(redis, config)  # the same consumer: its leftovers at once
    finally:
        sink.stop()
    got = sorted(rcpt for r in sink.received for rcpt in r.rcpt_tos)
    assert got == ["a@example.com", "b@example.com"] + [f"d{n}@example.com" for n in range(4)]


async def test_a_bug_while_taking_its_turn_gives_the_message_id_back(
    redis: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three entries with one id: the second crashes (a bug, not a Redis error) right after
    taking the id from the first.  Its lane hands it back with the id, so the third is not
    blocked, and the second comes back from the pending list and is sent too."""
    real = Outcomes.look_up
    crashed: list[object] = []

    async def crash_once(self: Outcomes, wanted: Any, addresses: Any) -> Any:
        asked = [(lookup.message_id, list(lookup.recipients)) for lookup in wanted]
        if asked == [("turn", ["b@example.com"])] and not crashed:
            crashed.append(wanted)
            raise RuntimeError("injected bug")
        return await real(self, wanted, addresses)

    monkeypatch.setattr(Outcomes, "look_up", crash_once)
    sink = RecordingSink(stall_data=0.2).start()
    try:
        for rcpt in ["a@example.com", "b@example.com", "c@example.com"]:
            await enqueue(redis, send_message([rcpt], message_id="turn"))
        await run_until_settled(redis, make_config(redis_url, sink.url, concurrency=3))
    finally:
        sink.stop()
    assert crashed
    got = sorted(rcpt for r in sink.received for rcpt in r.rcpt_tos)
    assert got == ["a@example.com", "b@example.com", "c@example.com"]
