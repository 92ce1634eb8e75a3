"""Entries that are not valid sends are dead letters at once (reason invalid): no crash, no
retry loop; trimmed pending entries are acknowledged; poison entries are dead-lettered."""

from __future__ import annotations

import json

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
from tests.sinks import RecordingSink


async def test_invalid_entries_are_dead_lettered_and_the_worker_goes_on(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    injected = send_message(["ann@example.com"], subject="Hi\r\nBcc: victim@example.net")
    no_recipients = send_message(["ann@example.com"])
    no_recipients["to"] = []
    bad = {
        "not msgpack": b"\xc1\xc1 this is not msgpack",
        "not a map": pack([1, 2, 3]),  # type: ignore[arg-type]
        "schema": no_recipients,
        "injection": injected,
    }
    ids = {name: await enqueue(redis, data) for name, data in bad.items()}
    ids["no data field"] = (await redis.xadd("email.send", {"payload": b"x"})).decode()
    good = await enqueue(redis, send_message(["good@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    dead = {d["source_id"]: d for d in await stream_fields(redis, "email.send.dead")}
    assert set(dead) == set(ids.values())
    for name, entry_id in ids.items():
        assert dead[entry_id]["reason"] == "invalid", name
        assert dead[entry_id]["attempts"] == "0", name
        assert dead[entry_id]["error"], name
        assert "smtp_code" not in dead[entry_id], name  # no server was asked
    assert dead[ids["not msgpack"]]["data"] == bad["not msgpack"]  # untouched bytes
    assert json.loads(dead[ids["injection"]]["recipients"]) == ["ann@example.com"]
    # only the good message went out; nothing is waiting for a retry
    assert [r.rcpt_tos for r in sink.received] == [("good@example.com",)]
    assert await redis.zcard("mailpool:retry") == 0
    failed = [e for e in await events(redis) if e["event"] == "failed"]
    assert len(failed) == 5
    # No server answered, so the event says why, as the schema has it (it said nothing).
    assert all(e["error"].startswith("invalid: ") and e["smtp_code"] == "" for e in failed)
    assert good not in dead


async def test_an_invalid_send_is_filed_under_its_id(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """A producer follows its sends by ``id``: the dead letter and the ``failed`` event of
    one that fails validation carry it (before, the entry id)."""
    message = send_message(["ann@example.com"], message_id="order-77")
    message["dsn"] = {"ret": "hdrs"}  # type: ignore[typeddict-unknown-key]  # not FULL/HDRS
    entry_id = await enqueue(redis, message)
    await run_until_settled(redis, make_config(redis_url, sink.url))
    [dead] = await stream_fields(redis, "email.send.dead")
    assert (dead["reason"], dead["message_id"], dead["source_id"]) == (
        "invalid", "order-77", entry_id
    )  # fmt: skip
    [failed] = [e for e in await events(redis) if e["event"] == "failed"]
    assert failed["id"] == "order-77"
    assert sink.received == []


async def test_trimmed_pending_entry_is_acknowledged(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    entry_id = await enqueue(redis, send_message(["gone@example.com"]))
    await redis.xreadgroup("delivery", "w1", {"email.send": ">"}, count=1)
    await redis.xdel("email.send", entry_id)  # trimmed while pending on w1
    assert (await redis.xpending("email.send", "delivery"))["pending"] == 1
    await run_until_settled(redis, make_config(redis_url, sink.url, consumer="w1"))
    assert sink.received == []
    assert await redis.xlen("email.send.dead") == 0


async def test_poison_entry_is_dead_lettered(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """An entry handed out more than --max-deliveries times without an outcome (it killed
    the workers that took it) is dead-lettered as poison instead of being tried again."""
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    message = send_message(["ann@example.com"], message_id="poison-1")
    entry_id = await enqueue(redis, message)
    await redis.xreadgroup("delivery", "crashed", {"email.send": ">"}, count=1)
    await redis.xclaim("email.send", "delivery", "w1", 0, [entry_id], retrycount=7)
    await run_until_settled(
        redis, make_config(redis_url, sink.url, consumer="w1", max_deliveries=5)
    )
    assert [r.message_id for r in sink.received] == []
    [dead] = await stream_fields(redis, "email.send.dead")
    assert dead["reason"] == "poison"
    assert dead["message_id"] == "poison-1"
    assert dead["data"] == pack(message)
    assert json.loads(dead["recipients"]) == ["ann@example.com"]
    [failed] = [e for e in await events(redis) if e["event"] == "failed"]
    assert failed["error"] == "poison: handed to consumers 8 times without an outcome"
