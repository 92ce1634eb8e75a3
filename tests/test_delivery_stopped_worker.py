"""A worker whose process was stopped or starved (SIGSTOP, a paused VM) past the bound
``--claim-after`` rests on does not send what it held meanwhile: another worker may have
claimed, sent and recorded it.  An entry whose send has not started within
``--claim-after`` less one send's longest time of its read is handed back unsent."""

from __future__ import annotations

import asyncio
import threading
import time

import redis
import redis.asyncio as aioredis

from tests.delivery_util import enqueue, make_config, running_worker, send_message
from tests.harness import wait_until
from tests.sinks import RecordingSink


def _claims_what_w1_holds_but(redis_url: str, sending: str, after: float) -> threading.Thread:
    """Another worker, ``after`` seconds from now: claims the entries pending on w1 but the
    one it is ``sending`` (they look stale: w1 has not been heard of for that long), and
    settles them (as if it had sent them: not to this test's sink)."""

    def claim() -> None:
        time.sleep(after)
        with redis.Redis.from_url(redis_url) as other:
            rows = other.xpending_range("email.send", "delivery", "-", "+", 10, "w1")
            held = [r["message_id"] for r in rows if r["message_id"].decode() != sending]
            other.xclaim("email.send", "delivery", "w2", 0, held)
            other.xack("email.send", "delivery", *held)

    thread = threading.Thread(target=claim)
    thread.start()
    return thread


async def test_entries_held_past_their_start_time_are_handed_back_unsent(
    redis_url: str, redis: aioredis.Redis, sink: RecordingSink
) -> None:
    sink.stall_data = 0.3  # the first send is in flight a while; the second waits for it
    # FAST: --claim-after 2.5, one send at most 0.5 + 0.5 s: a send starts within 1.5 s.
    config = make_config(redis_url, f"smtp://127.0.0.1:{sink.port}", concurrency=1)
    ids = [await enqueue(redis, send_message(subject=f"m{n}")) for n in range(4)]
    async with running_worker(config):
        await wait_until(sink.data_arrived.is_set, timeout=10)  # m0 in flight, m1 queued
        other = _claims_what_w1_holds_but(redis_url, ids[0], after=0.5)
        asyncio.get_running_loop().call_soon(time.sleep, 2.0)  # the worker stops 2 s
        await asyncio.sleep(0)
        other.join()
        await wait_until(lambda: len(sink.received) >= 3, timeout=10)
        await asyncio.sleep(1.0)  # what w1 would still send of m1
    subjects = sorted(r.message["Subject"] for r in sink.received)
    assert subjects == ["m0", "m2", "m3"]  # m1 is w2's now: w1 never sent it
