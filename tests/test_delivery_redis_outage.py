"""Redis going away under a running worker: nothing lost, nothing sent twice, the worker
carries on when Redis is back (settlements are retried, never dropped)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

import workers.delivery.worker
from tests.delivery_util import (
    config_with,
    enqueue,
    make_config,
    received_at_least,
    running_worker,
    send_message,
    settled,
)
from tests.harness import RedisServer, wait_until
from tests.sinks import RecordingSink
from workers.streams.connection import connect


async def test_redis_restart_mid_stream(
    make_redis: Callable[..., RedisServer], sink: RecordingSink
) -> None:
    server = make_redis(appendonly=True)
    sink.stall_data = 0.02
    client = connect(server.url)  # retries a dropped connection, like the workers
    try:
        for n in range(40):
            await enqueue(client, send_message([f"u{n}@example.com"], message_id=f"r{n}"))
        async with running_worker(make_config(server.url, sink.url, concurrency=4)):
            await wait_until(lambda: received_at_least(sink, 5))
            server.stop()  # sends in flight finish against the relay; their records wait
            await asyncio.sleep(1.0)
            server.start()
            await wait_until(lambda: settled(client), timeout=30)
        counts = sink.recipient_counts()
        assert {rcpt for _, rcpt in counts} == {f"u{n}@example.com" for n in range(40)}
        assert max(counts.values()) == 1
        assert await client.xlen("email.send.dead") == 0
    finally:
        await client.aclose()


async def test_an_outage_longer_than_claim_after_sends_nothing_twice(
    make_redis: Callable[..., RedisServer], sink: RecordingSink
) -> None:
    """Two workers; Redis is away longer than --claim-after while each has sent what it
    held, their settlements waiting.  Redis counts idle time by the clock and keeps it
    over a restart, so every entry in hand looks stale when it is back: a worker claimed
    the other's entries before that one's settler tried again, found no record, and sent
    them again.  Claims now wait a while after a failed step, settlements go first."""
    server = make_redis(appendonly=True)
    sink.stall_data = 0.05
    client = connect(server.url)
    try:
        for n in range(60):
            await enqueue(client, send_message([f"u{n}@example.com"], message_id=f"o{n}"))
        config = make_config(server.url, sink.url, concurrency=4)
        async with running_worker(config), running_worker(config_with(config, consumer="w2")):
            await wait_until(lambda: received_at_least(sink, 8))
            server.stop(kill=True)
            await asyncio.sleep(config.claim_after + 4.5)  # the settlers back off to 5 s
            server.start()
            await wait_until(lambda: settled(client), timeout=45)
        counts = sink.recipient_counts()
        assert {rcpt for _, rcpt in counts} == {f"u{n}@example.com" for n in range(60)}
        assert max(counts.values()) == 1, [key for key, sent in counts.items() if sent > 1]
    finally:
        await client.aclose()


async def test_a_redis_back_without_its_data_gets_its_group_again(
    make_redis: Callable[..., RedisServer], sink: RecordingSink
) -> None:
    """A Redis restarted empty (no AOF, a new pod without a volume) has neither the group
    nor the functions: the worker makes them again and delivers what is sent next (before,
    each read failed with NOGROUP until the worker was restarted)."""
    server = make_redis(appendonly=False)
    client = connect(server.url)
    try:
        async with running_worker(make_config(server.url, sink.url)):
            await enqueue(client, send_message(["before@example.com"]))
            await wait_until(lambda: received_at_least(sink, 1))
            server.stop(kill=True)
            server.start()  # empty
            await enqueue(client, send_message(["after@example.com"]))
            await wait_until(lambda: received_at_least(sink, 2), timeout=15)
            await wait_until(lambda: settled(client), timeout=15)
        assert [rcpt for _, rcpt in sink.recipient_counts()] == [
            "before@example.com", "after@example.com"
        ]  # fmt: skip
    finally:
        await client.aclose()


async def test_a_stop_with_redis_gone_ends_within_its_budget(
    make_redis: Callable[..., RedisServer], sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis gone at SIGTERM: the outcomes of finished sends cannot be written; after the
    drain the worker gives them FLUSH_CAP, not another --shutdown-grace, so it stops within
    the pod's grace period (the entries stay pending and are redelivered)."""
    monkeypatch.setattr(workers.delivery.worker, "FLUSH_CAP", 1.0)
    server = make_redis()
    sink.stall_data = 0.5
    client = connect(server.url)
    try:
        for n in range(8):
            await enqueue(client, send_message([f"u{n}@example.com"], message_id=f"s{n}"))
        config = make_config(
            server.url, sink.url, concurrency=4, shutdown_grace=4.0, smtp_data_timeout=3.0,
            claim_after=10.0,
        )  # fmt: skip
        stopped_at = 0.0
        async with running_worker(config) as stop:
            await asyncio.to_thread(sink.data_arrived.wait, 5)
            server.stop()
            stopped_at = time.monotonic()
            stop.set()
        # the drain ends when the stalled sends do (0.5 s), then the flush gives up (1 s)
        assert time.monotonic() - stopped_at < sink.stall_data + 1.0 + 1.5
        assert sink.received  # sends in flight finished against the relay
    finally:
        await client.aclose()
