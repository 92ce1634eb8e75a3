"""Idempotency records: a message id is sent at most once per recipient, whatever route
brings it back (producer enqueuing twice, retries, replays); and the Redis moves between
in progress, waiting and dead are atomic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

import workers.delivery.worker
import workers.streams.outcomes
from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    outcomes_for,
    run_until_settled,
    running_worker,
    send_message,
)
from tests.harness import wait_until
from tests.schema_util import schema_violations
from tests.sinks import RecordingSink
from workers.streams.connection import connect
from workers.streams.outcomes import Retry, Settlement


async def test_same_id_enqueued_twice_is_sent_once(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Each entry gets its outcome all the same: the copies a ``delivered`` event marked
    ``already_sent`` (they had none, and a producer following its entry id waited for
    ever; found by a review of the contract)."""
    message = send_message(["ann@example.com", "bob@example.com"], message_id="order-42")
    first = await enqueue(redis, message)
    again = await enqueue(redis, message)  # a producer retrying after a timeout, same batch
    await run_until_settled(redis, make_config(redis_url, sink.url))
    later = await enqueue(redis, message)  # and once more, much later
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert sink.recipient_counts() == {
        (sink.received[0].message_id, "ann@example.com"): 1,
        (sink.received[0].message_id, "bob@example.com"): 1,
    }
    outcomes = [(e["event"], e["source_id"], e.get("already_sent")) for e in await events(redis)]
    assert outcomes == [
        ("delivered", first, None), ("delivered", again, "1"), ("delivered", later, "1")
    ]  # fmt: skip
    assert all(e["recipients"] == ["ann@example.com", "bob@example.com"]
               for e in await events(redis))  # fmt: skip
    assert schema_violations("event", await redis.xrange("email.send.events")) == []


