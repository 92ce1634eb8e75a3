"""Redis out of memory (maxmemory, noeviction): once full, every further DATA gets a 4xx and
never a 250, nothing refused is stored anyway, and ingest resumes when memory frees."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import (
    FULL,
    Replies,
    ledger_message,
    send_with_ledger,
    size,
    stored_entries,
    stored_ledger_ids,
)
from tests.harness import RedisServer
from tests.ingest_util import IngestProcess

HEADROOM = size(1, 8) * 1024 * 1024  # room above the starting memory before it is full
WHEN_FULL = size(60, 600)  # DATA attempts made while Redis is full
SENDERS = 6
BATCH_TIMEOUT = 120 if FULL else 30  # seconds: a stuck phase fails, never hangs
# Deleting the ballast must make room for every refused message's retry (~20 KB each
# stored, plus the client buffers of the burst).
BALLAST = 4 * 1024 * 1024 + WHEN_FULL * 40 * 1024
PIN_UNDER = 1024 * 1024  # < BALLAST: deleting the ballast frees memory again
BODY = ("x" * 76 + "\r\n") * 200  # ~16 KB a message


async def send_batch(port: int, ledger: Ledger, ids: list[str], *, retry: bool) -> Replies:
    """``ids`` over SENDERS concurrent sessions; with ``retry``, 4xx are retried."""
    replies = Replies()
    senders = (
        send_with_ledger(
            port,
            ledger,
            ids[n::SENDERS],
            replies,
            retry_4xx=retry,
            give_up_after=10,
            make_message=lambda ledger_id: ledger_message(ledger_id, BODY),
        )
        for n in range(SENDERS)
    )
    await asyncio.wait_for(asyncio.gather(*senders), timeout=BATCH_TIMEOUT)
    return replies


async def settled_memory(client: aioredis.Redis, timeout: float = 5.0) -> int:
    """used_memory once client buffers are back under 1 MB."""
    # a loop, not wait_until: past the timeout it returns its reading rather than failing
    deadline = time.monotonic() + timeout
    while True:
        memory = await client.info("memory")
        if int(memory["mem_clients_normal"]) < 1024 * 1024 or time.monotonic() > deadline:
            return int(memory["used_memory"])
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300 if FULL else 60)
async def test_out_of_memory_answers_4xx_never_250_and_resumes(
    make_redis: Callable[..., RedisServer], ingest_workers: Callable[..., IngestProcess]
) -> None:
    server = make_redis(extra=["--maxmemory-policy", "noeviction"])
    worker = ingest_workers(server.url)
    client = aioredis.Redis.from_url(server.url)
    ledger = Ledger("redis-oom")
    try:
        await client.set("ballast", b"b" * BALLAST)
        # (the SET's own query buffer counts until the clients cron frees it)
        await client.config_set("maxmemory", str(await settled_memory(client) + HEADROOM))

        # Fill: send until Redis refuses (the first 4xx).
        filled_with = 0
        started = time.monotonic()
        while time.monotonic() - started < 30:
            batch = [f"fill-{filled_with + n}" for n in range(SENDERS)]
            filled_with += SENDERS
            replies = await send_batch(worker.port, ledger, batch, retry=False)
            if replies.count(lambda c: c != 250):
                break
        else:
            raise AssertionError("Redis never filled up")
        assert ledger.accepted, "full before the first message: headroom too small"
        # At the edge Redis counts the query buffers of the XADDs in flight (measured: ~5 MB
        # after a burst of 16 KB messages), which its clients cron shrinks within a second,
        # so memory dips under the limit again.  Let them settle, then pin the limit under
        # what the data uses, so that "full" stays full while the refusals are counted.
        used = await settled_memory(client)
        await client.config_set("maxmemory", str(used - PIN_UNDER))
        before = await client.xlen("email.receive")

        # Full: every further DATA is refused with a 4xx, never a 250, and nothing is stored.
        full_ids = [f"full-{n}" for n in range(WHEN_FULL)]
        when_full = await send_batch(worker.port, ledger, full_ids, retry=False)
        codes_when_full = sorted({code for _, code in when_full.codes})
        stored_when_full = await client.xlen("email.receive") - before

        # Memory frees: the same senders' retries of everything refused are now accepted.
        await client.delete("ballast")
        refused = sorted(ledger.rejected)
        resumed_at = time.monotonic()
        after = await send_batch(worker.port, ledger, refused, retry=True)
        resumed_in = time.monotonic() - resumed_at
        entries = await stored_entries(client)
    finally:
        await client.aclose()

    ledger.record_all("stored", stored_ledger_ids(entries))
    ledger.report(
        ["stored"],
        filled_after=filled_with,
        when_full=len(when_full.codes),
        when_full_250=when_full.count(lambda c: c == 250),
        when_full_codes="/".join(map(str, codes_when_full)),
        retried=len(refused),
        retried_ok=after.count(lambda c: c == 250),
        resumed_in_s=resumed_in,
    )
    assert len(when_full.codes) == WHEN_FULL  # every attempt got a reply (no hang, no drop)
    assert all(400 <= code < 500 for code in codes_when_full), codes_when_full
    assert stored_when_full == 0
    assert not ledger.rejected, f"still refused after memory freed: {len(ledger.rejected)}"
    ledger.check(["stored"])
    assert ledger.settled(["stored"]) == ledger.sent  # each exactly once (dup checked above)
    assert worker.process is not None and worker.process.poll() is None
