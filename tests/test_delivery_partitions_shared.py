"""A delivery worker reading several partitions has one window and one set of lanes for all of
them: at most --concurrency sends in flight whatever the partition count, and each read
takes a whole window's room from one partition, as with one stream; a partition whose Redis
stalls or is down (at the start or later) is passed over while the others are read. Before,
each partition had a loop of its own with ceil(--concurrency / N) lanes (up to N - 1 sends
more than asked for) and reads N times smaller. A real redis-server, partitions tagged as on
a cluster, and a real SMTP sink."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
import redis.asyncio as aioredis

import workers.delivery
from tests.delivery_util import make_config, pack, running_worker, send_message
from tests.harness import free_port, silent_redis, wait_until
from tests.sinks import RecordingSink, TimedSink, most_at_once
from workers.delivery.worker import READ_BLOCK, read_block_ms
from workers.streams import layout
from workers.streams.consumer import GroupConsumer, StreamEntry
from workers.streams.layout import StreamKeys
from workers.streams.outcomes import Outcomes, SentLookup

KEYS = layout.partitions(StreamKeys(), 2, tagged=True)


async def enqueue_in_partitions(redis: aioredis.Redis, partitions: int, each: int) -> None:
    for p, keys in enumerate(layout.partitions(StreamKeys(), partitions, tagged=True)):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(each):
                message = send_message([f"p{p}n{n}@example.com"], message_id=f"p{p}-{n}")
                pipe.xadd(keys.send, {"data": pack(message)})
            await pipe.execute()


async def test_sends_in_flight_never_exceed_concurrency_across_partitions(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """--concurrency 10 over 4 partitions: 10 DATA phases at once at the relay, never 12."""
    sink = TimedSink(stall_data=0.3)
    sink.start()
    try:
        await enqueue_in_partitions(redis, partitions=4, each=10)
        config = make_config(redis_url, sink.url, partitions=4, concurrency=10)
        async with running_worker(config):
            await wait_until(lambda: len(sink.spans) == 40, "all 40 sent", timeout=20)
    finally:
        sink.stop()
    assert most_at_once(sink.spans) == 10


async def test_each_read_fills_the_windows_room_whatever_the_partition_count(
    redis: aioredis.Redis,
    redis_url: str,
    sink: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 partitions of 60 entries, --concurrency 10: a read is made once the window of 20
    has room for 10, and takes all the room there is from one partition."""
    sizes: list[int] = []
    read_new = GroupConsumer.read_new

    async def recorded(self: GroupConsumer) -> list[StreamEntry]:
        entries = await read_new(self)
        if entries:
            sizes.append(len(entries))
        return entries

    monkeypatch.setattr(GroupConsumer, "read_new", recorded)
    await enqueue_in_partitions(redis, partitions=3, each=60)
    config = make_config(redis_url, sink.url, partitions=3, concurrency=10)
    async with running_worker(config):
        await wait_until(lambda: len(sink.received) == 180, "all 180 sent", timeout=30)
    assert sum(sizes) == 180
    assert sum(sizes) / len(sizes) >= 10, sizes  # a partition's last read may be short


def test_reads_wait_for_new_entries_only_once_every_partition_came_back_empty() -> None:
    one_stream = round(READ_BLOCK * 1000)
    assert read_block_ms(1, 0) == read_block_ms(1, 5) == one_stream
    assert read_block_ms(4, 0) is None  # entries came lately: look at the next at once
    assert read_block_ms(4, 3) is None
    assert read_block_ms(4, 4) == one_stream // 4  # a whole turn empty: idle


def with_partition_1_at(monkeypatch: pytest.MonkeyPatch, redis_url: str, elsewhere: str) -> None:
    """``serve`` connects partition 0 to ``redis_url`` and partition 1 to ``elsewhere``, as
    two shards' primaries of a cluster would be."""

    def clients(
        url: str, partitions: object, make: Callable[..., aioredis.Redis], **options: object
    ) -> list[aioredis.Redis]:
        return [make(redis_url, **options), make(elsewhere, **options)]

    monkeypatch.setattr(workers.delivery, "partition_clients", clients)


async def enqueue_in_partition_0(redis: aioredis.Redis, count: int) -> None:
    for n in range(count):
        message = send_message([f"u{n}@example.com"], message_id=f"s{n}")
        await redis.xadd(KEYS[0].send, {"data": pack(message)})


async def test_a_partition_whose_redis_stalls_from_the_start_holds_up_no_other(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partition 1's Redis takes connections and never answers, from the start: partition
    0's group is created and its 30 messages go out all the same (a step on partition 1
    waits a deadline, not the 5 s socket timeout, and it is then passed over)."""
    await enqueue_in_partition_0(redis, 30)
    async with silent_redis() as stalled_url:
        with_partition_1_at(monkeypatch, redis_url, stalled_url)
        config = make_config(redis_url, sink.url, partitions=2, concurrency=2)
        async with running_worker(config):
            await wait_until(lambda: len(sink.received) == 30, "all 30 sent", timeout=20)
    assert (await redis.xpending(KEYS[0].send, "delivery"))["pending"] == 0


async def test_a_partition_whose_redis_is_down_at_start_holds_up_no_other(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue_in_partition_0(redis, 5)
    with_partition_1_at(monkeypatch, redis_url, f"redis://127.0.0.1:{free_port()}/0")
    config = make_config(redis_url, sink.url, partitions=2, concurrency=2)
    async with running_worker(config):
        await wait_until(lambda: len(sink.received) == 5, "all 5 sent", timeout=10)


async def test_a_stalled_idempotency_check_holds_up_no_other_partition(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partition 1's look-up of what was sent before hangs (its shard stalls after the
    read): partition 0's messages go out while it waits its deadline and is passed over."""
    look_up = Outcomes.look_up

    async def stalls_in_partition_1(
        self: Outcomes, wanted: Sequence[SentLookup], addresses: Sequence[str]
    ) -> tuple[list[set[str]], list[float | None]]:
        if self.keys.send == KEYS[1].send:
            await asyncio.sleep(60)
        return await look_up(self, wanted, addresses)

    monkeypatch.setattr(Outcomes, "look_up", stalls_in_partition_1)
    message = send_message(["late@example.com"], message_id="looked-up")  # an id: looked up
    await redis.xadd(KEYS[1].send, {"data": pack(message)})
    await enqueue_in_partition_0(redis, 10)
    config = make_config(redis_url, sink.url, partitions=2, concurrency=2)
    async with running_worker(config):
        await wait_until(lambda: len(sink.received) == 10, "partition 0 sent", timeout=8)
    assert all(m.rcpt_tos != ("late@example.com",) for m in sink.received)
