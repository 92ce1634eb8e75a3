"""Time limits on real sockets: an idle client is cut off after --command-timeout, a client that
trickles DATA bytes is bounded by --connection-timeout, both with 421 4.4.2."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from tests.ingest_util import SMTPConn, entries, ingest, message


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
            await asyncio.sleep(0.1)
            if conn.reader.at_eof() or conn.reader._buffer:  # type: ignore[attr-defined]
                with_reply = await conn.reply()
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
            await asyncio.sleep(0.1)
            if conn.reader._buffer or conn.reader.at_eof():  # type: ignore[attr-defined]
                reply = await conn.reply()
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
