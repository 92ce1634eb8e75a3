"""Connection caps under hostile load: a burst of connections never gets more sessions
than ``--max-connections``, and one client address cannot take every session
(``--max-connections-per-ip``).

The cap used to be checked when asyncio created the protocol, before the session was
counted (that happens a loop iteration later, in ``connection_made``): a burst accepted in
one go passed the check many times over (12 sessions beyond the cap were measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import pytest

from tests.chaos.scenario import size
from tests.harness import free_port
from tests.ingest_util import IngestProcess, SMTPConn, message

BURST = size(200, 1000)
CAP = 50


def _start_idle(
    ingest_workers: Callable[..., IngestProcess], redis_url: str, *args: str
) -> IngestProcess:
    """A worker with no session open: the probe that saw it listening has been counted out
    (it would take one of the places the test counts)."""
    http = free_port()
    worker = ingest_workers(redis_url, "--http", f"127.0.0.1:{http}", *args)
    for _ in range(100):
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as reply:
            metrics = reply.read().decode()
        if re.search(r"^mailpool_ingest_connections 0\.0$", metrics, re.MULTILINE):
            return worker
        time.sleep(0.05)
    raise AssertionError("the worker kept a session open")


async def _greeting(port: int, source: str, replies: Counter[int], opened: list[SMTPConn]) -> None:
    """Open a connection from ``source`` and note the first reply; keep it open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    conn = SMTPConn(reader, writer)
    opened.append(conn)
    try:
        code, _ = await conn.reply(30)
    except (ConnectionError, TimeoutError):
        code = 0
    replies[code] += 1


async def _burst(port: int, sources: list[str]) -> tuple[Counter[int], list[SMTPConn]]:
    replies: Counter[int] = Counter()
    opened: list[SMTPConn] = []
    await asyncio.gather(*(_greeting(port, source, replies, opened) for source in sources))
    return replies, opened


async def _close_all(opened: list[SMTPConn]) -> None:
    for conn in opened:
        with contextlib.suppress(Exception):
            await conn.close()


@pytest.mark.timeout(120)
async def test_a_burst_never_gets_more_sessions_than_the_cap(
    redis_url: str, ingest_workers: Callable[..., IngestProcess]
) -> None:
    worker = _start_idle(
        ingest_workers,
        redis_url,
        "--max-connections",
        str(CAP),
        "--max-connections-per-ip",
        str(CAP),
    )
    replies, opened = await _burst(worker.port, ["127.0.0.1"] * BURST)
    try:
        # Every connection is still open: exactly CAP sessions were greeted, the rest 421.
        assert replies == Counter({220: CAP, 421: BURST - CAP}), replies
    finally:
        await _close_all(opened)


async def _open_from(port: int, source: str) -> tuple[SMTPConn, int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    conn = SMTPConn(reader, writer)
    code, text = await conn.reply()
    return conn, code, text


@pytest.mark.timeout(60)
async def test_one_client_address_cannot_take_every_session(
    redis_url: str, ingest_workers: Callable[..., IngestProcess]
) -> None:
    """One client holding idle sessions used to lock everyone else out with 421; by default
    one address gets a tenth of --max-connections (at least 10)."""
    worker = _start_idle(ingest_workers, redis_url, "--max-connections", "40")
    replies, opened = await _burst(worker.port, ["127.0.0.1"] * 40)
    try:
        assert replies == Counter({220: 10, 421: 30}), replies
        refused, code, text = await _open_from(worker.port, "127.0.0.1")
        assert (code, text.split()[:2]) == (421, ["4.7.0", "mx.test"])
        assert "from your address" in text
        await refused.close()
        # Another client is served as usual.
        other, code, _ = await _open_from(worker.port, "127.0.0.2")
        assert code == 220
        await other.ehlo()
        assert (await other.transaction(message("from elsewhere")))[0] == 250
        await other.close()
    finally:
        await _close_all(opened)
    # The first client's sessions ended: it is served again (once the worker saw them end).
    for _ in range(50):
        again, code, _ = await _open_from(worker.port, "127.0.0.1")
        await again.close()
        if code == 220:
            break
        await asyncio.sleep(0.1)
    assert code == 220
