"""A plain delivery's first settlement is a MULTI/EXEC transaction (real redis-server).

Most settlements only record accepted recipients and write their ``delivered`` events.  On
their first run they skip the settle function (Redis spends a third more CPU on it) and go as a
transaction of the same commands; they must leave exactly what the function leaves.  Any
other settlement, and every later run of one (which may find its first run applied), goes
through the function, whose acknowledgement check writes nothing twice.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from tests.delivery_util import enqueue, outcomes_for, send_message
from workers.streams import functions
from workers.streams.outcomes import Retry, Settlement, is_plain_delivery

SEND, EVENTS = "email.send", "email.send.events"


async def read_entries(redis: aioredis.Redis, count: int) -> list[str]:
    """``count`` entries read by the delivery group, with the functions library loaded (so
    that FCALL counts are the settlements')."""
    await functions.ensure_library(redis)
    await redis.xgroup_create(SEND, "delivery", id="0", mkstream=True)
    ids = [await enqueue(redis, send_message(["ann@example.com"])) for _ in range(count)]
    await redis.xreadgroup("delivery", "w1", {SEND: ">"})
    return ids


def delivered(entry_id: str, message_id: str) -> Settlement:
    return Settlement(
        entry_id=entry_id,
        message_id=message_id,
        accepted=["ann@example.com", "bob@example.com"],
        events=[{"event": "delivered", "id": message_id, "recipients": "[2]", "time": "1.5"}],
    )


async def commands_run(redis: aioredis.Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {n: int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in ("fcall", "exec")}


async def record(redis: aioredis.Redis, message_id: str) -> tuple[dict[bytes, bytes], bool]:
    """The record's recipients with the time they were accepted, and whether it has a TTL
    (each value names its entry too: checked by record_names)."""
    key = f"mailpool:sent:{message_id}"
    marks = await redis.hgetall(key)
    times = {rcpt: mark.partition(b" ")[0] for rcpt, mark in marks.items()}
    return times, 0 < await redis.ttl(key) <= 60


async def record_names(redis: aioredis.Redis, message_id: str, entry_id: str) -> bool:
    """Every value of the record names ``entry_id``, the entry whose send it records."""
    marks = await redis.hvals(f"mailpool:sent:{message_id}")
    return bool(marks) and all(mark.endswith(b" " + entry_id.encode()) for mark in marks)


async def test_a_first_run_transaction_leaves_what_the_function_leaves(
    redis: aioredis.Redis,
) -> None:
    by_transaction, by_function = await read_entries(redis, 2)
    outcomes = outcomes_for(redis)
    try:
        first = await commands_run(redis)
        assert await outcomes.settle([delivered(by_transaction, "t")], 1.0, first_run=True) == [
            True
        ]
        second = await commands_run(redis)
        assert await outcomes.settle([delivered(by_function, "f")], 1.0) == [True]
        third = await commands_run(redis)
    finally:
        await outcomes.aclose()
    assert second["exec"] - first["exec"] == 1 and second["fcall"] == first["fcall"]
    assert third["fcall"] - second["fcall"] == 1 and third["exec"] == second["exec"]
    assert (await redis.xpending(SEND, "delivery"))["pending"] == 0
    assert await record(redis, "t") == await record(redis, "f")
    assert await record_names(redis, "t", by_transaction)
    assert await record_names(redis, "f", by_function)
    assert (await record(redis, "t"))[1], "the record has no TTL"
    events = [fields for _, fields in await redis.xrange(EVENTS)]
    assert events[0] == {**events[1], b"id": b"t"}
    assert len(events) == 2


async def test_a_rerun_of_an_applied_transaction_writes_nothing_more(
    redis: aioredis.Redis,
) -> None:
    """The transaction was applied and its reply lost: the settler's second run is not a
    first run, and the function finds the entry acknowledged."""
    [entry_id] = await read_entries(redis, 1)
    outcomes = outcomes_for(redis)
    try:
        assert await outcomes.settle([delivered(entry_id, "m")], 1.0, first_run=True) == [True]
        assert await outcomes.settle([delivered(entry_id, "m")], 2.0) == [False]
    finally:
        await outcomes.aclose()
    assert await redis.xlen(EVENTS) == 1
    assert (await record(redis, "m"))[0] == {b"ann@example.com": b"1.0", b"bob@example.com": b"1.0"}


async def test_settlements_with_more_than_deliveries_take_the_function_on_a_first_run(
    redis: aioredis.Redis,
) -> None:
    ids = await read_entries(redis, 3)
    failed = Settlement(entry_id=ids[0], message_id="a", events=[{"event": "failed"}])
    retry = Settlement(entry_id=ids[1], message_id="b", accepted=["ann@example.com"],
                       retry=Retry(due=9.0, fields={"data": b"d"}),
                       events=[{"event": "delivered"}])  # fmt: skip
    nothing_accepted = Settlement(entry_id=ids[2], message_id="c")
    settlements = [failed, retry, nothing_accepted]
    assert not any(map(is_plain_delivery, settlements))
    outcomes = outcomes_for(redis)
    before = await commands_run(redis)
    try:
        assert await outcomes.settle(settlements, 1.0, first_run=True) == [True] * 3
    finally:
        await outcomes.aclose()
    after = await commands_run(redis)
    assert after["fcall"] - before["fcall"] == 3 and after["exec"] == before["exec"]
    assert await redis.zcard("mailpool:retry") == 1


async def test_a_transaction_that_fails_in_part_reports_an_error_and_its_batch_stays_in_step(
    redis: aioredis.Redis,
) -> None:
    """The events key is not a stream: the event's XADD fails inside EXEC.  That settlement
    is reported failed (the settler runs it again), and the replies of the settlements after
    it in the same batch are still read as theirs."""
    first, second = await read_entries(redis, 2)
    await redis.set(EVENTS, "not a stream")
    outcomes = outcomes_for(redis)
    try:
        results = await outcomes.settle(
            [delivered(first, "x"), Settlement(entry_id=second, message_id="y")],
            1.0,
            first_run=True,
        )
    finally:
        await outcomes.aclose()
    assert isinstance(results[0], Exception) and "WRONGTYPE" in str(results[0])
    assert results[1] is True


async def test_a_user_refused_transactions_settles_through_the_function(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """An ACL file from before the transactions: the start-up check finds MULTI refused, and
    first runs take the function (refused MULTI/EXEC would run the commands one by one)."""
    [entry_id] = await read_entries(redis, 1)
    await redis.acl_setuser(
        "old-delivery", enabled=True, nopass=True, keys=["*"],
        commands=["+@all", "-multi", "-exec", "-discard"],
    )  # fmt: skip
    user = aioredis.Redis.from_url(redis_url, username="old-delivery", password="x")
    outcomes = outcomes_for(user)
    try:
        await outcomes.check_transactions()
        assert outcomes.transactions is False
        before = await commands_run(redis)
        assert await outcomes.settle([delivered(entry_id, "m")], 1.0, first_run=True) == [True]
        after = await commands_run(redis)
    finally:
        await outcomes.aclose()
        await user.aclose()
    assert after["fcall"] - before["fcall"] == 1 and after["exec"] == before["exec"]
    assert await redis.xlen(EVENTS) == 1


async def test_plain_deliveries_of_one_batch_share_one_transaction_in_order(
    redis: aioredis.Redis,
) -> None:
    """A transaction per batch, not per message: MULTI and EXEC once for each run of plain
    deliveries; a settlement that takes the function between them ends one run."""
    ids = await read_entries(redis, 5)
    retry = Settlement(entry_id=ids[2], message_id="c", retry=Retry(due=9.0, fields={"data": b"d"}))
    batch = [delivered(ids[0], "a"), delivered(ids[1], "b"), retry]
    batch += [delivered(ids[3], "d"), delivered(ids[4], "e")]
    outcomes = outcomes_for(redis)
    before = await commands_run(redis)
    try:
        assert await outcomes.settle(batch, 1.0, first_run=True) == [True] * 5
    finally:
        await outcomes.aclose()
    after = await commands_run(redis)
    assert after["exec"] - before["exec"] == 2 and after["fcall"] - before["fcall"] == 1
    assert (await redis.xpending(SEND, "delivery"))["pending"] == 0
    for message_id in "abde":
        assert (await record(redis, message_id))[1], f"{message_id} has no record with a TTL"
    events = [fields[b"id"] for _, fields in await redis.xrange(EVENTS)]
    assert events == [b"a", b"b", b"d", b"e"]


async def test_one_settlement_failing_inside_the_transaction_leaves_the_others_applied(
    redis: aioredis.Redis,
) -> None:
    """One message's record key holds a string: its HSETNX fails inside EXEC.  That one is
    reported (the settler runs it again through the function), the others before and
    after it in the same transaction stand."""
    ids = await read_entries(redis, 3)
    await redis.set("mailpool:sent:b", "an operator's key")
    outcomes = outcomes_for(redis)
    try:
        batch = [delivered(entry_id, name) for entry_id, name in zip(ids, "abc", strict=True)]
        results = await outcomes.settle(batch, 1.0, first_run=True)
    finally:
        await outcomes.aclose()
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], Exception) and "WRONGTYPE" in str(results[1])
    assert (await record(redis, "a"))[0] and (await record(redis, "c"))[0]


async def test_a_transaction_refused_at_queueing_applies_none_of_its_settlements(
    redis: aioredis.Redis,
) -> None:
    """Out of memory, Redis refuses the writes as they are queued and EXEC aborts: every
    settlement of the transaction reports the error and none is half applied; the
    settler's next run (the function) applies them all."""
    ids = await read_entries(redis, 3)
    batch = [delivered(entry_id, name) for entry_id, name in zip(ids, "abc", strict=True)]
    outcomes = outcomes_for(redis)
    await redis.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        results = await outcomes.settle(batch, 1.0, first_run=True)
        await redis.config_set("maxmemory", 0)
        assert len(results) == 3
        assert all(isinstance(r, OutOfMemoryError) for r in results), results
        assert (await redis.xpending(SEND, "delivery"))["pending"] == 3
        assert await redis.xlen(EVENTS) == 0
        assert await outcomes.settle(batch, 2.0) == [True] * 3
    finally:
        await redis.config_set("maxmemory", 0)
        await outcomes.aclose()
    assert await redis.xlen(EVENTS) == 3
