"""Time limits on real sockets: an idle client is cut off after --command-timeout, a client that
trickles DATA bytes is bounded by --connection-timeout, both with 421 4.4.2; neither limit
cuts a session off while its message is being stored."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from tests.harness import RedisServer
from tests.ingest_util import SMTPConn, entries, ingest, message


async def _reply_within(conn: SMTPConn, seconds: float) -> tuple[int, str] | None:
    """The server's next reply if it comes within ``seconds``, else None."""
    try:
        return await conn.reply(timeout=seconds)
    except TimeoutError:
        return None


async def test_idle_client_gets_421_after_the_command_timeout(redis_url: str) -> None:
    async with ingest(redis_url, command_timeout=0.4) as server:
        conn = await SMTPConn.open_session(server.port)
        started = time.monotonic()
        code, text = await conn.reply(timeout=5)
        waited = time.monotonic() - started
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert 0.3 < waited < 2.0
        assert await conn.closed_by_server()


async def test_slow_command_bytes_are_bounded_by_the_command_timeout(redis_url: str) -> None:
    async with ingest(redis_url, command_timeout=0.5) as server:
        conn = await SMTPConn.open(server.port)
        started = time.monotonic()
        with_reply = None
        for byte in b"EHLO slow.client.test":  # one byte every 0.1 s, never a full line
            try:
                await conn.send(bytes([byte]))
            except ConnectionError:
                break
            if with_reply := await _reply_within(conn, 0.1):
                break
        assert with_reply is not None and with_reply[0] == 421
        assert time.monotonic() - started < 2.0


async def test_data_trickler_is_bounded_by_the_connection_timeout(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """During DATA every chunk restarts the command timeout (RFC 5321 data block timeout), so a
    client sending one byte per 0.1 s would stay forever; the session limit ends it."""
    async with ingest(redis_url, command_timeout=0.5, connection_timeout=1.5) as server:
        conn = await SMTPConn.open_session(server.port)
        assert (await conn.cmd("MAIL FROM:<a@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        started = time.monotonic()
        reply = None
        for _ in range(60):
            try:
                await conn.send(b"x")
            except ConnectionError:
                break
            if reply := await _reply_within(conn, 0.1):
                break
        elapsed = time.monotonic() - started
        assert reply is not None
        assert (reply[0], reply[1].split()[0]) == (421, "4.4.2")
        assert 1.0 < elapsed < 3.0  # well past the 0.5 s command timeout: chunks reset it
        await conn.close()
    assert await entries(redis) == []


async def test_session_limit_spares_a_busy_but_steady_client(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """Messages sent within the limits are taken; the session limit then closes the session."""
    async with ingest(redis_url, command_timeout=1.0, connection_timeout=1.0) as server:
        conn = await SMTPConn.open_session(server.port)
        assert (await conn.transaction(message("one")))[0] == 250
        code, _ = await conn.reply(timeout=3)
        assert code == 421
        await conn.close()
    assert len(await entries(redis)) == 1


async def test_a_store_slower_than_the_timeouts_still_gets_its_250(
    make_redis: Callable[..., RedisServer],
) -> None:
    """Redis stalls longer than both limits while the message is stored: the sender gets its
    250 once Redis answers (a 421 then would make it send a message already stored)."""
    server = make_redis()
    assert server.process is not None
    async with ingest(
        server.url, command_timeout=0.5, connection_timeout=1.0, store_timeout=10.0
    ) as smtp:
        conn = await SMTPConn.open_session(smtp.port)
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        server.process.send_signal(signal.SIGSTOP)
        try:
            await conn.send(message("stalled") + b".\r\n")
            await asyncio.sleep(2.0)
        finally:
            server.process.send_signal(signal.SIGCONT)
        code, text = await conn.reply(timeout=10)
        assert code == 250, text
        code, _ = await conn.reply(timeout=5)  # then the session limit, long past
        assert code == 421
        await conn.close()
