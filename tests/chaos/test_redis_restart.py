"""Redis restarted (AOF on, kill -9) under load: ingest answers 4xx while it is down (never
250, never 5xx), ingest and delivery workers reconnect with back-off, and nothing that was
acknowledged (a 250, an XADD id) is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.chaos.ledger import HEADER, Ledger
from tests.chaos.scenario import (
    FULL,
    Replies,
    ids_until,
    maildir_ids,
    send_with_ledger,
    size,
    stored_entries,
    stored_ledger_ids,
)
from tests.delivery_util import pack, send_message, settled, terminate, worker_process
from tests.harness import RedisServer, wait_for_port
from tests.ingest_util import IngestProcess

RESTARTS = size(1, 4)
DOWN_FOR = 1.5  # seconds Redis stays away each time
SENDERS = size(6, 20)
MARGIN = 0.5  # a 250 for an XADD made just before the kill may arrive just after it


async def produce_sends(
    redis_url: str, ledger: Ledger, stop: asyncio.Event, pause: float = 0.01
) -> None:
    """A producer enqueueing sends with XADD; an error leaves the send indeterminate and is
    retried with the same ``id`` (idempotent: delivered at most once per recipient)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        for ledger_id in ids_until(stop, "send"):
            message = send_message(["sink@example.com"], subject=f"send {ledger_id}")
            message["headers"][HEADER.lower()] = ledger_id
            message["id"] = ledger_id
            data = pack(message)
            ledger.send(ledger_id)
            for _attempt in range(200):
                try:
                    entry_id = await client.xadd("email.send", {"data": data})
                except (RedisError, OSError):
                    ledger.mark_indeterminate(ledger_id)
                    await asyncio.sleep(0.1)
                    continue
                ledger.accept(ledger_id, receipt=entry_id.decode())
                break
            await asyncio.sleep(pause)
    finally:
        await client.aclose()


def kill_and_restart(server: RedisServer) -> tuple[float, float]:
    """kill -9 (appendfsync always: what was acknowledged is on disk), then start again;
    returns when it was killed and when it was started again."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    server.process = None
    down_at = time.monotonic()
    time.sleep(DOWN_FOR)
    restart_at = time.monotonic()  # Redis is surely away until here
    server.start()
    wait_for_port(server.port)
    return down_at, restart_at


@pytest.mark.timeout(600 if FULL else 60)
async def test_redis_killed_and_restarted_under_load(
    make_redis: Callable[..., RedisServer],
    ingest_workers: Callable[..., IngestProcess],
    tmp_path: Path,
) -> None:
    server = make_redis(appendonly=True)
    workers = [ingest_workers(server.url) for _ in range(2)]
    maildir = tmp_path / "maildir"
    delivery = worker_process(server.url, f"maildir:{maildir}", log=tmp_path / "deliver.log")
    ingest_ledger, send_ledger = Ledger("redis-restart-ingest"), Ledger("redis-restart-send")
    replies = Replies()
    stop = asyncio.Event()
    load = [
        asyncio.create_task(
            send_with_ledger(
                workers[n % 2].port, ingest_ledger, ids_until(stop, f"in{n}"), replies,
                pause=0.1,
            )
        )
        for n in range(SENDERS)
    ] + [asyncio.create_task(produce_sends(server.url, send_ledger, stop))]  # fmt: skip
    outages: list[tuple[float, float]] = []
    try:
        await asyncio.sleep(1.0)
        for _ in range(RESTARTS):
            outages.append(await asyncio.to_thread(kill_and_restart, server))
            await asyncio.sleep(2.0)  # load goes on with Redis back
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), timeout=60)

    client = aioredis.Redis.from_url(server.url)
    try:
        # Delivery catches up: everything enqueued is settled (delivered or dead).
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not await settled(client):
            await asyncio.sleep(0.2)
        entries = await stored_entries(client)
        dead = [
            fields.get(b"source_id", b"").decode()
            for _, fields in await client.xrange("email.send.dead")
        ]
    finally:
        await client.aclose()
    assert delivery.poll() is None, "the delivery worker died with Redis"
    terminate(delivery)
    # Back-off, not a busy loop: a handful of warnings per outage, not thousands.
    warnings = (tmp_path / "deliver.log").read_text().count('"level": "warning"')

    ingest_ledger.record_all("stored", stored_ledger_ids(entries))
    send_ledger.record_all("delivered", maildir_ids(maildir))
    send_ledger.record_all("dead", [d for d in dead if d])

    during_outage = [
        code for at, code in replies.codes for down, up in outages if down + MARGIN <= at <= up
    ]
    resumed_after = [
        min((at - up for at, code in replies.codes if code == 250 and at > up), default=-1.0)
        for _, up in outages
    ]
    unexplained = ingest_ledger.unexplained_duplicates("stored")
    ingest_ledger.report(
        ["stored"],
        dup_without_retry=len(unexplained),
        restarts=RESTARTS,
        replies_4xx=replies.count(lambda c: 400 <= c < 500),
        replies_5xx=replies.count(lambda c: c >= 500),
        during_outage=len(during_outage),
        resumed_after_s=max(resumed_after),
    )
    send_ledger.report(
        ["delivered", "dead"], restarts=RESTARTS, dead_letters=len(dead), warnings=warnings
    )

    # ingest: 4xx while down, never 250, never a 5xx; everything answered 250 is stored
    assert during_outage, "no reply came while Redis was down: the scenario tested nothing"
    assert all(400 <= code < 500 for code in during_outage), sorted(set(during_outage))
    assert replies.count(lambda c: c >= 500) == 0
    assert all(0 <= seconds < 10 for seconds in resumed_after), resumed_after
    # A kill between Redis's write and its reply leaves a stored message the client saw
    # 4xx for: at most one per session in flight per restart.
    ingest_ledger.check(["stored"], max_duplicates=SENDERS * RESTARTS)
    assert not unexplained, f"several entries for a single 250: {unexplained}"
    # delivery: every acknowledged XADD reaches the maildir or the dead letters, once
    send_ledger.check(["delivered", "dead"], max_duplicates=10 * RESTARTS)
    for worker in workers:
        assert worker.process is not None and worker.process.poll() is None
    assert not dead, f"dead letters from a Redis restart: {dead[:5]}"
    assert 0 < warnings <= 50 * RESTARTS, warnings
