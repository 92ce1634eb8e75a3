"""Transient failures: retried with back-off from the Redis schedule, never re-sent to the
recipients already accepted, dead letter once attempts or age run out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    run_until_settled,
    running_worker,
    send_message,
    settled,
    stream_fields,
)
from tests.harness import wait_until
from tests.sinks import PostfixSink, RecordingSink
from workers.streams.outcomes import Outcomes


async def test_4xx_then_success(redis: aioredis.Redis, redis_url: str, sink: RecordingSink) -> None:
    sink.refuse_rcpt("ann@example.com", "451 4.3.0 try again later", times=2)
    entry_id = await enqueue(redis, send_message(["ann@example.com"], message_id="m-4xx"))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    seen = await events(redis)
    assert [e["event"] for e in seen] == ["deferred", "deferred", "delivered"]
    for e in seen:
        assert e["id"] == "m-4xx" and e["source_id"] == entry_id
    first, second = seen[0], seen[1]
    assert first["smtp_code"] == "451"
    assert float(first["next_attempt"]) > float(first["time"])
    # back-off grows: the second delay is about twice the first (jitter 0.8-1.2)
    delay1 = float(first["next_attempt"]) - float(first["time"])
    delay2 = float(second["next_attempt"]) - float(second["time"])
    assert 0.15 <= delay1 <= 0.25 and 0.3 <= delay2 <= 0.5
    # the message id (Message-ID header) is the same on every attempt
    assert sink.received[0].message_id.startswith("<m-4xx")


async def test_retry_only_for_recipients_not_yet_accepted(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_rcpt("bob@example.com", "452 4.2.2 mailbox full", times=1)
    await enqueue(redis, send_message(["ann@example.com", "bob@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",), ("bob@example.com",)]
    assert sink.received[0].message_id == sink.received[1].message_id


async def test_postfix_soft_error_then_relay_fixed(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    relay = make_postfix_sink("-r", "RCPT")
    await _deferred_until_the_relay_is_fixed(redis, redis_url, relay)
    assert len(relay.wait_for_dumps(1)) == 1
    assert await redis.xlen("email.send.dead") == 0


async def test_attempts_run_out_into_an_expired_dead_letter(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_rcpt("ann@example.com", "450 4.2.0 busy")
    await enqueue(redis, send_message(["ann@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url, max_attempts=3, retry_base=0.1))
    [dead] = await stream_fields(redis, "email.send.dead")
    assert dead["reason"] == "expired"
    assert dead["attempts"] == "3"
    assert dead["smtp_code"] == "450"
    assert [e["event"] for e in await events(redis)] == ["deferred", "deferred", "failed"]


async def test_per_message_max_attempts_and_max_age(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_rcpt("ann@example.com", "450 4.2.0 busy")
    sink.refuse_rcpt("bob@example.com", "450 4.2.0 busy")
    await enqueue(redis, send_message(["ann@example.com"], max_attempts=1))
    await enqueue(redis, send_message(["bob@example.com"], max_age=0.5))
    started = time.monotonic()
    await run_until_settled(redis, make_config(redis_url, sink.url, retry_base=0.2))
    dead = {
        json.loads(d["recipients"])[0]: d for d in await stream_fields(redis, "email.send.dead")
    }
    assert dead["ann@example.com"]["attempts"] == "1"
    bob = dead["bob@example.com"]
    assert bob["reason"] == "expired"
    assert 0.5 <= float(bob["last_attempt"]) - float(bob["first_attempt"]) < 1.5
    assert time.monotonic() - started < 10


async def test_retries_survive_a_worker_restart(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_rcpt("ann@example.com", "451 4.7.1 greylisted", times=1)
    await enqueue(redis, send_message(["ann@example.com"], message_id="grey"))
    config = make_config(redis_url, sink.url, retry_base=3.0, retry_cap=3.0)
    async with running_worker(config):
        await wait_until(lambda: _has_event(redis, "deferred"))
    # The worker is gone; the retry waits in Redis, not in a process.
    assert await redis.zcard("mailpool:retry") == 1
    [(member, due)] = await redis.zrange("mailpool:retry", 0, -1, withscores=True)
    payload = await redis.hgetall(b"mailpool:retry:" + member)
    assert payload[b"message_id"] == b"grey" and payload[b"attempts"] == b"1"
    groups = await redis.xinfo_groups("email.send")
    assert groups[0]["pending"] == 0  # not in progress and waiting at the same time
    assert sink.received == []
    async with running_worker(make_config(redis_url, sink.url, consumer="w2", retry_base=3.0,
                                          retry_cap=3.0)):  # fmt: skip
        await wait_until(lambda: settled(redis), timeout=10)
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    assert due > time.time() - 10


async def test_relay_down_for_a_while_then_back(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.stop()
    for n in range(5):
        await enqueue(redis, send_message([f"u{n}@example.com"]))
    async with running_worker(make_config(redis_url, sink.url, retry_base=0.2, retry_cap=0.5)):
        await wait_until(lambda: _count_events(redis, "deferred", 5))
        await asyncio.sleep(1.0)  # a few more failed rounds while the relay is away
        sink.start()
        await wait_until(lambda: settled(redis))
    assert sorted(r.rcpt_tos[0] for r in sink.received) == [f"u{n}@example.com" for n in range(5)]
    assert await redis.xlen("email.send.dead") == 0
    deferred = [e for e in await events(redis) if e["event"] == "deferred"]
    assert deferred[0]["smtp_code"] == ""  # no reply: connection refused
    assert deferred[0]["smtp_text"] == ""  # what happened is in error, not the reply fields
    assert "connect" in deferred[0]["error"].lower()


async def test_disconnect_after_dot_is_retried(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """No reply to the final dot: delivery is unknown, so the message is tried again (the
    one case SMTP itself can duplicate)."""
    sink.drop_after_dot(1)
    await enqueue(redis, send_message(["ann@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert len(sink.dropped) == 1 and len(sink.received) == 1
    assert [e["event"] for e in await events(redis)] == ["deferred", "delivered"]


async def test_postfix_421_disconnect_on_data_is_retried(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    relay = make_postfix_sink("-Q", "DATA")
    await _deferred_until_the_relay_is_fixed(redis, redis_url, relay)
    assert len(relay.wait_for_dumps(1)) == 1


async def _deferred_until_the_relay_is_fixed(
    redis: aioredis.Redis, redis_url: str, relay: PostfixSink
) -> None:
    """One message and a worker: once the relay's fault has deferred it, the relay comes
    back on the same port without faults, and the worker settles the stream."""
    await enqueue(redis, send_message(["ann@example.com"]))
    async with running_worker(make_config(redis_url, relay.url, retry_base=0.5)):
        await wait_until(lambda: _has_event(redis, "deferred"))
        relay.stop()
        relay.start("-p")  # same port, no faults
        await wait_until(lambda: settled(redis))


async def _has_event(redis: aioredis.Redis, kind: str) -> bool:
    return await _count_events(redis, kind, 1)


async def _count_events(redis: aioredis.Redis, kind: str, count: int) -> bool:
    return sum(e["event"] == kind for e in await events(redis)) >= count


async def test_a_retry_promoter_that_dies_of_a_bug_says_so(
    redis: aioredis.Redis,
    redis_url: str,
    sink: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its partition's retries then wait for another worker's promoter or housekeeping: an
    operator must see why.  Sending goes on."""

    async def broken(self: Outcomes, now: float, limit: int = 100) -> int:
        raise ValueError("a bug in the promoter")

    monkeypatch.setattr(Outcomes, "promote_due", broken)
    await enqueue(redis, send_message(["ann@example.com"], message_id="m-promoter"))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert len(sink.received) == 1
    logged = "".join(capsys.readouterr())  # structlog's default output in tests: stdout
    assert "task_crashed" in logged and "a bug in the promoter" in logged
