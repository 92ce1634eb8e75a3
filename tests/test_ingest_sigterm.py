"""Graceful stop of ``python -m workers ingest`` as a real process: on SIGTERM the listener
closes, an idle session gets 421 at once, a transaction in progress finishes with 250, new
commands get 421 4.3.2, and the process exits 0; one JSON log line per message, no bodies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from tests.harness import wait_until
from tests.ingest_util import IngestProcess, SMTPConn, entries

SECRET_BODY = b"the-body-text-that-must-not-be-logged"


@pytest.fixture
def process(redis_url: str, ingest_workers: Callable[..., IngestProcess]) -> IngestProcess:
    return ingest_workers(redis_url, "--shutdown-grace", "3")


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_sessions_and_exits_zero(
    process: IngestProcess, redis: aioredis.Redis
) -> None:
    busy = await SMTPConn.open_session(process.port)
    assert (await busy.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
    assert (await busy.cmd("RCPT TO:<bob@example.com>"))[0] == 250
    assert (await busy.cmd("DATA"))[0] == 354
    await busy.send(b"Subject: in flight\r\n\r\n" + SECRET_BODY)
    idle = await SMTPConn.open_session(process.port)

    process.terminate()
    code, text = await idle.reply()
    assert (code, text.split()[0]) == (421, "4.3.2")
    assert await idle.closed_by_server()
    await wait_until(lambda: _refused(process.port), "connections refused after SIGTERM", timeout=3)

    await busy.send(b"\r\n.\r\n")
    code, text = await busy.reply()
    assert code == 250, text
    code, text = await busy.cmd("MAIL FROM:<alice@example.org>")
    assert (code, text.split()[0]) == (421, "4.3.2")
    assert await busy.closed_by_server()
    assert await asyncio.to_thread(process.wait, 10) == 0

    [(_, msg)] = await entries(redis)
    assert msg["headers"]["subject"] == "in flight"
    lines = [json.loads(line) for line in process.log_lines() if line.startswith("{")]
    [accepted] = [line for line in lines if line["event"] == "message_accepted"]
    assert accepted["id"] == msg["id"]
    assert accepted["code"] == 250
    assert accepted["recipients"] == 1
    assert accepted["peer"] == "127.0.0.1"
    assert accepted["size"] > len(SECRET_BODY)
    assert SECRET_BODY.decode() not in process.log_path.read_text()


async def test_grace_period_ends_a_stalled_transaction(
    process: IngestProcess, redis: aioredis.Redis
) -> None:
    stalled = await SMTPConn.open_session(process.port)
    assert (await stalled.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
    started = time.monotonic()
    process.terminate()
    code, _ = await stalled.reply(timeout=10)
    assert code == 421
    assert 2.5 < time.monotonic() - started < 8  # --shutdown-grace 3
    assert await asyncio.to_thread(process.wait, 10) == 0
    assert await entries(redis) == []
