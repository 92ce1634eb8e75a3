"""A client may half-close its connection once it has sent its last command (QUIT pipelined
after the dot, RFC 2920): every command received before the end of its input is answered,
a message among them is stored once and gets its 250, and the session then ends.  A client
that hangs up in the middle of a message gets nothing stored."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from tests.ingest_util import entries, ingest, message

TRANSACTION = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"


async def _half_closed_session(port: int, octets: bytes) -> list[int]:
    """Write ``octets`` at once, half-close, and read every reply until the server closes:
    the codes of the replies (a multiline reply counted once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(octets)
    await writer.drain()
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), timeout=10)  # up to the server's close
    writer.close()
    return [int(line[:3]) for line in received.split(b"\r\n") if line[3:4] == b" "]


async def test_a_message_pipelined_before_a_half_close_is_answered_and_stored_once(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """Before, the end of the input cancelled the session while its message was being
    stored: stored, but no reply, so the client (rightly) sent it again."""
    async with ingest(redis_url) as server:
        sessions = [
            TRANSACTION + b"DATA\r\n" + message(f"m{n}") + b".\r\nQUIT\r\n" for n in range(5)
        ]
        replies = await asyncio.gather(*(_half_closed_session(server.port, s) for s in sessions))
    assert replies == [[220, 250, 250, 250, 354, 250, 221]] * 5
    subjects = sorted(m["headers"]["subject"] for _, m in await entries(redis))
    assert subjects == [f"m{n}" for n in range(5)]


async def test_without_quit_the_session_ends_after_the_last_reply(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        chunked = b"BDAT %d LAST\r\n" % len(message("bdat")) + message("bdat")
        dotted = b"DATA\r\n" + message("data") + b".\r\n"
        replies = [
            await _half_closed_session(server.port, TRANSACTION + dotted),
            await _half_closed_session(server.port, TRANSACTION + chunked),
            await _half_closed_session(server.port, b"NOOP\r\nNOOP"),  # an unfinished line
            await _half_closed_session(server.port, b""),
        ]
    assert replies == [[220, 250, 250, 250, 354, 250], [220, 250, 250, 250, 250], [220, 250],
                       [220]]  # fmt: skip
    assert sorted(m["headers"]["subject"] for _, m in await entries(redis)) == ["bdat", "data"]


async def test_a_half_close_in_the_middle_of_a_message_stores_nothing(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        cut = message("cut")[:-5]
        replies = [
            await _half_closed_session(server.port, TRANSACTION + b"DATA\r\n" + cut),
            await _half_closed_session(server.port, TRANSACTION + b"BDAT 500 LAST\r\n" + cut),
        ]
    assert replies == [[220, 250, 250, 250, 354], [220, 250, 250, 250]]
    assert await entries(redis) == []
