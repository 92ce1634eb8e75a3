"""Partitioned streams and Redis Cluster: the names, the producers' rule, cluster URLs, and
ingest and delivery end to end on a real cluster (3 primaries, 3 replicas on loopback) with
entries on several shards."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zlib

import pytest
import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.delivery_util import make_config, pack, running_worker, send_message
from tests.harness import child_env, free_port, wait_until
from tests.ingest_util import ingest, send_one
from tests.sinks import RecordingSink
from workers import housekeeping
from workers.errors import ConfigError
from workers.housekeeping import HousekeepConfig
from workers.streams import layout
from workers.streams.cluster import ClusterTopology, parse_cluster_url, slot_of
from workers.streams.layout import StreamKeys


def test_one_partition_on_a_standalone_redis_keeps_the_contracts_names() -> None:
    (keys,) = layout.partitions(StreamKeys(), 1, tagged=False)
    assert (keys.receive, keys.send, keys.dead, keys.events) == (
        "email.receive", "email.send", "email.send.dead", "email.send.events",
    )  # fmt: skip
    assert (keys.retry_schedule, keys.retry_payload("1-0"), keys.sent("m")) == (
        "mailpool:retry", "mailpool:retry:1-0", "mailpool:sent:m",
    )  # fmt: skip


def test_every_key_of_a_partition_shares_its_hash_tag() -> None:
    keys = layout.partitions(StreamKeys(), 3, tagged=True)[2]
    names = [keys.receive, keys.send, keys.dead, keys.events, keys.retry_schedule,
             keys.retry_payload("1-0"), keys.sent("a{b}c")]  # fmt: skip
    assert names == [
        "email.receive{2}", "email.send{2}", "email.send.dead{2}", "email.send.events{2}",
        "mailpool:{2}retry", "mailpool:{2}retry:1-0", "mailpool:{2}sent:a{b}c",
    ]  # fmt: skip
    # On a cluster even one partition is tagged: settle's six keys must share a slot.
    assert layout.partitions(StreamKeys(), 1, tagged=True)[0].send == "email.send{0}"


def test_the_partition_of_an_id_is_its_crc32_modulo_the_count() -> None:
    assert layout.partition_of("order-1042", 4) == zlib.crc32(b"order-1042") % 4
    assert layout.partition_of("Grüße-1", 7) == zlib.crc32("Grüße-1".encode()) % 7


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://127.0.0.1:7000/0", "a path"),
        ("redis+cluster://127.0.0.1:99999", "bad port"),
        ("redis+cluster://:pw@127.0.0.1:7000,", "an empty node address"),
        ("redis+cluster://127.0.0.1:7000?ssl_ca_certs=/x", "without TLS"),
        ("rediss+cluster://127.0.0.1:7000?db=1", "unknown option 'db'"),
    ],
)
def test_a_bad_cluster_url_is_one_line_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_cluster_url(url)
    assert problem in str(caught.value)
    assert ":pw@" not in str(caught.value)


def test_a_cluster_url_names_its_seeds_user_and_tls() -> None:
    target = parse_cluster_url("rediss+cluster://ann:s%40cret@h1:7000,[::1]:7001,h3")
    assert target.seeds == (("h1", 7000), ("::1", 7001), ("h3", 6379))
    assert (target.username, target.password, target.tls) == ("ann", "s@cret", True)


def shards_holding(cluster: ClusterSet, pattern: str) -> set[int]:
    return {s.port for s in cluster.running() if cluster.node_keys(s, pattern)}


async def test_ingest_spreads_received_mail_over_the_partitions_and_shards(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    async with ingest(cluster.url(), partitions=PARTITIONS) as server:
        for n in range(2 * PARTITIONS):
            code, _ = await send_one(server.port)
            assert code == 250, n
    lengths = [await c.xlen(k.receive) for c, k in zip(partitions, all_keys(), strict=True)]
    assert lengths == [2] * PARTITIONS
    assert len(shards_holding(cluster, "email.receive{*}")) >= 2


async def test_delivery_sends_every_partitions_mail_once_on_a_cluster(
    cluster: ClusterSet, partitions: list[aioredis.Redis], sink: RecordingSink
) -> None:
    keys = all_keys()
    ids = [f"order-{n}" for n in range(24)]
    for message_id in [*ids, ids[0], ids[5]]:  # two sent twice: the duplicate guard holds
        p = layout.partition_of(message_id, PARTITIONS)
        message = send_message([f"{message_id}@example.com"], message_id=message_id)
        await partitions[p].xadd(keys[p].send, {"data": pack(message)})
    assert len(shards_holding(cluster, "email.send{*}")) >= 2
    config = make_config(cluster.url(), sink.url, partitions=PARTITIONS, concurrency=6)
    async with running_worker(config):
        await wait_until(lambda: len(sink.received) >= len(ids), "every message sent")
        await wait_until(lambda: all_settled(partitions, keys), "every partition settled")
    assert sorted(r for m in sink.received for r in m.rcpt_tos) == sorted(
        f"{i}@example.com" for i in ids
    )
    delivered = already = 0
    for client, k in zip(partitions, keys, strict=True):
        for _, fields in await client.xrange(k.events):
            sent_before = fields.get(b"already_sent") == b"1"  # the two copies' outcome
            delivered += fields[b"event"] == b"delivered" and not sent_before
            already += sent_before
    assert (delivered, already) == (len(ids), 2)


async def all_settled(clients: list[aioredis.Redis], keys: tuple[StreamKeys, ...]) -> bool:
    for client, k in zip(clients, keys, strict=True):
        if not await client.exists(k.send):
            continue
        groups = await client.xinfo_groups(k.send)
        info = await client.xinfo_stream(k.send)
        if (
            not groups
            or int(groups[0]["pending"])
            or (groups[0]["last-delivered-id"] != info["last-generated-id"])
        ):
            return False
    return True


async def test_status_shows_every_partition_and_sums_dead_letters(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    keys = all_keys()
    for p in (1, 4):
        await partitions[p].xadd(keys[p].send, {"data": b"x"})
        await partitions[p].xadd(keys[p].dead, {"data": b"x", "reason": "rejected"})
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--json", "--redis-url", cluster.url(),
         "--partitions", str(PARTITIONS)],
        capture_output=True, env=child_env(), timeout=30, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert {name: s["length"] for name, s in status["streams"].items()} == {
        "email.send{1}": 1, "email.send{4}": 1,
    }  # fmt: skip
    assert status["dead_letters"] == 2


async def test_housekeeping_trims_every_partition_on_a_cluster(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    keys = all_keys()
    for client, k in zip(partitions, keys, strict=True):
        for _ in range(3):
            await client.xadd(k.receive, {"data": b"x"})
    config = HousekeepConfig(
        redis_url=cluster.url(), partitions=PARTITIONS, receive_max_len=1, housekeep_interval=0.2
    )
    config.validate()
    stop = asyncio.Event()
    task = asyncio.create_task(housekeeping.serve(config, stop))

    async def trimmed() -> bool:
        lengths = [await c.xlen(k.receive) for c, k in zip(partitions, keys, strict=True)]
        return lengths == [1] * PARTITIONS

    try:
        await wait_until(trimmed, "every receive partition trimmed to 1 entry")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_retries_and_dead_letters_stay_in_their_partition_on_a_cluster(
    cluster: ClusterSet, partitions: list[aioredis.Redis], sink: RecordingSink
) -> None:
    """Each refused once with 451 is retried in its own partition (its retry schedule and
    payload share the partition's slot) and delivered; a 550 is dead-lettered there."""
    keys = all_keys()
    ids = [f"retry-{n}" for n in range(12)]
    for message_id in ids:
        sink.refuse_rcpt(f"{message_id}@example.com", "451 4.3.0 try later", times=1)
    sink.refuse_rcpt("gone@example.com", "550 5.1.1 no such user")
    placed = {}
    for message_id in [*ids, "bounce-1"]:
        p = placed[message_id] = layout.partition_of(message_id, PARTITIONS)
        to = "gone@example.com" if message_id == "bounce-1" else f"{message_id}@example.com"
        data = pack(send_message([to], message_id=message_id))
        await partitions[p].xadd(keys[p].send, {"data": data})
    assert len(set(placed.values())) >= 3
    config = make_config(cluster.url(), sink.url, partitions=PARTITIONS)
    async with running_worker(config):
        await wait_until(lambda: len(sink.received) >= len(ids), "every retry delivered")
        await wait_until(lambda: all_settled(partitions, keys), "every partition settled")
    assert sorted(r for m in sink.received for r in m.rcpt_tos) == sorted(
        f"{i}@example.com" for i in ids
    )
    bounced = placed["bounce-1"]
    assert [await c.xlen(k.dead) for c, k in zip(partitions, keys, strict=True)] == [
        int(p == bounced) for p in range(PARTITIONS)
    ]
    deferred: dict[int, set[str]] = {}
    for p, (client, k) in enumerate(zip(partitions, keys, strict=True)):
        assert await client.zcard(k.retry_schedule) == 0
        for _, fields in await client.xrange(k.events):
            if fields[b"event"] == b"deferred":
                deferred.setdefault(p, set()).add(fields[b"id"].decode())
    assert deferred == {
        p: {i for i in ids if placed[i] == p} for p in sorted(set(placed[i] for i in ids))
    }


async def test_the_slot_map_is_found_through_learned_nodes_when_the_seeds_are_gone(
    cluster: ClusterSet,
) -> None:
    """The primaries a slot map named are asked too: with every seed of the URL gone, a
    client still finds where its slot lives (before: only the seeds were ever asked)."""
    seed = cluster.servers[0]
    topology = ClusterTopology(seeds=(("127.0.0.1", seed.port),))
    slot = slot_of("email.send{0}")
    first = await topology.primary_of(slot)
    topology.seeds = (("127.0.0.1", free_port()),)  # the seeds of the URL, all gone
    topology.stale()
    assert await topology.primary_of(slot) == first
