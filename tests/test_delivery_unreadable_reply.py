"""A relay whose reply is not SMTP: a line too long to read (aiosmtplib reports code -1) or a
code outside 2xx-5xx.  No such code may reach ``smtp_code``: the event and the dead letter
say it in ``error``, satisfy schema/event.schema.json and schema/dead-letter.schema.json, and
the recipient is deferred (the relay may have taken the message), then expires."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import enqueue, make_config, running_worker, send_message, settled
from tests.harness import wait_until
from tests.schema_util import schema_violations
from tests.scripted_relay import ScriptedRelay
from workers.relay import Reply, relay_reply
from workers.streams import layout

TOO_LONG = b"250 2.0.0 " + b"x" * 10_000  # aiosmtplib reads lines of at most 8192 octets


@pytest.mark.parametrize(
    ("stage", "odd_reply", "said"),
    [
        (b".", TOO_LONG, "Response too long"),  # the reply to the final dot
        (b"RCPT", b"600 6.0.0 not an SMTP code", "600 6.0.0 not an SMTP code"),
    ],
    ids=["dot-reply-too-long", "rcpt-code-600"],
)
async def test_unreadable_reply_is_a_local_failure_in_schema_true_entries(
    redis: aioredis.Redis, redis_url: str, stage: bytes, odd_reply: bytes, said: str
) -> None:
    relay = ScriptedRelay(replies={stage: odd_reply})
    await enqueue(redis, send_message(["ann@example.com"], message_id="odd-1"))
    async with relay.running() as url, running_worker(make_config(redis_url, url, max_attempts=2)):
        await wait_until(lambda: settled(redis))
    events = await redis.xrange("email.send.events")
    dead = await redis.xrange("email.send.dead")
    assert schema_violations("event", events) + schema_violations("dead-letter", dead) == []
    assert [fields[b"event"] for _, fields in events] == [b"deferred", b"failed"]
    for _, fields in events:
        assert (fields[b"smtp_code"], fields[b"smtp_text"]) == (b"", b"")
        assert said in fields[b"error"].decode()
    [(_, letter)] = dead
    assert letter[b"reason"] == b"expired" and b"smtp_code" not in letter
    assert said in letter[b"error"].decode()
    assert relay.messages == (2 if stage == b"." else 0)  # deferred and tried again


@pytest.mark.parametrize("code", [-1, 0, 199, 600, 999])
def test_codes_outside_2xx_to_5xx_never_become_smtp_codes(code: int) -> None:
    reply = relay_reply(code, "Response too long")
    assert reply.code is None and not reply.permanent
    ref = layout.MessageRef("m", "1-0", b"")
    event = layout.event("deferred", ref, ["ann@example.com"], reply, 1.0, next_attempt=2.0)
    assert (event["smtp_code"], event["smtp_text"]) == ("", "")
    assert "Response too long" in str(event["error"])
    # the builders check too, whatever a transport hands them
    raw = Reply(code, "Response too long")
    letter = layout.dead_letter(
        ref, reason="expired", error="gave up", recipients=["ann@example.com"], attempts=1,
        first_attempt=1.0, last_attempt=1.0, reply=raw,
    )  # fmt: skip
    assert "smtp_code" not in letter and "smtp_text" not in letter
    assert layout.event("failed", ref, [], raw, 1.0)["smtp_code"] == ""


@pytest.mark.parametrize("code", [250, 421, 550, 599])
def test_real_codes_are_kept(code: int) -> None:
    assert relay_reply(code, "text") == Reply(code, "text")
