"""A delivery worker reading several partitions has one window and one set of lanes for all
of them: at most --concurrency sends in flight whatever the partition count, and each read
takes a whole window's room from one partition, as with one stream; a partition whose
Redis stalls is passed over while the others are read.  Before, each
partition had a loop of its own with ceil(--concurrency / N) lanes (up to N - 1 sends
more than asked for) and reads N times smaller.  A real redis-server, partitions tagged as
on a cluster, and a real SMTP sink."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import make_config, pack, running_worker, send_message
from tests.harness import wait_until
from tests.sinks import RecordingSink, TimedSink, most_at_once
from workers.config import DeliveryConfig
from workers.delivery.worker import READ_BLOCK, DeliveryWorker, Stream, read_block_ms
from workers.streams import layout
from workers.streams.connection import close_all, connect
from workers.streams.consumer import GroupConsumer, StreamEntry
from workers.streams.layout import StreamKeys
from workers.streams.outcomes import Outcomes


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


@contextlib.asynccontextmanager
async def silent_redis() -> AsyncIterator[str]:
    """A TCP peer that takes connections and never answers: a stalled shard's primary."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in held:
            writer.close()
        server.close()


def stream_of(client: aioredis.Redis, keys: StreamKeys, config: DeliveryConfig) -> Stream:
    consumer = GroupConsumer(client, keys.send, "delivery", "w1", claim_after=config.claim_after,
                             batch=config.batch, block=READ_BLOCK)  # fmt: skip
    return Stream(consumer, Outcomes(client, keys, group="delivery", sent_ttl=60,
                                     events_maxlen=1000))  # fmt: skip


async def test_a_stalled_partition_does_not_hold_up_the_others_reads(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Partition 1's Redis takes the connection and never answers; partition 0's 30
    messages go out all the same, its reads passed over for at most READ_AWAY_MAX at a
    time (a read of the stalled one waits its deadline, not the 5 s socket timeout)."""
    keys = layout.partitions(StreamKeys(), 2, tagged=True)
    for n in range(30):
        message = send_message([f"u{n}@example.com"], message_id=f"s{n}")
        await redis.xadd(keys[0].send, {"data": pack(message)})
    config = make_config(redis_url, sink.url, partitions=2, concurrency=2)
    async with silent_redis() as stalled_url:
        clients = [connect(redis_url, retries=0), connect(stalled_url, retries=0)]
        streams = [stream_of(client, k, config) for client, k in zip(clients, keys, strict=True)]
        await streams[0].consumer.ensure_group()
        worker = DeliveryWorker(config, streams, config.open_transport())
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await wait_until(lambda: len(sink.received) == 30, "all 30 sent", timeout=20)
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
            for stream in streams:
                await stream.outcomes.aclose()
            await close_all(clients)
    assert (await redis.xpending(keys[0].send, "delivery"))["pending"] == 0
