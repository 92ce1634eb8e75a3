"""A relay that refuses the session, not the message, defers the mail.

A 5xx to the greeting's follow-up (EHLO and HELO), to STARTTLS or to AUTH says the worker
may not use this relay as it is configured (a wrong password, a relay's policy): nothing of
any message was sent, and an operator fixes it.  Each queued message was dead-lettered as
``rejected`` within a second instead (found by an adversarial review with a relay that
answers AUTH with a prompt 535; aiosmtpd answers a failed AUTH too slowly to show it).
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import enqueue, events, make_config, running_worker, send_message
from tests.harness import wait_until
from tests.scripted_relay import ScriptedRelay

CASES = {
    "auth-535": (
        {b"EHLO": b"250-scripted.test\r\n250 AUTH PLAIN LOGIN", b"AUTH": b"535 5.7.8 no"},
        {"relay_user": "mailer", "relay_password": "wrong", "starttls": "off"},
        "535",
    ),
    "starttls-554": (
        {b"EHLO": b"250-scripted.test\r\n250 STARTTLS", b"STARTTLS": b"554 5.7.0 no TLS here"},
        {},
        "554",
    ),
    "ehlo-and-helo-502": (
        {b"EHLO": b"502 5.5.1 no", b"HELO": b"502 5.5.1 not either"},
        {},
        "502",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_refused_session_defers_every_message_and_dead_letters_none(
    redis: aioredis.Redis, redis_url: str, case: str
) -> None:
    replies, options, code = CASES[case]
    relay = ScriptedRelay(replies=replies)
    for n in range(3):
        await enqueue(redis, send_message(message_id=f"m{n}"))
    async with relay.running() as url, running_worker(make_config(redis_url, url, **options)):
        await wait_until(lambda: _deferred(redis, 3), f"three deferred events ({case})")
    assert relay.messages == 0 and b"MAIL" not in relay.stages
    assert await redis.xlen("email.send.dead") == 0
    rows = await events(redis)
    assert {(e["event"], e["smtp_code"]) for e in rows} == {("deferred", code)}
    assert all(e["next_attempt"] for e in rows)


async def _deferred(redis: aioredis.Redis, count: int) -> bool:
    return sum(e["event"] == "deferred" for e in await events(redis)) >= count
