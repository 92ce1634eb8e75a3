"""Settlements across an idle spell, with whichever redis-py is installed.

Each settlement round trip checks a connection out of the pool (workers/streams/redis_fence.py),
and the checkout must give a working one after a spell without settlements, also when the
server closed it meanwhile.  The checkout differs between redis-py releases; the
lowest-versions run (scripts/lowest-deps.sh) runs this module on redis-py 5.0.1, the main
suite on the newest.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from tests.delivery_util import enqueue, events, make_config, running_worker, send_message, settled
from tests.harness import wait_until
from tests.sinks import RecordingSink

IDLE_SPELL = 6.0  # seconds without a settlement between two sends


async def delivered_ids(redis: aioredis.Redis) -> list[str]:
    return [e["id"] for e in await events(redis) if e["event"] == "delivered"]


async def test_a_send_after_an_idle_spell_is_acknowledged(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """A few seconds idle, then a send: it is sent and acked."""
    async with running_worker(make_config(redis_url, sink.url)):
        await enqueue(redis, send_message(message_id="before-idle"))
        await wait_until(lambda: settled(redis))
        await asyncio.sleep(IDLE_SPELL)
        await enqueue(redis, send_message(message_id="after-idle"))
        await wait_until(lambda: settled(redis))
        assert (await redis.xpending("email.send", "delivery"))["pending"] == 0
    assert await delivered_ids(redis) == ["before-idle", "after-idle"]
    assert len(sink.received) == 2


async def test_a_settlement_connection_closed_while_idle_is_replaced(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """The server drops every client while the worker is idle; the checkout finds the
    pooled connection closed and the next settlement goes out on a new one, once."""
    async with running_worker(make_config(redis_url, sink.url)):
        await enqueue(redis, send_message(message_id="before-kill"))
        await wait_until(lambda: settled(redis))
        await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.sleep(1.0)
        await enqueue(redis, send_message(message_id="after-kill"))
        await wait_until(lambda: settled(redis))
    assert await delivered_ids(redis) == ["before-kill", "after-kill"]
    assert len(sink.received) == 2
