"""Helpers of the chaos scenarios: the size switch (short in CI, full with
``MAILPOOL_CHAOS=full``, as ``make chaos`` runs them), smtp-source runs, a ledger-aware SMTP
sender, readers of ``email.receive`` and of a maildir, and process memory figures.

Short form by default: each scenario well under ~25 s on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis

from tests.chaos.ledger import HEADER, Ledger, id_in_headers, id_in_raw
from tests.ingest_util import SMTPConn

FULL = os.environ.get("MAILPOOL_CHAOS", "").lower() == "full"
SMTP_SOURCE = "/usr/sbin/smtp-source"
QUEUED_AS = re.compile(rb"<<< 250 2\.0\.0 OK queued as (\d+-\d+)")


def size(short: int, full: int) -> int:
    """The scenario size for this run: ``short`` in CI, ``full`` with MAILPOOL_CHAOS=full."""
    return full if FULL else short


def seconds(short: float, full: float) -> float:
    """A duration of the scenario for this run, as ``size``."""
    return full if FULL else short


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a process (VmRSS, KiB), or its peak so far (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@dataclass
class SourceRun:
    """What one smtp-source run saw: the entry ids of its 250 replies, its exit status."""

    receipts: list[str]
    returncode: int
    stderr_tail: str


def run_smtp_source(
    port: int,
    *,
    messages: int,
    sessions: int,
    recipient: str,
    length: int = 512,
    timeout: float = 600,
) -> subprocess.Popen[bytes]:
    """Start smtp-source (-N: each message's recipient gets a unique number in front of
    ``recipient``, which is the message's ledger id).  -v logs every reply, so the
    ``queued as <entry-id>`` of each 250 is known; -d keeps a session for many messages."""
    args = [
        SMTP_SOURCE, "-v", "-d", "-N", "-s", str(sessions), "-m", str(messages),
        "-l", str(length), "-M", "client.test", "-f", "chaos@example.org", "-t", recipient,
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_smtp_source(process: subprocess.Popen[bytes], timeout: float) -> SourceRun:
    _, err = process.communicate(timeout=timeout)
    receipts = [m.decode() for m in QUEUED_AS.findall(err)]
    tail = err[-600:].decode("utf-8", "replace")
    return SourceRun(receipts, process.returncode, tail)


async def stored_entries(
    redis: aioredis.Redis, stream: str = "email.receive", batch: int = 2000
) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of ``stream`` decoded (read in batches: full runs hold 20 000)."""
    found: list[tuple[str, dict[str, Any]]] = []
    start = "-"
    while True:
        rows = await redis.xrange(stream, min=start, count=batch)
        for entry_id, fields in rows:
            found.append((entry_id.decode(), msgpack.unpackb(fields[b"data"], raw=False)))
        if len(rows) < batch:
            return found
        start = "(" + rows[-1][0].decode()


def receive_ledger_id(message: dict[str, Any]) -> str | None:
    return id_in_headers(message.get("headers", {}))


def stored_ledger_ids(entries: Iterable[tuple[str, dict[str, Any]]]) -> list[str | None]:
    """The ledger id of each entry ``stored_entries`` read (None: a message without one)."""
    return [receive_ledger_id(message) for _, message in entries]


async def record_stored(redis_url: str, ledger: Ledger) -> int:
    """Record every entry of ``email.receive`` as ``stored`` in ``ledger``; how many."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await stored_entries(client, batch=4)
    finally:
        await client.aclose()
    ledger.record_all("stored", stored_ledger_ids(entries))
    return len(entries)


def ledger_message(ledger_id: str, body: str = "chaos body\r\n", **headers: str) -> bytes:
    fields = {
        "From": "chaos@example.org",
        "To": "sink@example.com",
        "Subject": f"chaos {ledger_id}",
        HEADER: ledger_id,
        **headers,
    }
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return (head + "\r\n" + body).encode()


@dataclass
class Replies:
    """Final replies to DATA seen by the senders, by code, with when they came."""

    codes: list[tuple[float, int]] = field(default_factory=list)

    def add(self, code: int) -> None:
        self.codes.append((time.monotonic(), code))

    def count(self, predicate: Callable[[int], bool]) -> int:
        return sum(1 for _, code in self.codes if predicate(code))


async def send_with_ledger(
    port: int,
    ledger: Ledger,
    ledger_ids: Iterable[str],
    replies: Replies,
    *,
    retry_4xx: bool = True,
    give_up_after: float = 30.0,
    pause: float = 0.05,
    make_message: Callable[[str], bytes] = ledger_message,
) -> None:
    """One SMTP client sending ``ledger_ids`` in turn over one session, as an MTA would:
    250 -> accepted; 4xx -> wait and retry the same message (a new session when the
    server closed it, for up to ``give_up_after`` s); 5xx -> rejected; a broken connection
    -> indeterminate (it may have been stored)."""
    conn: SMTPConn | None = None
    try:
        for ledger_id in ledger_ids:
            ledger.send(ledger_id)
            deadline = time.monotonic() + give_up_after
            while True:
                try:
                    if conn is None:
                        conn = await SMTPConn.open_session(port)
                    code, text = await conn.transaction(make_message(ledger_id))
                except (ConnectionError, OSError, TimeoutError, AssertionError):
                    ledger.mark_indeterminate(ledger_id)
                    conn = await _drop(conn)
                    code, text = 0, "connection lost"
                if code:
                    replies.add(code)
                if code == 250:
                    ledger.accept(ledger_id, receipt=text.rsplit(" ", 1)[-1])
                    break
                if code >= 500:
                    ledger.reject(ledger_id, code)
                    break
                if code:
                    ledger.reject(ledger_id, code)
                if not retry_4xx or time.monotonic() > deadline:
                    break
                if code == 421:
                    conn = await _drop(conn)
                await asyncio.sleep(pause)
    finally:
        await _drop(conn)


async def _drop(conn: SMTPConn | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()
    return None


def ids_until(stop: asyncio.Event, prefix: str, limit: int = 1_000_000) -> Iterator[str]:
    """Fresh ledger ids for a sender that keeps going until ``stop`` is set."""
    for number in range(limit):
        if stop.is_set():
            return
        yield f"{prefix}-{number}"


def maildir_ids(path: Path) -> list[str | None]:
    """The ledger id of every message file in a maildir (``new`` and ``cur``)."""
    return [
        id_in_raw(file.read_bytes())
        for sub in ("new", "cur")
        if (path / sub).is_dir()
        for file in sorted((path / sub).iterdir())
    ]
