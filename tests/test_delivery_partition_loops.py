"""A delivery worker reading several partitions: when one partition's settler fails, the
worker stops as at a signal (sends in flight of the other partitions finish and are
settled) before it exits with the error.  When each partition had a loop of its own, the
clients were closed under the other loops while they were still sending.  A real
redis-server with two partitions and a recording relay that holds each message 0.4 s
before answering."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis

import workers.streams.outcomes as oc
from tests.delivery_util import make_config, pack, send_message
from tests.sinks import RecordingSink
from workers.delivery import SettlerCrashed, serve
from workers.streams import layout
from workers.streams.layout import StreamKeys

KEYS = layout.partitions(StreamKeys(), 2, tagged=True)


async def test_a_failing_partition_loop_lets_the_others_finish_their_sends(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    settle = oc.Outcomes.settle

    async def breaks_in_partition_1(
        self: oc.Outcomes, settlements: Sequence[oc.Settlement], now: float, **options: bool
    ) -> list[bool | oc.RedisError]:
        if self.keys.send == KEYS[1].send:
            await asyncio.to_thread(sink.data_arrived.wait, 10)  # partition 0 is sending
            raise ValueError("a bug in partition 1's settlement")
        return await settle(self, settlements, now, **options)

    monkeypatch.setattr(oc.Outcomes, "settle", breaks_in_partition_1)
    sink.stall_data = 0.4  # under the test configuration's --smtp-data-timeout (0.5 s)
    await redis.xadd(KEYS[0].send, {"data": pack(send_message(message_id="m0"))})
    await redis.xadd(KEYS[1].send, {"data": b"not msgpack"})  # settled at once: invalid
    stop = asyncio.Event()
    with pytest.raises(SettlerCrashed):
        await asyncio.wait_for(serve(make_config(redis_url, sink.url, partitions=2), stop), 15)
    assert [m.rcpt_tos for m in sink.received] == [("ann@example.com",)]
    assert (await redis.xpending(KEYS[0].send, "delivery"))["pending"] == 0
