"""The roles against Redis Sentinel: ingest, delivery and a one-shot command given a
``redis+sentinel://`` URL find the master through three real Sentinels (a primary and a
replica on loopback), ``--min-replicas`` confirms each write on the replica, and
``rediss+sentinel://`` talks TLS to the Sentinels and the servers, with a password for each."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    redis_stalled,
    run_until_settled,
    send_message,
)
from tests.harness import ROOT, child_env, free_port, wait_for_port, wait_until
from tests.ingest_util import entries, send_one
from tests.ingest_util import ingest as running_ingest
from tests.sentinel_util import SentinelSet, running_sentinels
from workers.streams.connection import connect
from workers.streams.layout import StreamKeys
from workers.streams.outcomes import Outcomes, ReplicasMissing, Settlement

SERVER_PASSWORD = "server-secret-pw"
SENTINEL_PASSWORD = "sentinel/secret@pw"


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    with running_sentinels(tmp_path_factory.mktemp("sentinel"), replicas=1) as deployment:
        yield deployment


@contextlib.asynccontextmanager
async def direct(
    deployment: SentinelSet, *, replica: bool = False
) -> AsyncIterator[aioredis.Redis]:
    """A client of the master (or of its replica) itself, not through the Sentinels."""
    server = deployment.replicas()[0] if replica else deployment.master()
    client = aioredis.Redis(port=server.port)
    try:
        yield client
    finally:
        await client.aclose()


async def test_ingest_stores_through_the_sentinels_on_the_master_and_its_replica(
    sentinels: SentinelSet,
) -> None:
    url = sentinels.url()
    async with running_ingest(url, min_replicas=1, replica_timeout=2.0) as smtp:
        code, reply = await send_one(smtp.port)
    assert code == 250, reply
    # WAIT 1 returned before the 250: the replica holds the entry already, not eventually.
    async with direct(sentinels) as master, direct(sentinels, replica=True) as replica:
        on_master, on_replica = await entries(master), await entries(replica)
    entry_id = reply.rsplit(" ", 1)[-1]
    assert entry_id in [e for e, _ in on_master] and on_replica == on_master


async def test_delivery_settles_through_the_sentinels_and_waits_for_the_replica(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    async with direct(sentinels) as master:
        await master.delete("email.send", "email.send.events")
        for n in range(3):
            await enqueue(master, send_message(message_id=f"sentinel-{n}"))
        config = make_config(sentinels.url(), f"maildir:{tmp_path / 'maildir'}", min_replicas=1)
        await run_until_settled(master, config)
        sent_events = [e["id"] for e in await events(master)]
    async with direct(sentinels, replica=True) as replica:
        assert [e["id"] for e in await events(replica)] == sent_events
    assert sorted(sent_events) == ["sentinel-0", "sentinel-1", "sentinel-2"]
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 3


async def test_a_settlement_the_replica_did_not_confirm_counts_as_not_applied(
    sentinels: SentinelSet,
) -> None:
    """With --min-replicas each batch of settlements ends with WAIT: a replica that does not
    confirm in time makes every settlement of the batch an error the settler runs again;
    run again once the replica is back, it writes nothing more and is confirmed."""
    async with direct(sentinels) as master:
        await master.delete("email.send")
        await master.xgroup_create("email.send", "delivery", "0", mkstream=True)
        entry_id = await enqueue(master, send_message(message_id="unconfirmed"))
        await master.xreadgroup("delivery", "w1", {"email.send": ">"})
    client = connect(sentinels.url())
    outcomes = Outcomes(
        client, StreamKeys(), group="delivery", sent_ttl=60, events_maxlen=100,
        min_replicas=1, replica_timeout=0.3,
    )  # fmt: skip
    settlement = Settlement(
        entry_id=entry_id, message_id="unconfirmed", accepted=["ann@example.com"]
    )
    try:
        with redis_stalled(sentinels.replicas()[0]):
            (stalled,) = await outcomes.settle([settlement], time.time())
        (again,) = await outcomes.settle([settlement], time.time())
    finally:
        await client.aclose()
    assert isinstance(stalled, ReplicasMissing), stalled
    assert "0 of 1 replicas confirmed the settlements within 300 ms" in str(stalled)
    assert again is False  # applied by the first run: acknowledged, now on the replica too


async def test_closing_a_client_closes_its_connections_to_the_sentinels(
    sentinels: SentinelSet,
) -> None:
    """A role's client asks the Sentinels over connections of its own; closing the client
    closes them too (redis_fence.close_sentinel: Sentinel.aclose, or each Sentinel's client
    where redis-py has no such method)."""

    def askers() -> int:  # connections whose last command was the master lookup
        found = 0
        for sentinel in sentinels.sentinels:
            with contextlib.closing(sentinels.sentinel_client(sentinel)) as admin:
                found += sum(c["cmd"] == "sentinel|masters" for c in admin.client_list())
        return found

    client = connect(sentinels.url())
    await client.ping()
    assert askers() == 1
    await client.aclose()
    await wait_until(lambda: askers() == 0, "the Sentinel connections closed", timeout=5)


async def test_mailpool_run_with_a_sentinel_url_starts_no_redis_of_its_own(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    """`mailpool run` stays standalone: only without --redis-url does it start its own
    redis-server; given a Sentinel URL its three roles use that deployment."""
    smtp_port, maildir = free_port(), tmp_path / "maildir"
    pool = subprocess.Popen(
        [sys.executable, "-m", "workers", "run", "--redis-url", sentinels.url(),
         "--listen", f"127.0.0.1:{smtp_port}", "--relay", f"maildir:{maildir}"],
        cwd=tmp_path, env=child_env(MAILPOOL_DATA_DIR=str(tmp_path / ".mailpool")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for_port, smtp_port, 30)
        code, reply = await send_one(smtp_port)
        assert code == 250, reply
        async with direct(sentinels) as master:
            assert reply.rsplit(" ", 1)[-1] in [e for e, _ in await entries(master)]
            await enqueue(master, send_message(message_id="through-the-pool"))
        await wait_until(lambda: (maildir / "new").is_dir() and any((maildir / "new").iterdir()))
    finally:
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(timeout=30) == 0
    assert not (tmp_path / ".mailpool" / "redis.url").exists()  # no embedded redis-server


async def test_a_one_shot_command_finds_the_master_through_the_sentinels(
    sentinels: SentinelSet,
) -> None:
    """``mailpool status`` through the Sentinels reports the stream the master holds: one
    written here, not left by the module's other tests (which may run in another process)."""
    async with direct(sentinels) as master:
        await master.xadd("email.receive", {"data": b"one-shot"})
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "workers", "status", "--json", "--redis-url", sentinels.url()],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env=child_env(), check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"email.receive"' in out.stdout


async def test_tls_to_sentinels_and_servers_with_a_password_for_each(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    with running_sentinels(
        tmp_path, replicas=0, password=SERVER_PASSWORD, sentinel_password=SENTINEL_PASSWORD,
        tls=certificate,
    ) as deployment:  # fmt: skip
        hosts = deployment.url("rediss+sentinel").partition("://")[2]
        url = f"rediss+sentinel://:{SERVER_PASSWORD}@{hosts}?ssl_ca_certs={certificate[0]}"
        async with running_ingest(url, sentinel_password=SENTINEL_PASSWORD) as smtp:
            code, reply = await send_one(smtp.port)
        assert code == 250, reply
        client = connect(url + "&sentinel_password=sentinel%2Fsecret%40pw")
        try:
            assert len(await entries(client)) == 1
        finally:
            await client.aclose()
        wrong = connect(url + "&sentinel_password=wrong")
        with pytest.raises(RedisConnectionError, match="no Sentinel names a master 'mailpool'"):
            try:
                await wrong.ping()
            finally:
                await wrong.aclose()
