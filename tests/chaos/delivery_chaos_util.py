"""Shared parts of the delivery chaos scenarios: bulk enqueueing with one unique id and
recipient per message, a fleet of real worker processes, and reading the outcomes (copies at
the sink, dead letters) into the ledger (sizes and durations: tests/chaos/scenario.py).

Every message goes to its own recipient ``<id>@example.com`` with message id ``<id>`` and
the header ``X-Ledger-Id: <id>`` (the ledger's marker), so a copy at the sink names its
message; counting is :class:`tests.chaos.ledger.Ledger`'s.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from tests.chaos.ledger import HEADER, Ledger, id_in_raw
from tests.delivery_util import pack, send_message, terminate, worker_process
from tests.sinks import RecordingSink


def recipient(message_id: str) -> str:
    return f"{message_id}@example.com"


async def enqueue_many(
    redis: aioredis.Redis, ids: Iterable[str], *, chunk: int = 500
) -> dict[str, str]:
    """XADD one message per id (pipelined); returns id -> stream entry id (each XADD that
    returned an entry id is an accepted message)."""
    accepted: dict[str, str] = {}
    batch: list[str] = []

    async def flush() -> None:
        pipe = redis.pipeline(transaction=False)
        for message_id in batch:
            message = send_message([recipient(message_id)], message_id=message_id)
            message["headers"][HEADER.lower()] = message_id
            pipe.xadd("email.send", {"data": pack(message)})
        for message_id, entry in zip(batch, await pipe.execute(), strict=True):
            accepted[message_id] = entry.decode()
        batch.clear()

    for message_id in ids:
        batch.append(message_id)
        if len(batch) >= chunk:
            await flush()
    if batch:
        await flush()
    return accepted


async def dead_letters(redis: aioredis.Redis) -> list[dict[str, str]]:
    """``email.send.dead`` as text fields (``data`` left out)."""
    rows = []
    for entry_id, fields in await redis.xrange("email.send.dead"):
        row = {"_id": entry_id.decode()}
        for name, value in fields.items():
            if name != b"data":
                row[name.decode()] = value.decode(errors="replace")
        rows.append(row)
    return rows


async def observe(ledger: Ledger, redis: aioredis.Redis, sink: RecordingSink) -> None:
    """Record the outcomes: every copy the sink answered 250 to (``delivered``, by the
    ``X-Ledger-Id`` in the bytes it got) and every dead letter (``dead``, by message id)."""
    ledger.record_all("delivered", [id_in_raw(r.data) for r in list(sink.received)])
    ledger.record_all("dead", [row.get("message_id") for row in await dead_letters(redis)])


@dataclass
class Fleet:
    """Delivery workers as real ``python -m workers deliver`` processes."""

    redis_url: str
    relay: str
    extra: tuple[str, ...]
    log: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: int = 0

    def start(self, name: str | None = None) -> str:
        self.started += 1
        name = name or f"w{self.started}"
        self.workers[name] = worker_process(
            self.redis_url, self.relay, *self.extra, consumer=name, log=self.log
        )
        return name

    def kill(self, name: str) -> None:
        """kill -9: no drain, no settlement of what is in flight."""
        process = self.workers.pop(name)
        process.kill()
        process.wait(timeout=10)

    def stop(self, name: str, timeout: float = 20) -> int:
        """SIGTERM and wait: the worker drains and must exit 0."""
        process = self.workers.pop(name)
        return terminate(process, signal.SIGTERM, timeout=timeout)

    def crashed(self) -> dict[str, int | None]:
        """Workers that exited without being told to."""
        return {n: p.returncode for n, p in self.workers.items() if p.poll() is not None}

    def close(self) -> None:
        for process in self.workers.values():
            terminate(process, signal.SIGKILL)
        self.workers.clear()
