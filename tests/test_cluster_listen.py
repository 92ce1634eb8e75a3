"""Listening across partitions on the shared Redis Cluster: ``mailpool listen`` reads every
partition's receive stream in its group, in order within a partition, acknowledging each
entry in its own partition; a busy partition does not starve another; ``--count`` and the
API's ``limit`` count over all partitions and read no more than they hand out."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest
import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.harness import ROOT, child_env, free_port
from tests.ingest_util import ingest, send_one
from tests.listen_util import next_message
from workers.codec.parse import parse_message
from workers.codec.wire import pack
from workers.listen import Listener
from workers.streams.connection import connect

KEYS = all_keys()
STREAMS = [keys.receive for keys in KEYS]


async def add_received(client: aioredis.Redis, stream: str, subject: str) -> str:
    raw = f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n"
    message = parse_message(raw.encode(), mail_from="a@example.com", rcpt_tos=["b@example.com"])
    return str((await client.xadd(stream, {"data": pack(message)})).decode())


async def entry_ids(partitions: list[aioredis.Redis]) -> dict[str, list[str]]:
    """Each partition's receive stream: its entry ids in stream order."""
    return {
        keys.receive: [i.decode() for i, _ in await client.xrange(keys.receive)]
        for client, keys in zip(partitions, KEYS, strict=True)
    }


async def pending(partitions: list[aioredis.Redis], group: str) -> list[int]:
    return [
        int((await client.xpending(keys.receive, group))["pending"])
        for client, keys in zip(partitions, KEYS, strict=True)
    ]


def quick(partitions: list[aioredis.Redis], consumer: str, **options: object) -> Listener:
    return Listener(partitions, "app", consumer, stream=STREAMS, start="all", block=0.3,
                    **options)  # type: ignore[arg-type]  # fmt: skip


async def test_listen_prints_the_mail_ingested_into_every_partition_in_order_and_acks_it(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    async with ingest(cluster.url(), partitions=PARTITIONS) as server:
        for n in range(3 * PARTITIONS):
            assert (await send_one(server.port))[0] == 250, n
    stored = await entry_ids(partitions)
    assert all(len(ids) == 3 for ids in stored.values())  # ingest spread them
    out = subprocess.run(
        [sys.executable, "-m", "workers", "listen", "--redis-url", cluster.url(),
         "--partitions", str(PARTITIONS), "--group", "app", "--start", "all",
         "--count", str(3 * PARTITIONS)],
        capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    printed: dict[str, list[str]] = defaultdict(list)
    for line in out.stdout.splitlines():
        entry = json.loads(line)
        printed[entry["stream"]].append(entry["entry_id"])
    assert printed == stored  # every entry once, in stream order within its partition
    assert await pending(partitions, "app") == [0] * PARTITIONS  # acked where they came from


async def test_a_busy_partition_does_not_starve_another(partitions: list[aioredis.Redis]) -> None:
    for n in range(40):
        await add_received(partitions[0], STREAMS[0], f"busy {n}")
    quiet = await add_received(partitions[3], STREAMS[3], "quiet")
    async with quick(partitions, "fair", batch=5) as listener:
        first = [await next_message(listener) for _ in range(10)]  # two batches of the busy one
        for message in first:
            await message.ack()
    assert quiet in [m.id for m in first if m.stream == STREAMS[3]]
    busy = [m.id for m in first if m.stream == STREAMS[0]]
    assert busy == sorted(busy, key=lambda i: tuple(map(int, i.split("-"))))


async def test_a_limit_over_partitions_reads_no_more_than_it_hands_out(
    partitions: list[aioredis.Redis],
) -> None:
    for client, stream in zip(partitions, STREAMS, strict=True):
        for n in range(2):
            await add_received(client, stream, f"{stream} {n}")
    async with quick(partitions, "script", limit=4) as listener:
        got = [m async for m in listener]
    assert len(got) == 4
    assert sum(await pending(partitions, "app")) == 4  # not one per partition more


async def test_an_entry_id_alone_is_acknowledged_only_with_its_stream(
    partitions: list[aioredis.Redis],
) -> None:
    entry_id = await add_received(partitions[2], STREAMS[2], "one")
    async with quick(partitions, "by-id") as listener:
        message = await next_message(listener)
        with pytest.raises(ValueError, match="ambiguous"):
            await listener.ack(entry_id)
        assert await listener.ack(message.id, stream=message.stream) == 1
    assert (message.id, message.stream) == (entry_id, STREAMS[2])
    assert await pending(partitions, "app") == [0] * PARTITIONS


async def test_partitions_on_a_standalone_redis_share_one_client(redis: aioredis.Redis) -> None:
    streams = [keys.receive for keys in all_keys(3)]
    ids = {stream: [await add_received(redis, stream, f"{stream} {n}") for n in range(2)]
           for stream in streams}  # fmt: skip
    async with Listener(redis, "app", "one", stream=streams, start="all", block=0.3) as listener:
        got = [await next_message(listener) for _ in range(6)]
        await listener.ack(*got)
    assert {s: [m.id for m in got if m.stream == s] for s in streams} == ids
    assert [(await redis.xpending(s, "app"))["pending"] for s in streams] == [0, 0, 0]


async def test_a_partition_that_cannot_be_reached_does_not_hold_up_a_limited_listen(
    redis: aioredis.Redis,
) -> None:
    """``mailpool listen --count 1`` while one partition's shard is down: the one read the
    limit allows goes to the down partition first; it gives its turn up after a failed
    read instead of waiting the outage out (before: nothing handed out, for ever)."""
    streams = [keys.receive for keys in all_keys(2)]
    entry = await add_received(redis, streams[1], "from the partition that is up")
    gone = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        async with Listener([gone, redis], "app", "one", stream=streams, start="all",
                            block=0.3, limit=1) as listener:  # fmt: skip
            message = await next_message(listener, timeout=5.0)
    finally:
        await gone.aclose()
    assert (message.stream, message.id) == (streams[1], entry)
