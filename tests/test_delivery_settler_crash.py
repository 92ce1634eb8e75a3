"""A bug in the settler stops the worker instead of leaving it sending with nothing acked.

Redis errors are retried by the settler; anything else is a bug.  A worker that went on
reading and sending with a dead settler would leave every entry pending, and each would be
sent again after ``--claim-after``: the worker must stop (exit 1) so that it is restarted.
One settlement that cannot be written is no reason to: it goes bare (the recipients sent and
the acknowledgement), and the rest of its batch whole.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

import workers.streams.outcomes as oc
from tests.delivery_util import enqueue, events, make_config, outcomes_for, send_message
from tests.harness import wait_until
from tests.sinks import RecordingSink
from workers.delivery import SettlerCrashed, serve
from workers.delivery.settler import Settler
from workers.relay import Reply
from workers.streams import layout
from workers.streams.layout import StreamKeys


async def test_a_crashed_settler_stops_the_worker_and_leaves_the_entry_pending(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_settle(self: oc.Outcomes, *args: object) -> None:
        raise ValueError("a bug in building the settlement")

    monkeypatch.setattr(oc.Outcomes, "settle", broken_settle)
    await enqueue(redis, send_message(message_id="m1"))
    stop = asyncio.Event()
    with pytest.raises(SettlerCrashed, match="settler_crashed"):
        await asyncio.wait_for(serve(make_config(redis_url, sink.url), stop), 10)
    assert stop.is_set()  # the whole process (and `mailpool run`'s other roles) stops
    assert len(sink.received) == 1
    # Not acknowledged: another worker claims it and the idempotency check of a healthy
    # settler is what stands between it and a second copy.
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 1


async def test_a_settlement_that_cannot_be_written_goes_bare_and_the_others_go_on(
    redis: aioredis.Redis,
) -> None:
    """A settlement whose fields no encoder takes (a lone surrogate: a relay's reply text
    did this) is written bare, its recipients recorded as sent and its entry acknowledged;
    the rest of its batch is written whole, and the settler goes on.  It stopped the worker
    with the whole batch pending, and the next worker sent every message in it again."""
    for n in range(2):
        await enqueue(redis, send_message(message_id=f"m{n}"))
    await redis.xgroup_create("email.send", "delivery", id="0")
    read = await redis.xreadgroup("delivery", "w1", {"email.send": ">"})
    good_id, bad_id = [entry_id.decode() for entry_id, _ in read[0][1]]
    ref = layout.MessageRef("m0", good_id, b"")
    delivered = layout.event("delivered", ref, ["ann@example.com"], Reply(250, "ok"), 1.0)
    unwritable = {**delivered, "id": "m1", "smtp_text": "re\udce7u"}  # as Reply made it once
    settled: list[str] = []
    settler = Settler(outcomes_for(redis), on_crash=lambda: settled.append("crashed"))
    settler.start()
    for entry_id, message_id, event in [(good_id, "m0", delivered), (bad_id, "m1", unwritable)]:
        settlement = oc.Settlement(
            entry_id=entry_id, message_id=message_id, accepted=["ann@example.com"], events=[event]
        )
        settler.submit(settlement, lambda s: settled.append(s.entry_id))
    await wait_until(lambda: len(settled) == 2)
    await settler.close(5.0)
    assert sorted(settled) == sorted([good_id, bad_id])  # neither crashed
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0
    assert [e["id"] for e in await events(redis)] == ["m0"]
    for message_id in ("m0", "m1"):  # both recorded: a later read sends neither again
        assert await redis.hkeys(StreamKeys().sent(message_id)) == [b"ann@example.com"]


async def test_a_batch_that_failed_after_reaching_redis_is_not_written_twice(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What raised may have come after Redis applied the batch: the settlements written
    again alone must take the path that finds them applied (not a first run's transaction),
    or each delivery's event is written twice."""
    real_settle = oc.Outcomes.settle
    calls: list[int] = []

    async def applied_then_raises(self: oc.Outcomes, *args: Any, **kwargs: Any) -> Any:
        results = await real_settle(self, *args, **kwargs)
        calls.append(len(args[0]))
        if len(calls) == 1:
            raise ValueError("a bug after the batch reached Redis")
        return results

    monkeypatch.setattr(oc.Outcomes, "settle", applied_then_raises)
    for n in range(2):
        await enqueue(redis, send_message(message_id=f"m{n}"))
    await redis.xgroup_create("email.send", "delivery", id="0")
    read = await redis.xreadgroup("delivery", "w1", {"email.send": ">"})
    settled: list[str] = []
    settler = Settler(outcomes_for(redis), on_crash=lambda: settled.append("crashed"))
    settler.start()
    for n, (entry_id, _) in enumerate(read[0][1]):
        ref = layout.MessageRef(f"m{n}", entry_id.decode(), b"")
        event = layout.event("delivered", ref, ["ann@example.com"], Reply(250, "ok"), 1.0)
        settlement = oc.Settlement(
            entry_id=entry_id.decode(), message_id=f"m{n}", accepted=["ann@example.com"],
            events=[event],
        )  # fmt: skip
        settler.submit(settlement, lambda s: settled.append(s.entry_id))
    await wait_until(lambda: len(settled) == 2)
    await settler.close(5.0)
    assert "crashed" not in settled and calls[0] == 2  # the batch went whole, then alone
    assert sorted(e["id"] for e in await events(redis)) == ["m0", "m1"]
