"""A settlement applied twice writes once (real redis-server).

The settler sends a settlement again when the connection dropped before its reply came
back, so a settlement Redis had already applied runs a second time.  That run, like one for
an entry another worker acknowledged first, must write no second event, dead letter or
retry, and must leave the idempotency record as the first run wrote it.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.delivery_util import enqueue, outcomes_for, send_message
from workers.streams.outcomes import Retry, Settlement


async def read_one(redis: aioredis.Redis) -> str:
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    entry_id = await enqueue(redis, send_message(["ann@example.com", "bob@example.com"]))
    await redis.xreadgroup("delivery", "w1", {"email.send": ">"})
    return entry_id


def every_kind(entry_id: str) -> Settlement:
    """ann accepted, bob deferred, a third recipient dead: events, dead letter and retry."""
    return Settlement(
        entry_id=entry_id,
        message_id="m1",
        accepted=["ann@example.com"],
        dead_letters=[{"data": b"d", "reason": "rejected", "recipients": '["cy@example.com"]'}],
        retry=Retry(due=100.0, fields={"data": b"d", "attempts": 1}),
        events=[{"event": "delivered", "id": "m1"}, {"event": "deferred", "id": "m1"}],
    )


async def snapshot(redis: aioredis.Redis) -> dict[str, object]:
    return {
        "events": await redis.xrange("email.send.events"),
        "dead": await redis.xrange("email.send.dead"),
        "retries": await redis.zrange("mailpool:retry", 0, -1, withscores=True),
        "sent": await redis.hgetall("mailpool:sent:m1"),
    }


async def test_the_same_settlement_twice_writes_its_events_dead_letter_and_retry_once(
    redis: aioredis.Redis,
) -> None:
    entry_id = await read_one(redis)
    outcomes = outcomes_for(redis)
    try:
        assert await outcomes.settle([every_kind(entry_id)], now=1.0) == [True]
        first = await snapshot(redis)
        retry_payload = await redis.hgetall(f"mailpool:retry:{entry_id}")
        await redis.zrem("mailpool:retry", entry_id)  # promoted meanwhile...
        await redis.delete(f"mailpool:retry:{entry_id}")
        # ...then the same settlement again, later (its first reply was lost).
        assert await outcomes.settle([every_kind(entry_id)], now=2.0) == [False]
    finally:
        await outcomes.aclose()
    again = await snapshot(redis)
    assert len(first["events"]) == 2 and len(first["dead"]) == 1  # type: ignore[arg-type]
    assert first["sent"] == {b"ann@example.com": b"1.0 " + entry_id.encode()}
    assert retry_payload == {b"data": b"d", b"attempts": b"1"}
    assert again["events"] == first["events"], "events written again"
    assert again["dead"] == first["dead"], "dead letter written again"
    assert again["retries"] == [], "a promoted retry was scheduled again"
    assert await redis.exists(f"mailpool:retry:{entry_id}") == 0
    assert again["sent"] == first["sent"], "the record of the first acceptance was rewritten"


async def test_an_entry_acknowledged_by_another_worker_gets_no_second_outcome(
    redis: aioredis.Redis,
) -> None:
    """A worker that claimed the entry settled it first: our late settlement records what
    our relay accepted (so no third copy is sent) and writes nothing else."""
    entry_id = await read_one(redis)
    await redis.xack("email.send", "delivery", entry_id)
    outcomes = outcomes_for(redis)
    try:
        assert await outcomes.settle([every_kind(entry_id)], now=1.0) == [False]
    finally:
        await outcomes.aclose()
    state = await snapshot(redis)
    assert state == {"events": [], "dead": [], "retries": [],
                     "sent": {b"ann@example.com": b"1.0 " + entry_id.encode()}}  # fmt: skip


async def test_a_settlement_of_an_entry_a_failover_left_unread_writes_its_events_once(
    redis: aioredis.Redis,
) -> None:
    """The read reached the old primary only: on the new one the entry is unread, so XACK
    finds nothing.  The sends happened: the accepted recipients' event is written (once,
    also when the settlement runs again); the other events, the dead letter and the retry
    are not, since the entry read again attempts the recipients not accepted."""
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    entry_id = await enqueue(redis, send_message(["ann@example.com", "bob@example.com"]))
    outcomes = outcomes_for(redis)
    try:
        assert await outcomes.settle([every_kind(entry_id)], now=1.0) == [True]
        assert await outcomes.settle([every_kind(entry_id)], now=2.0) == [False]
    finally:
        await outcomes.aclose()
    after = await snapshot(redis)
    assert [f[b"event"] for _, f in after["events"]] == [b"delivered"]  # type: ignore[attr-defined]
    assert after["dead"] == [] and after["retries"] == []
    assert after["sent"] == {b"ann@example.com": b"1.0 " + entry_id.encode()}
    # Still unread: the next read hands it out, and its recipients are found recorded.
    [[_, entries]] = await redis.xreadgroup("delivery", "w1", {"email.send": ">"})
    assert [e[0].decode() for e in entries] == [entry_id]
