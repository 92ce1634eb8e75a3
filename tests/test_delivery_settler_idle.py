"""The settlement connection across an idle spell, with whichever redis-py is installed.

The delivery worker's settler holds one Redis connection outside the pool and checks it
again after ``SETTLE_IDLE_CHECK`` seconds without a settlement.  Those two calls (the
checkout and the liveness probe) differ between redis-py releases; the lowest-versions run
(scripts/lowest-deps.sh) runs this module on redis-py 5.0.1, the main suite on the newest.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

import workers.streams.outcomes
from tests.delivery_util import enqueue, events, make_config, running_worker, send_message, settled
from tests.harness import wait_until
from tests.sinks import RecordingSink
from workers.streams.outcomes import SETTLE_IDLE_CHECK


async def delivered_ids(redis: aioredis.Redis) -> list[str]:
    return [e["id"] for e in await events(redis) if e["event"] == "delivered"]


async def test_a_send_after_an_idle_spell_is_acknowledged(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Idle longer than the re-check (the real 5 s), then a send: it is sent and acked."""
    async with running_worker(make_config(redis_url, sink.url)):
        await enqueue(redis, send_message(message_id="before-idle"))
        await wait_until(lambda: settled(redis))
        await asyncio.sleep(SETTLE_IDLE_CHECK + 1.0)
        await enqueue(redis, send_message(message_id="after-idle"))
        await wait_until(lambda: settled(redis))
        assert (await redis.xpending("email.send", "delivery"))["pending"] == 0
    assert await delivered_ids(redis) == ["before-idle", "after-idle"]
    assert len(sink.received) == 2


async def test_a_settlement_connection_closed_while_idle_is_replaced(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server drops every client while the worker is idle; the probe finds the held
    connection closed and the next settlement goes out on a new one, once."""
    monkeypatch.setattr(workers.streams.outcomes, "SETTLE_IDLE_CHECK", 0.5)
    async with running_worker(make_config(redis_url, sink.url)):
        await enqueue(redis, send_message(message_id="before-kill"))
        await wait_until(lambda: settled(redis))
        await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.sleep(1.0)
        await enqueue(redis, send_message(message_id="after-kill"))
        await wait_until(lambda: settled(redis))
    assert await delivered_ids(redis) == ["before-kill", "after-kill"]
    assert len(sink.received) == 2
