"""A primary of a Redis Cluster killed (-9) while mail flows through partitioned streams:
its replica is promoted, ingest answers 451 for the partitions it served and 250 again once
the new primary takes writes, and with ``--min-replicas 1`` every 250 is stored (none
acknowledged and then lost); delivery sends what is enqueued before and after.  Counted
like the Sentinel scenario (tests/test_sentinel_failover.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import Replies, ids_until, send_with_ledger, stored_ledger_ids
from tests.cluster_util import ClusterSet, running_cluster
from tests.delivery_util import make_config, pack, running_worker, send_message
from tests.harness import wait_until
from tests.ingest_util import ingest
from workers.streams import layout
from workers.streams.connection import close_all, connect, partition_clients
from workers.streams.layout import StreamKeys

SENDERS = 4
PARTITIONS = 6


async def enqueue_through(clients: list[aioredis.Redis], message_id: str) -> None:
    """XADD a send to its partition (the producers' rule), again after an error."""
    keys = layout.partitions(StreamKeys(), PARTITIONS, tagged=True)
    p = layout.partition_of(message_id, PARTITIONS)
    data = pack(send_message(message_id=message_id))
    for _attempt in range(100):
        try:
            await clients[p].xadd(keys[p].send, {"data": data})
            return
        except RedisError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{message_id} could not be enqueued")


def kill_and_replace(cluster: ClusterSet, key: str) -> float:
    """kill -9 the primary serving ``key``; wait for its replica's promotion; start the
    killed node again (it rejoins as a replica).  Returns the time of the kill."""
    victim = cluster.primary_of(key)
    killed_at = time.monotonic()  # the clock of Replies
    victim.stop(kill=True)
    deadline = time.monotonic() + 30
    while cluster.primary_of(key) is victim:
        assert time.monotonic() < deadline, "no replica promoted"
        time.sleep(0.1)
    cluster.wait_until_ok()
    victim.start()  # with --min-replicas 1 the new primary needs a replica to take writes
    cluster.wait_until_ok()
    return killed_at


async def stored_ids(clients: list[aioredis.Redis]) -> list[str | None]:
    import msgpack

    keys = layout.partitions(StreamKeys(), PARTITIONS, tagged=True)
    found: list[tuple[str, dict[str, object]]] = []
    for client, k in zip(clients, keys, strict=True):
        for entry_id, fields in await client.xrange(k.receive):
            found.append((entry_id.decode(), msgpack.unpackb(fields[b"data"], raw=False)))
    return stored_ledger_ids(found)  # type: ignore[arg-type]


async def test_a_killed_primary_is_followed_and_no_250_is_lost(tmp_path: Path) -> None:
    ledger, replies, stop = Ledger("cluster-failover"), Replies(), asyncio.Event()
    maildir = tmp_path / "maildir"
    with running_cluster(tmp_path / "cluster") as cluster:
        url = cluster.url()
        partitions = layout.partitions(StreamKeys(), PARTITIONS, tagged=True)
        producer = partition_clients(url, partitions, connect)
        config = make_config(
            url, f"maildir:{maildir}", partitions=PARTITIONS, min_replicas=1, replica_timeout=0.5
        )
        async with (
            ingest(url, partitions=PARTITIONS, min_replicas=1, replica_timeout=0.5,
                   store_timeout=5) as smtp,
            running_worker(config),
        ):  # fmt: skip
            senders = [
                asyncio.create_task(
                    send_with_ledger(smtp.port, ledger, ids_until(stop, f"s{n}"), replies,
                                     pause=0.02)
                )
                for n in range(SENDERS)
            ]  # fmt: skip
            try:
                await enqueue_through(producer, "before")
                await asyncio.sleep(1.0)
                killed_at = await asyncio.to_thread(kill_and_replace, cluster, partitions[0].send)
                await enqueue_through(producer, "after")
                await asyncio.sleep(1.0)  # mail goes on to the new primary
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*senders), timeout=30)
            await wait_until(
                lambda: len(list((maildir / "new").iterdir())) == 2,
                "both sends delivered, the one enqueued after the failover too",
                timeout=20,
            )
        ledger.record_all("stored", await stored_ids(producer))
        await close_all(producer)
    during = [code for at, code in replies.codes if at >= killed_at]
    assert 451 in during and 250 in during, sorted(set(during))
    assert during[-1] == 250, "no 250 after the failover"
    ledger.report(["stored"], replies_451=during.count(451))
    # Every 250 is stored; a retried 451 may be stored twice.
    ledger.check(["stored"], max_duplicates=during.count(451))
    assert not ledger.unexplained_duplicates("stored")
