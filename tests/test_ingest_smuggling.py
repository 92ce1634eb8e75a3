"""SMTP smuggling: no end-of-data variant other than <CRLF>.<CRLF> ends DATA, so one DATA never
yields two messages (checked on the stream), and bare CR/LF end up inside the one message."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.ingest_util import SMTPConn, entries, ingest

# Each is what a lenient server might take for the end of DATA (SEC Consult, Dec. 2023).
VARIANTS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r.\r",
    b"\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
]

SMUGGLED = (
    b"MAIL FROM:<ceo@victim.example>\r\n"
    b"RCPT TO:<bob@example.com>\r\n"
    b"DATA\r\n"
    b"From: ceo@victim.example\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"pay now"
)


@pytest.mark.parametrize("variant", VARIANTS, ids=[repr(v)[2:-1] for v in VARIANTS])
async def test_one_data_one_message(redis_url: str, redis: aioredis.Redis, variant: bytes) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        await conn.send(
            b"From: alice@example.org\r\nSubject: outer\r\n\r\nhello"
            + variant
            + SMUGGLED
            + b"\r\n.\r\nQUIT\r\n"
        )
        code, text = await conn.reply()
        assert code == 250, text
        assert (await conn.reply())[0] == 221  # the next reply answers QUIT, nothing between
        await conn.close()
    found = await entries(redis)
    assert len(found) == 1
    [(_, msg)] = found
    assert msg["headers"]["subject"] == "outer"
    assert msg["from"] == "alice@example.org"
    # The would-be second message is text of the first one.
    body = msg["content"]["body"]
    assert b"Subject: smuggled" in body
    assert b"pay now" in body
