"""The chunked DATA reader on real sessions: empty messages, transparency dots, an end-of-data
sequence split over many TCP writes, commands pipelined behind the end of data, and an
oversized message drained with bounded memory while the session goes on."""

from __future__ import annotations

import asyncio
import itertools

import redis.asyncio as aioredis

from tests.ingest_util import SMTPConn, entries, ingest, message
from workers.ingest.data import DataRefusal, read_data, unstuff


async def _open_transaction(port: int) -> SMTPConn:
    conn = await SMTPConn.open_session(port)
    assert (await conn.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert (await conn.cmd("RCPT TO:<b@example.com>"))[0] == 250
    assert (await conn.cmd("DATA"))[0] == 354
    return conn


async def test_empty_message_and_transparency_dots(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url) as server:
        conn = await _open_transaction(server.port)
        await conn.send(b".\r\n")  # nothing at all
        assert (await conn.reply())[0] == 250
        conn2 = await _open_transaction(server.port)
        await conn2.send(b"Subject: dots\r\n\r\n..\r\n...two\r\n.x\r\nend\r\n.\r\n")
        assert (await conn2.reply())[0] == 250
        await conn.close()
        await conn2.close()
    [(_, empty), (_, dots)] = await entries(redis)
    assert empty["size"] > 0  # our Received field only
    assert dots["content"]["body"] == b".\n..two\nx\nend\n"


async def test_end_of_data_split_over_single_byte_writes(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        conn = await _open_transaction(server.port)
        for byte in b"Subject: slow\r\n\r\nbody\r\n.\r\n":
            await conn.send(bytes([byte]))
            await asyncio.sleep(0.002)
        assert (await conn.reply())[0] == 250
        await conn.close()
    [(_, msg)] = await entries(redis)
    assert msg["content"]["body"] == b"body\n"


async def test_pipelined_commands_after_a_large_message(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """Bytes read past the end of data go back to the command loop, in order."""
    big = message("big", ("y" * 78 + "\r\n") * 2000)  # ~160 KB: several reads
    async with ingest(redis_url) as server:
        conn = await _open_transaction(server.port)
        await conn.send(
            big + b".\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n"
            + message("second") + b".\r\nQUIT\r\n"
        )  # fmt: skip
        codes = [(await conn.reply())[0] for _ in range(6)]
        assert codes == [250, 250, 250, 354, 250, 221]
        await conn.close()
    subjects = [m["headers"]["subject"] for _, m in await entries(redis)]
    assert subjects == ["big", "second"]


async def test_oversized_message_is_drained_then_refused(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url, max_size=100_000) as server:
        conn = await _open_transaction(server.port)
        line = b"z" * 998 + b"\r\n"
        for _ in range(30):  # 3 MB in 100 KB writes
            await conn.send(line * 100)
        await conn.send(b".\r\n")
        code, text = await conn.reply()
        assert (code, text.split()[0]) == (552, "5.3.4")
        assert (await conn.transaction(message("after")))[0] == 250
        await conn.close()
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["after"]


def _reader_with(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_read_data_limits_and_leftover() -> None:
    exact = b"x" * 98 + b"\r\n"  # 100 octets as sent
    got = await read_data(_reader_with(exact + b".\r\nNOOP\r\n"), 100)
    assert got is not None and got.refusal is None and got.content == exact
    over = await read_data(_reader_with(b"x" + exact + b".\r\n"), 100)
    assert over is not None and over.refusal is DataRefusal.TOO_BIG
    long_line = await read_data(_reader_with(b"." + b"l" * 998 + b"\r\n.\r\n"), None)
    assert long_line is not None and long_line.refusal is None  # 1001 with dot and CRLF
    too_long = await read_data(_reader_with(b"." + b"l" * 999 + b"\r\n.\r\n"), None)
    assert too_long is not None and too_long.refusal is DataRefusal.LINE_TOO_LONG
    reader = _reader_with(b"a\r\n.\r\nQUIT\r\n")
    await read_data(reader, None)
    assert await reader.readline() == b"QUIT\r\n"
    assert await read_data(_reader_with(b"no end\r\n"), None) is None
    assert unstuff(b"..a\r\n.b\r\nc.\r\n") == b".a\r\nb\r\nc.\r\n"


def test_unstuffing_drops_the_dot_of_each_line_that_starts_with_one_and_nothing_else() -> None:
    """Every stuffed section of CR, LF, dots and a letter up to 7 long."""
    for length in range(1, 8):
        for characters in itertools.product(b"\r\n.a", repeat=length):
            stuffed = bytes(characters)
            lines = stuffed.split(b"\r\n")
            expected = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
            assert unstuff(stuffed) == expected, stuffed
