"""The listener API on a real redis-server: fan-out across groups, sharing inside a group,
start positions, recovery of entries left by a dead consumer, undecodable entries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis

from tests.harness import RedisServer
from tests.listen_util import next_message
from workers.codec.parse import parse_message
from workers.codec.wire import pack
from workers.listen import ListenedMessage, Listener

STREAM = "email.receive"


def raw_mail(n: int) -> bytes:
    return (
        f"From: a@example.com\r\nTo: b@example.com\r\nSubject: message {n}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nbody {n} é\r\n"
    ).encode()


async def add_received(redis: aioredis.Redis, n: int, stream: str = STREAM) -> str:
    message = parse_message(raw_mail(n), mail_from="a@example.com", rcpt_tos=["b@example.com"])
    entry_id = await redis.xadd(stream, {"data": pack(message)})
    return str(entry_id.decode())


async def drain(listener: Listener, expected: int) -> list[ListenedMessage]:
    return [await next_message(listener) for _ in range(expected)]


def quick(redis: aioredis.Redis, group: str, consumer: str, **kwargs: object) -> Listener:
    options: dict[str, object] = {"block": 0.05, "start": "all", **kwargs}
    return Listener(redis, group, consumer, **options)  # type: ignore[arg-type]


async def test_every_group_sees_every_message_and_consumers_of_a_group_share(
    redis: aioredis.Redis,
) -> None:
    ids = [await add_received(redis, n) for n in range(12)]
    a1 = quick(redis, "app-a", "a1", batch=2)
    a2 = quick(redis, "app-a", "a2", batch=2)
    b1 = quick(redis, "app-b", "b1")
    seen: dict[str, list[str]] = {"a1": [], "a2": []}
    async with a1, a2, b1:
        for _ in range(3):  # alternate: each read takes two entries, so both get work
            for name, listener in (("a1", a1), ("a2", a2)):
                for message in await drain(listener, 2):
                    seen[name].append(message.id)
                    await message.ack()
        group_b = await drain(b1, 12)
    assert seen["a1"] and seen["a2"]
    assert set(seen["a1"]).isdisjoint(seen["a2"])
    assert sorted(seen["a1"] + seen["a2"]) == ids
    assert [m.id for m in group_b] == ids
    assert [m.message["headers"]["subject"] for m in group_b if m.message] == [
        f"message {n}" for n in range(12)
    ]
    assert (await redis.xpending(STREAM, "app-a"))["pending"] == 0
    assert (await redis.xpending(STREAM, "app-b"))["pending"] == 12  # b1 never acked


async def test_decoded_message_has_spec_keys_and_body_bytes(redis: aioredis.Redis) -> None:
    entry_id = await add_received(redis, 7)
    async with quick(redis, "g", "c") as listener:
        message = await next_message(listener)
    assert (message.id, message.error, message.deliveries) == (entry_id, None, 1)
    assert message.message is not None
    assert message.message["from"] == "a@example.com"
    assert message.message["to"] == ["b@example.com"]
    assert message.message["content"]["body"] == "body 7 é\n".encode()


async def test_start_new_skips_history_and_start_all_replays_it(redis: aioredis.Redis) -> None:
    old = await add_received(redis, 1)
    async with quick(redis, "fresh", "c", start="new") as fresh, quick(redis, "hist", "c") as hist:
        new = await add_received(redis, 2)
        assert (await next_message(fresh)).id == new
        assert [m.id for m in await drain(hist, 2)] == [old, new]


async def test_existing_group_keeps_its_position_whatever_the_start(redis: aioredis.Redis) -> None:
    first = await add_received(redis, 1)
    async with quick(redis, "g", "c1", start="new") as listener:
        second = await add_received(redis, 2)
        await (await next_message(listener)).ack()
    async with quick(redis, "g", "c2", start="all") as again:  # "all" does not rewind a group
        third = await add_received(redis, 3)
        assert (await next_message(again)).id == third
    assert first < second < third


async def test_entries_of_a_dead_consumer_are_claimed_after_the_idle_time(
    redis: aioredis.Redis,
) -> None:
    entry_id = await add_received(redis, 1)
    async with quick(redis, "g", "dies", claim_after=0.3) as doomed:
        assert (await next_message(doomed)).id == entry_id  # read, never acknowledged
    started = asyncio.get_running_loop().time()
    async with quick(redis, "g", "survivor", claim_after=0.3) as survivor:
        claimed = await next_message(survivor)
        waited = asyncio.get_running_loop().time() - started
        assert (claimed.id, claimed.deliveries, claimed.error) == (entry_id, 2, None)
        await claimed.ack()
    assert waited >= 0.25  # not handed out before the idle time
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0


async def test_restarted_consumer_gets_its_own_pending_first(redis: aioredis.Redis) -> None:
    entry_id = await add_received(redis, 1)
    async with quick(redis, "g", "pod-1") as before:
        await next_message(before)
    async with quick(redis, "g", "pod-1") as after:  # no idle wait for its own entries
        message = await asyncio.wait_for(after.next(), 1.0)
    assert message is not None
    assert message.id == entry_id


async def test_undecodable_entries_are_yielded_with_an_error_and_iteration_goes_on(
    redis: aioredis.Redis,
) -> None:
    not_msgpack = (await redis.xadd(STREAM, {"data": b"\xc1\xff"})).decode()
    wrong_schema = (await redis.xadd(STREAM, {"data": pack({"to": "nobody"})})).decode()
    no_data = (await redis.xadd(STREAM, {"other": b"x"})).decode()
    good = await add_received(redis, 1)
    async with quick(redis, "g", "c") as listener:
        got = await drain(listener, 4)
        await listener.ack(*got)
    assert [m.id for m in got] == [not_msgpack, wrong_schema, no_data, good]
    assert [m.message is None for m in got] == [True, True, True, False]
    assert all(m.error for m in got[:3]) and got[3].error is None
    assert "data" in (got[2].error or "")
    assert got[0].data == b"\xc1\xff"
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0


async def test_unacknowledged_bad_entry_comes_back_counted_not_in_a_tight_loop(
    redis: aioredis.Redis,
) -> None:
    bad = (await redis.xadd(STREAM, {"data": b"junk"})).decode()
    async with quick(redis, "g", "c", claim_after=0.3) as listener:
        first = await next_message(listener)
        started = asyncio.get_running_loop().time()
        again = await next_message(listener)
        waited = asyncio.get_running_loop().time() - started
    assert (first.id, first.deliveries) == (bad, 1)
    assert (again.id, again.deliveries) == (bad, 2)
    assert again.error is not None
    assert waited >= 0.25  # only after the idle time, not at once


async def test_entry_trimmed_while_pending_is_reported(redis: aioredis.Redis) -> None:
    entry_id = await add_received(redis, 1)
    async with quick(redis, "g", "gone", claim_after=0.2) as first:
        await next_message(first)
    await redis.xdel(STREAM, entry_id)
    await asyncio.sleep(0.25)
    async with quick(redis, "g", "other", claim_after=0.2) as other:
        trimmed = await next_message(other)
        await trimmed.ack()
    assert (trimmed.id, trimmed.message, trimmed.data) == (entry_id, None, None)
    assert "trimmed" in (trimmed.error or "")


async def test_stop_ends_the_iteration_quickly(redis: aioredis.Redis) -> None:
    listener = quick(redis, "g", "c", block=0.2)
    collected: list[ListenedMessage] = []

    async def consume() -> None:
        async with listener:
            collected.extend([m async for m in listener])

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    listener.stop()
    await asyncio.wait_for(task, 1.0)
    assert collected == []


async def test_listener_rides_out_a_redis_restart(
    make_redis: Callable[..., RedisServer],
) -> None:
    server = make_redis(appendonly=True)
    redis = aioredis.Redis.from_url(server.url)
    try:
        async with quick(redis, "g", "c") as listener:
            await add_received(redis, 1)
            await (await next_message(listener)).ack()
            server.stop()
            waiting = asyncio.create_task(listener.next())
            await asyncio.sleep(0.5)  # the listener meets the outage and retries
            assert not waiting.done()
            server.start()
            later = await add_received(redis, 2)
            message = await asyncio.wait_for(waiting, 10)
            assert message is not None and message.id == later
    finally:
        await redis.aclose()


async def test_limit_reads_no_more_than_it_hands_out(redis: aioredis.Redis) -> None:
    ids = [await add_received(redis, n) for n in range(5)]
    async with quick(redis, "g", "script", limit=2, batch=100) as listener:
        got = [m.id async for m in listener]
    assert got == ids[:2]
    assert (await redis.xpending(STREAM, "g"))["pending"] == 2  # not five
    async with quick(redis, "g", "next-script") as other:
        assert [m.id for m in await drain(other, 3)] == ids[2:]


async def test_entries_read_but_not_handed_out_are_released_on_exit(
    redis: aioredis.Redis,
) -> None:
    ids = [await add_received(redis, n) for n in range(4)]
    async with quick(redis, "g", "quitter", batch=10) as quitter:
        taken = await next_message(quitter)  # reads all four, hands out one
    assert taken.id == ids[0]
    started = asyncio.get_running_loop().time()
    async with quick(redis, "g", "heir", claim_after=300) as heir:
        released = await drain(heir, 3)
    assert asyncio.get_running_loop().time() - started < 2  # not after claim_after
    assert [m.id for m in released] == ids[1:]
    assert [m.deliveries for m in released] == [2, 2, 2]
    rows = await redis.xpending_range(STREAM, "g", min="-", max="+", count=10)
    owners = {row["message_id"].decode(): row["consumer"].decode() for row in rows}
    assert owners[ids[0]] == "quitter"  # handed out, not acked: stays with its consumer


async def consumer_names(redis: aioredis.Redis, group: str) -> list[str]:
    return [c["name"].decode() for c in await redis.xinfo_consumers(STREAM, group)]


async def test_a_clean_exit_removes_the_consumer_only_when_nothing_is_pending(
    redis: aioredis.Redis,
) -> None:
    await add_received(redis, 1)
    await add_received(redis, 2)
    async with quick(redis, "g", "done-with-it", limit=1) as finished:
        await (await next_message(finished)).ack()
    async with quick(redis, "g", "holds-one") as holding:
        await next_message(holding)  # handed out, never acked
    assert await consumer_names(redis, "g") == ["holds-one"]  # kept: its entry comes back


async def test_an_exit_by_exception_keeps_the_consumer(redis: aioredis.Redis) -> None:
    await add_received(redis, 1)
    with contextlib.suppress(RuntimeError):
        async with quick(redis, "g", "crashed") as listener:
            await (await next_message(listener)).ack()
            raise RuntimeError("the application failed")
    assert await consumer_names(redis, "g") == ["crashed"]
