"""A bug in the settler stops the worker instead of leaving it sending with nothing acked.

Redis errors are retried by the settler; anything else is a bug.  A worker that went on
reading and sending with a dead settler would leave every entry pending, and each would be
sent again after ``--claim-after``: the worker must stop (exit 1) so that it is restarted.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

import workers.streams.outcomes as oc
from tests.delivery_util import enqueue, make_config, send_message
from tests.sinks import RecordingSink
from workers.delivery import SettlerCrashed, serve


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