async def test_recipients_recorded_as_sent_are_skipped(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """A redelivered entry whose message id was already accepted for some recipients (the
    record outlives the entry) goes only to the others."""
    await redis.hset("mailpool:sent:m-7", "ann@example.com", "1700000000.0")
    await enqueue(redis, send_message(["ann@example.com", "bob@example.com"], message_id="m-7"))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [("bob@example.com",)]
    assert await redis.hkeys("mailpool:sent:m-7") == [b"ann@example.com", b"bob@example.com"]


async def test_settlement_applies_once(redis: aioredis.Redis) -> None:
    """Two workers settling the same entry (one claimed it from the other): the second
    records its sends but adds no dead letter or retry, so the entry is never both waiting
    and dead, or waiting twice."""
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    entry_id = await enqueue(redis, send_message())
    await redis.xreadgroup("delivery", "a", {"email.send": ">"})
    outcomes = outcomes_for(redis)
    retry = Settlement(
        entry_id=entry_id,
        message_id="m1",
        accepted=["ann@example.com"],
        retry=Retry(due=1e12, fields={"data": b"x"}),
    )
    dead = Settlement(
        entry_id=entry_id,
        message_id="m1",
        accepted=["bob@example.com"],
        dead_letters=[{"data": b"x", "reason": "expired"}],
    )
    assert await outcomes.settle([retry], now=1.0) == [True]
    assert await outcomes.settle([dead], now=2.0) == [False]
    assert await redis.xlen("email.send.dead") == 0
    assert await redis.zcard("mailpool:retry") == 1
    assert sorted(await redis.hkeys("mailpool:sent:m1")) == [b"ann@example.com", b"bob@example.com"]
    assert 0 < await redis.ttl("mailpool:sent:m1") <= 60


async def test_concurrent_promoters_move_each_retry_once(redis: aioredis.Redis) -> None:
    outcomes = [outcomes_for(redis) for _ in range(4)]
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    for n in range(50):
        entry_id = await enqueue(redis, send_message())
        await redis.xreadgroup("delivery", "a", {"email.send": ">"}, count=1)
        s = Settlement(
            entry_id=entry_id,
            message_id=f"m{n}",
            retry=Retry(due=10.0, fields={"data": b"x", "n": n}),
        )
        await outcomes[0].settle([s], now=1.0)
    before = await redis.xlen("email.send")
    moved = await asyncio.gather(*(o.promote_due(now=20.0, limit=7) for o in outcomes * 5))
    assert sum(moved) == 50
    assert await redis.xlen("email.send") == before + 50
    assert await redis.zcard("mailpool:retry") == 0
    assert await redis.keys("mailpool:retry:*") == []
    added = await redis.xrange("email.send", min="(" + entry_id)
    assert sorted(int(f[b"n"]) for _, f in added) == list(range(50))


async def test_settlement_survives_a_flushed_function_library(redis: aioredis.Redis) -> None:
    """A Redis that lost its functions (FUNCTION FLUSH, restarted without its data): a user
    allowed FUNCTION LOAD loads the library again and the settlement is applied once."""
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    entry_id = await enqueue(redis, send_message())
    await redis.xreadgroup("delivery", "a", {"email.send": ">"})
    outcomes = outcomes_for(redis)
    await redis.function_flush()
    assert await outcomes.settle(
        [Settlement(entry_id=entry_id, message_id="m2", accepted=["ann@example.com"])], 1.0
    ) == [True]
    mark = f"1.0 {entry_id}".encode()  # when accepted, and the entry whose send it was
    assert await redis.hgetall("mailpool:sent:m2") == {b"ann@example.com": mark}
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0


async def test_settlements_after_an_idle_spell_survive_a_server_side_timeout(
    redis: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis closes idle clients (``timeout``); the held settlement connection is checked
    again after an idle spell, so the next settlement does not fail on a dead socket."""
    monkeypatch.setattr(workers.streams.outcomes, "SETTLE_IDLE_CHECK", 0.5)
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    ids = [await enqueue(redis, send_message(message_id=f"idle{n}")) for n in range(2)]
    await redis.xreadgroup("delivery", "a", {"email.send": ">"})
    client = connect(redis_url)  # reconnects by itself, unlike the fixture's client
    outcomes = outcomes_for(client)
    await client.config_set("timeout", 1)
    try:
        assert await outcomes.settle(
            [Settlement(entry_id=ids[0], message_id="idle0", accepted=["ann@example.com"])], 1.0
        )
        await asyncio.sleep(2.5)  # the server closes the idle settlement connection
        assert await outcomes.settle(
            [Settlement(entry_id=ids[1], message_id="idle1", accepted=["ann@example.com"])], 2.0
        )
        assert (await client.xpending("email.send", "delivery"))["pending"] == 0
    finally:
        await client.config_set("timeout", 0)
        await outcomes.aclose()
        await client.aclose()


async def test_entries_with_the_same_id_wait_their_turn_and_each_recipient_gets_one_copy(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Many entries with one id in one batch, fewer lanes than entries: the owner goes first
    (the lanes take entries in order), the others wait for its record, none deadlocks."""
    for rcpt in ["a@example.com", "b@example.com", "a@example.com", "c@example.com"] * 3:
        await enqueue(redis, send_message([rcpt], message_id="same"))
    await enqueue(redis, send_message(["z@example.com"], message_id="other"))
    await run_until_settled(redis, make_config(redis_url, sink.url, concurrency=2), timeout=10)
    got = sorted(r for received in sink.received for r in received.rcpt_tos)
    assert got == ["a@example.com", "b@example.com", "c@example.com", "z@example.com"]


async def test_a_crash_after_a_send_gives_back_the_message_id(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug after the send of an entry that had waited for its message id: the lane
    survives, the entry stays pending, and later entries with that id are not blocked."""
    real = workers.delivery.worker.settle_attempt
    crashed: list[str] = []

    def crash_once(p: Any, *args: Any, **kwargs: Any) -> Any:
        if p.built.recipients == ["b@example.com"] and not crashed:
            crashed.append(p.job.entry_id)
            raise RuntimeError("injected bug")
        return real(p, *args, **kwargs)

    monkeypatch.setattr(workers.delivery.worker, "settle_attempt", crash_once)
    for rcpt in ["a@example.com", "b@example.com", "c@example.com"]:
        await enqueue(redis, send_message([rcpt], message_id="crash"))

    async def all_three() -> bool:
        return len(sink.received) >= 3

    async with running_worker(make_config(redis_url, sink.url, concurrency=3)):
        await wait_until(all_three, timeout=10)
    assert crashed
    assert sorted(r for received in sink.received for r in received.rcpt_tos) == [
        "a@example.com", "b@example.com", "c@example.com",
    ]  # fmt: skip
