"""Producers on partitioned streams: ``mailpool send`` and the Python helper apply the
producers' rule (schema/README.md): a message with an ``id`` goes to the send stream of
partition ``crc32(id) mod N``, so a same-id send meets its duplicate guard; one without an
``id`` to any partition.  Standalone with one partition: ``email.send`` as ever."""

from __future__ import annotations

import subprocess
import sys
import zlib

import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.harness import ROOT, child_env
from workers.codec.validate import decode_send
from workers.producer import enqueue_send, send_partitions


def send(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "send", "--redis-url", redis_url,
         "--from", "app@example.com", "--to", "ann@example.com", "--text", "Hi", *args],
        capture_output=True, text=True, timeout=30, env=child_env(), cwd=ROOT, check=False,
    )  # fmt: skip


async def entries_by_partition(partitions: list[aioredis.Redis]) -> list[list[tuple[str, bytes]]]:
    """Each partition's send stream as (entry id, data)."""
    found = []
    for client, keys in zip(partitions, all_keys(), strict=True):
        rows = await client.xrange(keys.send)
        found.append([(entry_id.decode(), fields[b"data"]) for entry_id, fields in rows])
    return found


async def test_send_with_an_id_lands_in_partition_crc32_of_the_id_every_time(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    expected = zlib.crc32(b"order-1042") % PARTITIONS  # the rule, as another language has it
    printed = []
    for _ in range(2):  # a repeated send meets the first one's duplicate guard
        done = send(cluster.url(), "--partitions", str(PARTITIONS), "--id", "order-1042")
        assert done.returncode == 0, done.stderr
        printed.append(done.stdout.strip())
    found = await entries_by_partition(partitions)
    assert [entry_id for entry_id, _ in found[expected]] == printed
    assert sum(map(len, found)) == 2
    assert {decode_send(data)["id"] for _, data in found[expected]} == {"order-1042"}


async def test_the_python_helper_spreads_sends_without_an_id_and_places_those_with_one(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    ids = [f"invoice-{n}" for n in range(12)]
    async with send_partitions(cluster.url(), PARTITIONS) as sends:
        for message_id in [*ids, ids[3]]:
            await enqueue_send(sends, from_="app@example.com", to="ann@example.com", id=message_id)
        for _ in range(2 * PARTITIONS):  # without an id: round robin
            await enqueue_send(sends, from_="app@example.com", to="bob@example.com", text="x")
    placed = [
        (p, decode_send(data))
        for p, entries in enumerate(await entries_by_partition(partitions))
        for _, data in entries
    ]
    with_id = [(p, m["id"]) for p, m in placed if "id" in m]
    assert sorted(with_id) == sorted(
        (zlib.crc32(i.encode()) % PARTITIONS, i) for i in [*ids, ids[3]]
    )
    without_id = [p for p, m in placed if "id" not in m]
    assert sorted(without_id) == sorted(2 * list(range(PARTITIONS)))


async def test_send_to_a_standalone_redis_uses_the_contracts_stream_or_tagged_partitions(
    redis: aioredis.Redis, redis_url: str
) -> None:
    assert send(redis_url, "--id", "a").returncode == 0
    async with send_partitions(redis_url) as sends:
        await enqueue_send(sends, from_="app@example.com", to="ann@example.com", id="b")
    assert sorted(k.decode() for k in await redis.keys("*")) == ["email.send"]
    assert await redis.xlen("email.send") == 2
    done = send(redis_url, "--partitions", "4", "--id", "a")
    assert done.returncode == 0, done.stderr
    tagged = f"email.send{{{zlib.crc32(b'a') % 4}}}"
    assert [e.decode() for e, _ in await redis.xrange(tagged)] == [done.stdout.strip()]
