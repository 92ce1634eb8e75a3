"""Permanent refusals: the accepted recipients are sent, the refused ones are dead letters."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    pack,
    run_until_settled,
    send_message,
    stream_fields,
)
from tests.sinks import PostfixSink, RecordingSink


async def test_partial_refusal_sends_the_others_and_dead_letters_the_refused(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_rcpt("nobody@example.com", "550 5.1.1 no such user")
    message = send_message(["ann@example.com", "nobody@example.com", "bob@example.com"])
    entry_id = await enqueue(redis, message)
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com", "bob@example.com")]
    [dead] = await stream_fields(redis, "email.send.dead")
    assert dead["data"] == pack(message)  # original bytes, untouched
    assert dead["reason"] == "rejected"
    assert json.loads(dead["recipients"]) == ["nobody@example.com"]
    assert dead["smtp_code"] == "550"
    assert "no such user" in dead["smtp_text"]
    assert "nobody@example.com" in dead["error"]
    assert dead["source_id"] == entry_id
    assert dead["attempts"] == "1"
    assert float(dead["first_attempt"]) <= float(dead["last_attempt"])
    kinds = {e["event"]: e["recipients"] for e in await events(redis)}
    assert kinds == {
        "delivered": ["ann@example.com", "bob@example.com"],
        "failed": ["nobody@example.com"],
    }
    assert await redis.zcard("mailpool:retry") == 0  # a 5xx is never retried


async def test_data_refused_permanently_is_a_dead_letter(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_data("554 5.7.1 spam detected", times=1)
    await enqueue(redis, send_message(["ann@example.com", "bob@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert sink.received == []
    [dead] = await stream_fields(redis, "email.send.dead")
    assert (dead["reason"], dead["smtp_code"]) == ("rejected", "554")
    assert json.loads(dead["recipients"]) == ["ann@example.com", "bob@example.com"]


async def test_postfix_smtp_sink_hard_error_on_rcpt(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    relay = make_postfix_sink("-f", "RCPT")
    for n in range(3):
        await enqueue(redis, send_message([f"u{n}@example.com"]))
    await run_until_settled(redis, make_config(redis_url, relay.url))
    assert relay.dumps() == []
    dead = await stream_fields(redis, "email.send.dead")
    assert len(dead) == 3
    assert {d["reason"] for d in dead} == {"rejected"}
    assert {d["smtp_code"][0] for d in dead} == {"5"}


async def test_postfix_smtp_sink_hard_error_on_data(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    relay = make_postfix_sink("-f", "DATA")
    await enqueue(redis, send_message(["ann@example.com"]))
    await run_until_settled(redis, make_config(redis_url, relay.url))
    [dead] = await stream_fields(redis, "email.send.dead")
    assert dead["reason"] == "rejected" and dead["smtp_code"].startswith("5")


async def test_421_to_one_rcpt_defers_it_and_the_recipients_not_yet_asked(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """RCPT ann 250, bob 421 (the relay closes): bob and carl (never asked) are retried with
    ann, none is lost, none is dead-lettered, each gets the message once."""
    sink.refuse_rcpt("bob@example.com", "421 4.3.0 try later", times=1)
    to = ["ann@example.com", "bob@example.com", "carl@example.com"]
    await enqueue(redis, send_message(to, message_id="rcpt-421"))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [tuple(to)]
    assert [e["event"] for e in await events(redis)] == ["deferred", "delivered"]
    assert sorted((await events(redis))[0]["recipients"]) == to
    assert await redis.xlen("email.send.dead") == 0


async def test_each_event_quotes_its_own_recipients_reply(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Recipients refused with different replies get an event per reply (one event for all
    quoted the first reply: bob's 450 read as ann's 452), deferred and then failed; the dead
    letter's error names each one's reply."""
    sink.refuse_rcpt("ann@example.com", "452 4.2.2 mailbox full")
    sink.refuse_rcpt("bob@example.com", "450 4.2.0 mailbox busy")
    await enqueue(redis, send_message(["ann@example.com", "bob@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url, max_attempts=2))
    quoted = [(e["event"], e["recipients"], e["smtp_code"]) for e in await events(redis)]
    assert quoted == [
        ("deferred", ["ann@example.com"], "452"),
        ("deferred", ["bob@example.com"], "450"),
        ("failed", ["ann@example.com"], "452"),
        ("failed", ["bob@example.com"], "450"),
    ]
    [dead] = await stream_fields(redis, "email.send.dead")
    assert "ann@example.com: 452" in dead["error"] and "bob@example.com: 450" in dead["error"]
