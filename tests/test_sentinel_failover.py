"""A failover while mail flows: ingest and delivery, given a ``redis+sentinel://`` URL,
follow the master.  Ingest answers 451 while the master changes and 250 again as soon as the
new one takes writes, and with ``--min-replicas 1`` every 250 is on the final master (none
acknowledged and then lost); delivery sends what is enqueued before and after.

The failover is Sentinel's own (``SENTINEL FAILOVER``): the replica is promoted and the old
master, still running, is made its replica and drops its clients; writes it took meanwhile
are dropped too, so only a WAIT tells them apart.  (``kill -9`` and a paused master under
load, with and without ``--min-replicas``: tests/chaos/test_sentinel_failover.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import (
    Replies,
    ids_until,
    send_with_ledger,
    stored_entries,
    stored_ledger_ids,
)
from tests.delivery_util import make_config, pack, running_worker, send_message
from tests.harness import wait_until
from tests.ingest_util import ingest
from tests.sentinel_util import running_sentinels
from workers.streams.connection import connect

SENDERS = 4


async def enqueue_through(client: aioredis.Redis, message_id: str) -> None:
    """XADD a send through the Sentinels, again after an error (the first command after a
    failover may still go to the old master)."""
    data = pack(send_message(message_id=message_id))
    for _attempt in range(50):
        try:
            await client.xadd("email.send", {"data": data})
            return
        except RedisError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{message_id} could not be enqueued")


async def test_ingest_and_delivery_follow_a_failover_and_no_250_is_lost(
    tmp_path: Path,
) -> None:
    ledger, replies, stop = Ledger("sentinel-switchover"), Replies(), asyncio.Event()
    maildir = tmp_path / "maildir"
    with running_sentinels(tmp_path / "redis", replicas=1) as deployment:
        url = deployment.url()
        config = make_config(url, f"maildir:{maildir}", min_replicas=1, replica_timeout=0.5)
        producer = connect(url)
        async with (
            ingest(url, min_replicas=1, replica_timeout=0.5, store_timeout=5) as smtp,
            running_worker(config),
        ):
            senders = [
                asyncio.create_task(
                    send_with_ledger(
                        smtp.port, ledger, ids_until(stop, f"s{n}"), replies, pause=0.02
                    )
                )
                for n in range(SENDERS)
            ]
            try:
                await enqueue_through(producer, "before")
                await asyncio.sleep(0.5)
                old, asked_at = await asyncio.to_thread(deployment.failover)
                new = await asyncio.to_thread(deployment.wait_for_new_master, old)
                await asyncio.to_thread(deployment.wait_until_watched)
                await enqueue_through(producer, "after")
                await asyncio.sleep(0.5)  # mail goes on to the new master
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*senders), timeout=30)
                await producer.aclose()
            await wait_until(
                lambda: len(list((maildir / "new").iterdir())) == 2,
                "both sends delivered, the one enqueued after the failover too",
                timeout=10,
            )
        client = aioredis.Redis(port=new.port)
        try:
            ledger.record_all("stored", stored_ledger_ids(await stored_entries(client)))
        finally:
            await client.aclose()
    assert new is not old
    during = [code for at, code in replies.codes if at >= asked_at]
    assert set(during) == {250, 451}, sorted(set(during))
    last_451 = max(i for i, code in enumerate(during) if code == 451)
    assert during[last_451 + 1 :], "no 250 after the failover"
    assert set(during[last_451 + 1 :]) == {250}
    ledger.report(["stored"], replies_451=during.count(451))
    # Every 250 is stored on the final master; a retried 451 may be stored twice.
    ledger.check(["stored"], max_duplicates=during.count(451))
    assert not ledger.unexplained_duplicates("stored")
