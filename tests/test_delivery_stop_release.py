"""A delivery worker stopping with entries in hand that it never started to send (queued
behind the sends in flight) releases them: another worker of the group claims and sends
them within seconds, not after ``--claim-after`` (about half an hour by default).  An entry
whose SMTP transaction had started, and was cut off by the stop, is not released: the relay
may have accepted it, and it keeps the ``--claim-after`` wait a worker that died leaves."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

import redis.asyncio as aioredis

from tests.delivery_util import enqueue, make_config, redis_stalled, running_worker, send_message
from tests.harness import RedisServer, wait_until
from tests.sinks import RecordingSink
from workers.delivery import serve
from workers.streams.connection import connect
from workers.streams.consumer import RELEASE_TIMEOUT, GroupConsumer

STALL = 4.0  # the first relay's answer to the final dot: the stopping worker's lanes stay busy
RELEASED_WITHIN = 4.0  # seconds after the stop: the other worker's claim looks every second


async def pending_on(redis: aioredis.Redis) -> dict[str, tuple[str, float]]:
    """Entry id -> (the consumer it is pending on, seconds idle), for the delivery group."""
    rows = await redis.xpending_range("email.send", "delivery", min="-", max="+", count=100)
    pending = {}
    for row in rows:
        consumer, idle = cast(bytes, row["consumer"]), cast(int, row["time_since_delivered"])
        pending[cast(bytes, row["message_id"]).decode()] = (consumer.decode(), idle / 1000)
    return pending


def recipients(sink: RecordingSink) -> list[str]:
    return [rcpt for record in list(sink.received) for rcpt in record.rcpt_tos]


async def test_entries_not_started_at_stop_are_sent_by_another_worker_at_once(
    redis: aioredis.Redis, redis_url: str, make_sink: Callable[..., RecordingSink]
) -> None:
    slow, fast = make_sink(stall_data=STALL), make_sink()
    everyone = [f"u{n}@example.com" for n in range(4)]
    await redis.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    address_of = {
        await enqueue(redis, send_message([address], message_id=f"m{n}")): address
        for n, address in enumerate(everyone)
    }
    # Two lanes: two sends in flight, two entries queued behind them (the read-ahead).
    # --claim-after 0: the derived default, here 2 x (0.5 + 6) + 60 = 73 s.
    quitting = make_config(redis_url, slow.url, consumer="quitting", concurrency=2,
                           smtp_data_timeout=6.0, shutdown_grace=0.5, claim_after=0)  # fmt: skip
    stop_quitting = asyncio.Event()
    quitter = asyncio.create_task(serve(quitting, stop_quitting))
    try:
        await wait_until(lambda: _holds_all(redis, "quitting", 4), "four entries in hand")
        await wait_until(lambda: slow.ehlo_count >= 2, "both lanes sending")
        staying = make_config(redis_url, fast.url, consumer="staying", claim_after=0)
        assert staying.claim_after > 60  # the default: a stranded entry waits a minute here
        async with running_worker(staying):
            await asyncio.sleep(0.5)  # its first claim pass has found nothing to claim
            stop_quitting.set()
            await asyncio.wait_for(quitter, 10)
            stopped = time.monotonic()
            await wait_until(lambda: len(fast.received) >= 2, "released entries sent",
                             timeout=RELEASED_WITHIN)  # fmt: skip
            released_after = time.monotonic() - stopped
            await asyncio.sleep(1.5)  # more claim passes: a cut-off send would be taken now
            left = await pending_on(redis)
            released = recipients(fast)
    finally:
        stop_quitting.set()
        await asyncio.wait_for(quitter, 10)
    assert released_after < RELEASED_WITHIN
    # The two queued behind the sends were sent once each, by the other worker; the two
    # cut off in DATA were not sent again and wait on the stopped consumer, idle since their
    # read (not pushed past --claim-after).
    assert recipients(slow) == []  # the cut-off sends got no 250
    assert len(released) == 2, released
    assert [owner for owner, _ in left.values()] == ["quitting", "quitting"], left
    assert Counter(released + [address_of[entry_id] for entry_id in left]) == Counter(everyone)
    assert max(idle for _, idle in left.values()) < 30, left


async def _holds_all(redis: aioredis.Redis, consumer: str, count: int) -> bool:
    return [owner for owner, _ in (await pending_on(redis)).values()] == [consumer] * count


async def test_a_release_redis_does_not_answer_gives_up_within_a_second(
    make_redis: Callable[..., RedisServer],
) -> None:
    """Redis may be why a worker stops: a release it does not answer ends after
    RELEASE_TIMEOUT, and the entries stay pending on the consumer (at worst claimed after
    --claim-after, as without a release)."""
    server = make_redis()
    client = connect(server.url, retries=0)
    try:
        await enqueue(client, send_message())
        consumer = GroupConsumer(client, "email.send", "delivery", "quitting", claim_after=900)
        await consumer.ensure_group()
        entries = await consumer.read()
        with redis_stalled(server) as stalled_at:
            assert await consumer.release(entries) == 0
            gave_up_after = time.monotonic() - stalled_at
        assert RELEASE_TIMEOUT <= gave_up_after < RELEASE_TIMEOUT + 1.0
        await wait_until(lambda: _holds_all(client, "quitting", 1), "still pending on it")
    finally:
        await client.aclose()
