"""Helpers of the delivery tests: messages as a producer in any language writes them, a worker
in this process or as a real subprocess, and bounded waits on Redis state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis

from tests.harness import ROOT, RedisServer, child_env, wait_until
from tests.sinks import RecordingSink
from workers.config import DeliveryConfig
from workers.delivery import serve
from workers.streams.layout import StreamKeys
from workers.streams.outcomes import Outcomes

# Small timings so retries, claims and drains happen within a test's seconds.
FAST = {
    "retry_base": 0.2,
    "retry_cap": 1.0,
    "smtp_timeout": 0.5,
    "smtp_data_timeout": 0.5,
    "claim_after": 2.5,  # > 2 x (0.5 + 0.5), the longest a live worker holds an entry
    "shutdown_grace": 3.0,
    "idle_close": 5.0,
}
# Against a real MTA (a private Postfix, Haraka): its reply to the final dot waits for its
# queue file and, on a loaded machine, for the processes it starts on demand.  A reply later
# than --smtp-data-timeout defers a message the relay already has, and it is sent again
# (RFC 1047): with FAST's half second a CI run under load saw 6 dumps of 3 messages.
REAL_RELAY = {"smtp_timeout": 10.0, "smtp_data_timeout": 10.0, "claim_after": 45.0}


def make_config(redis_url: str, relay: str, **overrides: Any) -> DeliveryConfig:
    values: dict[str, Any] = {"redis_url": redis_url, "relay": relay, "consumer": "w1", **FAST}
    values.update(overrides)
    config = DeliveryConfig(**values)
    config.validate()
    return config


def send_message(
    to: Sequence[str] = ("ann@example.com",),
    *,
    sender: str | None = "app@example.com",
    subject: str = "Hello",
    text: str = "Hello there.\n",
    message_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "from": sender,
        "to": list(to),
        "headers": {"from": sender or "app@example.com", "to": ", ".join(to), "subject": subject},
        "content": {"content-type": "text/plain; charset=utf-8", "body": text.encode()},
    }
    if message_id is not None:
        message["id"] = message_id
    message.update(extra)
    return message


def with_attachment(message: dict[str, Any], filename: str, body: bytes) -> dict[str, Any]:
    """``message`` as multipart/mixed: its content, then a PDF attachment."""
    message["content"] = {
        "content-type": "multipart/mixed",
        "parts": [
            message["content"],
            {"content-type": "application/pdf", "filename": filename, "body": body},
        ],
    }
    return message


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


async def enqueue(redis: aioredis.Redis, message: dict[str, Any] | bytes) -> str:
    data = message if isinstance(message, bytes) else pack(message)
    entry_id = await redis.xadd("email.send", {"data": data})
    return entry_id.decode()


async def settled(redis: aioredis.Redis, partition: int | None = None) -> bool:
    """Nothing pending in the group, nothing unread, nothing waiting for retry (read in one
    MULTI, so a retry moving from the schedule to the stream is never missed in between);
    of one partition's stream and retries when ``partition`` is given."""
    tag = "" if partition is None else f"{{{partition}}}"
    stream = "email.send" + tag
    if not await redis.exists(stream):
        return False
    pipe = redis.pipeline(transaction=True)
    pipe.xinfo_groups(stream)
    pipe.xinfo_stream(stream)
    pipe.zcard(f"mailpool:{tag}retry")
    groups, info, waiting = await pipe.execute()
    if not groups:
        return False
    group = groups[0]
    all_read = group["last-delivered-id"] == info["last-generated-id"]
    return int(group["pending"]) == 0 and all_read and int(waiting) == 0


def received_at_least(sink: RecordingSink, count: int) -> bool:
    """The sink has accepted ``count`` messages or more (a check for ``wait_until``)."""
    return len(sink.received) >= count


async def stream_fields(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    """Entries of a stream as {field: text} (``data`` kept as bytes), oldest first."""
    rows = []
    for entry_id, fields in await redis.xrange(stream):
        row: dict[str, Any] = {"_id": entry_id.decode()}
        for name, value in fields.items():
            key = name.decode()
            row[key] = value if key == "data" else value.decode()
        rows.append(row)
    return rows


async def events(redis: aioredis.Redis) -> list[dict[str, Any]]:
    rows = await stream_fields(redis, "email.send.events")
    for row in rows:
        row["recipients"] = json.loads(row["recipients"])
    return rows


def outcomes_for(redis: aioredis.Redis) -> Outcomes:
    """The delivery group's settlement writer, as a worker with short-lived records has it."""
    return Outcomes(redis, StreamKeys(), group="delivery",
                    sent_ttl=60, events_maxlen=1000)  # fmt: skip


@contextlib.asynccontextmanager
async def running_worker(config: DeliveryConfig) -> AsyncIterator[asyncio.Event]:
    """``serve`` in this event loop; stopped (gracefully) when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=config.shutdown_grace + 5)


async def run_until_settled(
    redis: aioredis.Redis,
    config: DeliveryConfig,
    *,
    timeout: float = 15.0,
    partition: int | None = None,
) -> None:
    """A worker with ``config`` in this event loop until every entry is settled (see
    ``settled``, waited for up to ``timeout`` s); then stopped gracefully."""
    async with running_worker(config):
        await wait_until(lambda: settled(redis, partition), timeout=timeout)


def worker_process(
    redis_url: str, relay: str, *extra: str, consumer: str = "p1", log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``python -m workers deliver`` as a real process (for SIGTERM and kill -9 tests)."""
    args = [
        sys.executable, "-m", "workers", "deliver", "--redis-url", redis_url, "--relay", relay,
        "--consumer", consumer, "--log-format", "json",
        *[arg for name, value in FAST.items() for arg in (_flag(name), str(value))],
        *extra,
    ]  # fmt: skip
    output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(args, cwd=ROOT, stdout=output, stderr=output, env=child_env())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def terminate(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15
) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=timeout)


def config_with(config: DeliveryConfig, **changes: Any) -> DeliveryConfig:
    return dataclasses.replace(config, **changes)


@contextlib.contextmanager
def redis_stalled(server: RedisServer) -> Iterator[float]:
    """Redis stops answering (SIGSTOP) for the block, yielding when it stopped: connections
    stay open, new ones complete in the kernel, and every command sent meanwhile waits in a
    socket buffer and runs at SIGCONT (always sent, even when the block fails)."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        server.process.send_signal(signal.SIGCONT)
