"""A message that needs SMTPUTF8 (an address with non-ASCII characters) goes only to a
relay that offers it: to any other it is a dead letter that says why, and nothing of it
goes out (RFC 6531 section 3.4: such a message must not be downgraded by a client)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import enqueue, make_config, run_until_settled, send_message, stream_fields
from tests.scripted_relay import ScriptedRelay


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_relay_without_smtputf8_gets_nothing_and_the_dead_letter_says_why(
    redis: aioredis.Redis, redis_url: str, pipelining: bool
) -> None:
    relay = ScriptedRelay(pipelining=pipelining)
    await enqueue(redis, send_message(["zoë@example.com"], message_id="utf8"))
    async with relay.running() as url:
        await run_until_settled(redis, make_config(redis_url, url, suppress_ttl=0))
    assert b"MAIL" not in relay.stages and relay.messages == 0
    [letter] = await stream_fields(redis, "email.send.dead")
    assert letter["reason"] == "rejected"
    # It read "zoë@example.com: no reply relay does not offer SMTPUTF8".
    assert letter["error"] == "zoë@example.com: relay does not offer SMTPUTF8"
