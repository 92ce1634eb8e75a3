"""Nothing lost after 250: Redis stopped mid-run, out of memory, read-only, too few replicas.
Every failure of ours answers 451 4.3.0 (never 250, never 5xx) and the session survives."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis

from tests.harness import RedisServer, wait_until
from tests.ingest_util import SMTPConn, entries, ingest, message


async def _client(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis.from_url(server.url)


async def test_redis_stopped_mid_run_451_then_250_nothing_lost_or_doubled(
    make_redis: Callable[..., RedisServer],
) -> None:
    """A sender that retries on 4xx (as MTAs do) gets every message in exactly once."""
    server = make_redis(appendonly=True)
    sent: list[str] = []
    deferred = 0
    async with ingest(server.url) as smtp:
        conn = await SMTPConn.open_session(smtp.port)
        for number in range(20):
            if number == 8:
                server.stop()  # clean shutdown: what was acknowledged is in the AOF
            if number == 12:
                server.start()
            subject = f"message {number}"
            for _attempt in range(50):
                code, text = await conn.transaction(message(subject))
                if code == 250:
                    sent.append(subject)
                    break
                assert (code, text.split()[0]) == (451, "4.3.0"), text
                deferred += 1
                await asyncio.sleep(0.05)
                if number >= 12:
                    continue
                break  # while Redis is down, move on; the message is retried below
            else:
                raise AssertionError("never accepted after Redis came back")
        await conn.close()
        # Retry what was deferred while Redis was down (the sender kept it).
        missing = [f"message {n}" for n in range(20) if f"message {n}" not in sent]
        assert len(missing) == 4
        conn = await SMTPConn.open_session(smtp.port)
        for subject in missing:
            code, _ = await conn.transaction(message(subject))
            assert code == 250
        await conn.close()
    assert deferred >= 4
    client = await _client(server)
    stored = [m["headers"]["subject"] for _, m in await entries(client)]
    await client.aclose()
    assert sorted(stored) == sorted(f"message {n}" for n in range(20))


async def test_out_of_memory_and_read_only_answer_451(
    make_redis: Callable[..., RedisServer],
) -> None:
    server = make_redis()
    client = await _client(server)
    async with ingest(server.url) as smtp:
        conn = await SMTPConn.open_session(smtp.port)
        await client.config_set("maxmemory", "1")
        code, text = await conn.transaction(message("oom"))
        assert (code, text.split()[0]) == (451, "4.3.0")
        await client.config_set("maxmemory", "0")
        # A replica of a master that is not there is read-only.
        await client.execute_command("REPLICAOF", "127.0.0.1", "1")
        code, text = await conn.transaction(message("readonly"))
        assert (code, text.split()[0]) == (451, "4.3.0")
        await client.execute_command("REPLICAOF", "NO", "ONE")
        code, _ = await conn.transaction(message("fine"))
        assert code == 250
        await conn.close()
    stored = [m["headers"]["subject"] for _, m in await entries(client)]
    await client.aclose()
    assert stored == ["fine"]


async def test_min_replicas_waits_for_a_real_replica(
    make_redis: Callable[..., RedisServer], tmp_path: Path
) -> None:
    primary = make_redis(extra=["--repl-diskless-sync-delay", "0"])
    async with ingest(primary.url, min_replicas=1, replica_timeout=0.5) as smtp:
        conn = await SMTPConn.open_session(smtp.port)
        code, text = await conn.transaction(message("no replica yet"))
        assert (code, text.split()[0]) == (451, "4.3.0")
        await conn.close()
        replica = make_redis(extra=["--replicaof", "127.0.0.1", str(primary.port)])
        replica_client = await _client(replica)
        primary_client = await _client(primary)

        async def in_sync() -> bool:
            # The primary counts a replica for WAIT once it calls it online.
            replicas = await primary_client.info("replication")
            return "online" in str(replicas.get("slave0", ""))

        await wait_until(in_sync, timeout=15)
        await primary_client.aclose()
        conn = await SMTPConn.open_session(smtp.port)
        # A replica the primary has just called online still misses the first WAIT now and
        # then (about one run in ten here); the sender retries on 451 as MTAs do.
        for _attempt in range(8):
            code, text = await conn.transaction(message("replicated"))
            if code == 250:
                break
            assert (code, text.split()[0]) == (451, "4.3.0")
        assert code == 250, text
        await conn.close()
        # 250 came after WAIT: the replica already holds the entry.
        on_replica = [m["headers"]["subject"] for _, m in await entries(replica_client)]
        await replica_client.aclose()
    assert on_replica[-1] == "replicated"


async def test_hung_redis_times_out_with_451(make_redis: Callable[..., RedisServer]) -> None:
    """A Redis that stops answering (SIGSTOP) costs the sender --store-timeout, then 451;
    once it answers again, 250.  The XADD was already in Redis's socket buffer and runs on
    SIGCONT (it is never sent a second time): the 451 left an entry, and the sender's retry
    makes the second copy, the one duplicate class of ingest (README, Guarantees)."""
    server = make_redis()
    assert server.process is not None
    async with ingest(server.url, store_timeout=2.0) as smtp:
        conn = await SMTPConn.open_session(smtp.port)
        assert (await conn.transaction(message("before")))[0] == 250
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            await conn.send(message("while hung") + b".\r\n")
            code, text = await conn.reply(timeout=30)
            waited = time.monotonic() - started
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert (code, text.split()[0]) == (451, "4.3.0")
        assert 1.9 < waited < 4  # --store-timeout, not a socket timeout and a retry
        assert (await conn.transaction(message("while hung")))[0] == 250
        await conn.close()
    client = await _client(server)
    stored = [m["headers"]["subject"] for _, m in await entries(client)]
    await client.aclose()
    assert stored == ["before", "while hung", "while hung"]
