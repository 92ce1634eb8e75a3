"""The settlement connection dropped (``CLIENT KILL``) while batches of settlements run.

Redis applies part of a batch, the connection dies before the replies are read, and the
settler sends the whole batch again: the settlements Redis had applied run a second time.
Guarantee: exactly one event per outcome, one dead letter per dead recipient set, one retry
per deferred entry, every entry acknowledged once.  The scenario counts the settlement calls
Redis executed (``INFO commandstats``) to prove that applied settlements really ran again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from tests.chaos.scenario import size
from workers.delivery import Settler
from workers.streams.layout import MessageRef, StreamKeys, dead_letter, event
from workers.streams.outcomes import Outcomes, Retry, Settlement

ENTRIES = size(2000, 20_000)
KILLS = size(6, 30)
TIMEOUT = 60.0 if ENTRIES > 2000 else 15.0


@dataclass(frozen=True)
class Reply:
    code: int | None
    text: str


def settlement_for(n: int, entry_id: str) -> Settlement:
    """Every 5th entry also has a dead letter, every 7th a retry; each outcome an event
    (built as delivery builds them, so the chaos suite's schema check holds)."""
    now = time.time()
    ref = MessageRef(message_id=f"m{n}", source_id=entry_id or "1-0", data=b"x")
    s = Settlement(entry_id=entry_id, message_id=ref.message_id, accepted=[f"r{n}@example.com"])
    s.events.append(event("delivered", ref, [f"r{n}@example.com"], Reply(250, "ok"), now))
    if n % 5 == 0:
        dead = [f"d{n}@example.com"]
        s.dead_letters.append(dead_letter(
            ref, reason="rejected", error="550 no", recipients=dead, attempts=1,
            first_attempt=now, last_attempt=now, reply=Reply(550, "no"),
        ))  # fmt: skip
        s.events.append(event("failed", ref, dead, Reply(550, "no"), now))
    if n % 7 == 0:
        later = [f"t{n}@example.com"]
        s.retry = Retry(due=now + 3600, fields={"data": b"x", "message_id": ref.message_id})
        s.events.append(event("deferred", ref, later, Reply(451, "later"), now,
                              next_attempt=now + 3600))  # fmt: skip
    return s


async def settlement_calls(redis: aioredis.Redis) -> int:
    """Settlement runs Redis executed: FCALL (EVALSHA for the scripts of old) and EXEC (a
    plain delivery's first run is a transaction)."""
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("fcall", "evalsha", "exec")
    )


async def kill_mid_batch(redis: aioredis.Redis, total: int, done: asyncio.Event) -> list[int]:
    """CLIENT KILL every other client whenever some but not all entries are settled and
    more have been settled since the last kill; returns the pending counts at each kill."""
    at_kills: list[int] = []
    last = total
    while not done.is_set() and len(at_kills) < KILLS:
        pending = int((await redis.xpending("email.send", "delivery"))["pending"])
        if 0 < pending < last:
            await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            at_kills.append(pending)
            last = pending
        await asyncio.sleep(0.0005)
    return at_kills


@pytest.mark.timeout(120)
async def test_settlements_resent_after_a_dropped_connection_write_once(
    redis: aioredis.Redis, redis_url: str
) -> None:
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(ENTRIES):
            pipe.xadd("email.send", {"data": b"x", "n": n})
        await pipe.execute()
    read = await redis.xreadgroup("delivery", "w1", {"email.send": ">"}, count=ENTRIES)
    entry_ids = [entry_id.decode() for entry_id, _ in read[0][1]]
    worker = aioredis.Redis.from_url(redis_url)  # no client-side retry: the settler retries
    outcomes = Outcomes(worker, StreamKeys(), group="delivery",
                        sent_ttl=600, events_maxlen=10 * ENTRIES)  # fmt: skip
    crashed: list[bool] = []
    settler = Settler(outcomes, lambda: crashed.append(True))
    applied: collections.Counter[str] = collections.Counter()
    calls_before = await settlement_calls(redis)
    done = asyncio.Event()
    killer = asyncio.create_task(kill_mid_batch(redis, ENTRIES, done))
    settler.start()
    try:
        for n, entry_id in enumerate(entry_ids):
            settler.submit(settlement_for(n, entry_id), lambda s: applied.update([s.entry_id]))
            if n % 100 == 99:
                await asyncio.sleep(0)  # batches of about a hundred, as sends finish
        deadline = time.monotonic() + TIMEOUT
        while len(applied) < ENTRIES and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        done.set()
        at_kills = await killer
        await settler.close(5.0)
        await outcomes.aclose()
        await worker.aclose()
    assert not crashed
    assert len(applied) == ENTRIES and set(applied.values()) == {1}
    reruns = await settlement_calls(redis) - calls_before - ENTRIES
    print(f"kills mid-batch: {len(at_kills)}, settlements run again: {reruns}")
    assert at_kills, "no kill landed while some but not all entries were settled"
    assert reruns > 0, "no applied settlement ran again: the scenario proved nothing"

    assert (await redis.xpending("email.send", "delivery"))["pending"] == 0
    events = collections.Counter(
        (f[b"id"], f[b"event"]) for _, f in await redis.xrange("email.send.events")
    )
    expected = collections.Counter()
    for n in range(ENTRIES):
        s = settlement_for(n, "")
        expected.update((str(e["id"]).encode(), str(e["event"]).encode()) for e in s.events)
    duplicates = sum(count - 1 for count in events.values() if count > 1)
    print(f"events: {sum(events.values())} for {sum(expected.values())} outcomes")
    assert duplicates == 0, f"{duplicates} events written twice"
    assert events == expected
    dead = [f[b"message_id"] for _, f in await redis.xrange("email.send.dead")]
    assert sorted(dead) == sorted(f"m{n}".encode() for n in range(0, ENTRIES, 5))
    assert await redis.zcard("mailpool:retry") == len(range(0, ENTRIES, 7))
