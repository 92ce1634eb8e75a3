"""RFC 3030 CHUNKING on ingest: BDAT chunks make one message; a chunk's octets are always
read, so a refused BDAT never turns its content into commands; the size limit and the memory
budget hold across chunks.  (No BDAT client is among the peers Debian has here: Postfix's
SMTP client and swaks 20201014 send DATA; Exim, which sends BDAT, conflicts with Postfix.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.harness import wait_until
from tests.ingest_util import SMTPConn, entries, ingest, make_certificate, message
from workers.ingest.chunking import parse_bdat

MiB = 1 << 20


async def _transaction_open(port: int) -> SMTPConn:
    conn = await SMTPConn.open_session(port)
    assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
    assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
    return conn


async def _bdat(conn: SMTPConn, chunk: bytes, last: bool = False) -> tuple[int, str]:
    await conn.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
    return await conn.reply()


async def test_chunks_make_one_message(redis_url: str, redis: aioredis.Redis) -> None:
    body = message("chunked", "line one\r\n.line two starts with a dot\r\n")
    chunks = [body[:10], body[10:37], body[37:]]
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        assert "CHUNKING" in await conn.ehlo()
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
        replies = [await _bdat(conn, chunks[0])]
        # Pipelined: two chunks in one write (RFC 3030 with PIPELINING), then an empty LAST.
        await conn.send(b"BDAT %d\r\n%bBDAT %d\r\n%b" % (
            len(chunks[1]), chunks[1], len(chunks[2]), chunks[2]
        ))  # fmt: skip
        replies += [await conn.reply(), await conn.reply()]
        replies.append(await _bdat(conn, b"", last=True))
        await conn.close()
    assert [code for code, _ in replies] == [250, 250, 250, 250]
    assert replies[0][1] == "2.0.0 10 octets received"
    assert replies[3][1].startswith("2.0.0 OK queued as ")
    [(entry_id, msg)] = await entries(redis)
    assert replies[3][1].endswith(entry_id)
    assert msg["headers"]["subject"] == "chunked"
    # No dot-stuffing with BDAT: the leading dot is content.
    assert msg["content"]["body"] == b"line one\n.line two starts with a dot\n\n"
    assert msg["size"] > len(body)  # our Received field and the chunks as sent


async def test_one_last_chunk_and_two_messages_in_a_session(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        conn = await _transaction_open(server.port)
        first = await _bdat(conn, message("one"), last=True)
        # The transaction ended with LAST: the next starts with MAIL, and DATA works again.
        second = await conn.transaction(message("two"))
        await conn.close()
    assert (first[0], second[0]) == (250, 250)
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["one", "two"]


async def test_a_refused_bdat_is_read_and_its_octets_never_become_commands(
    redis_url: str, redis: aioredis.Redis
) -> None:
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        no_mail = await _bdat(conn, smuggled)
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        no_rcpt = await _bdat(conn, smuggled, last=True)
        # The session is in step: the next reply answers NOOP.
        noop = await conn.cmd("NOOP")
        assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
        stored = await _bdat(conn, message("real"), last=True)
        await conn.close()
    assert (no_mail[0], no_mail[1].split()[0]) == (503, "5.5.1")
    assert (no_rcpt[0], no_rcpt[1].split()[0]) == (503, "5.5.1")
    assert noop == (250, "2.0.0 OK")
    assert stored[0] == 250
    [(_, msg)] = await entries(redis)
    assert (msg["from"], msg["to"]) == ("alice@example.org", ["bob@example.com"])


async def test_bdat_in_a_helo_session_is_read_and_refused(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """CHUNKING is offered after EHLO only (RFC 3030 section 2): a HELO session's BDAT
    gets 503 5.5.1, its chunk is read and dropped, and the session goes on."""
    smuggled = b"RSET\r\nMAIL FROM:<evil@example.org>\r\n"
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        assert (await conn.cmd("HELO client.test"))[0] == 250
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
        refused = await _bdat(conn, smuggled, last=True)
        noop = await conn.cmd("NOOP")
        assert (await conn.cmd("DATA"))[0] == 354
        await conn.send(message("by data") + b".\r\n")
        stored = await conn.reply()
        await conn.close()
    assert (refused[0], refused[1].split()[0]) == (503, "5.5.1")
    assert (noop[0], stored[0]) == (250, 250)
    [(_, msg)] = await entries(redis)
    assert (msg["from"], msg["headers"]["subject"]) == ("alice@example.org", "by data")


async def test_a_recipient_between_chunks_is_refused(redis_url: str, redis: aioredis.Redis) -> None:
    """The message is on its way once its first chunk is: its recipients are set."""
    async with ingest(redis_url) as server:
        conn = await _transaction_open(server.port)
        body = message("chunked")
        assert (await _bdat(conn, body[:20]))[0] == 250
        late = await conn.cmd("RCPT TO:<late@example.com>")
        stored = await _bdat(conn, body[20:], last=True)
        await conn.close()
    assert (late[0], late[1].split()[0]) == (503, "5.5.1")
    assert stored[0] == 250
    [(_, msg)] = await entries(redis)
    assert msg["to"] == ["bob@example.com"]


async def test_data_after_bdat_is_refused_until_rset(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await _transaction_open(server.port)
        assert (await _bdat(conn, b"Subject: x\r\n"))[0] == 250
        code, text = await conn.cmd("DATA")
        assert (code, text.split()[0]) == (503, "5.5.1")
        assert (await conn.cmd("RSET"))[0] == 250
        assert (await conn.transaction(message()))[0] == 250
        await conn.close()


async def test_a_bdat_size_that_cannot_be_read_closes_the_session(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        for argument in ["", "ten", "-1", "10 FIRST", "1" * 19]:
            conn = await _transaction_open(server.port)
            code, text = await conn.cmd(f"BDAT {argument}".rstrip())
            assert (code, text.split()[0]) == (521, "5.5.4"), argument
            assert await conn.closed_by_server()
            await conn.close()


async def test_too_big_across_chunks_is_552_and_ends_the_transaction(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url, max_size=100_000) as server:
        conn = await _transaction_open(server.port)
        assert (await _bdat(conn, b"Subject: big\r\n\r\n" + b"x" * 60_000))[0] == 250
        code, text = await _bdat(conn, b"y" * 60_000)  # 120 016 octets in all
        assert (code, text.split()[0]) == (552, "5.3.4")
        # The client should stop; one that goes on is refused, its octets read and dropped.
        assert (await _bdat(conn, b"z" * 5000, last=True))[0] == 503
        assert (await conn.cmd("NOOP"))[0] == 250
        assert (await conn.transaction(message("small")))[0] == 250
        await conn.close()
        assert server.budget.used == 0
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["small"]


async def test_the_memory_budget_holds_across_chunks(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url, max_size=4 * MiB, memory_budget=4 * MiB) as server:
        holder = await _transaction_open(server.port)
        assert (await _bdat(holder, b"Subject: held\r\n\r\n" + b"h" * (3 * MiB)))[0] == 250
        await wait_until(lambda: server.budget.used >= 3 * MiB, "the held chunk", timeout=5)
        sender = await _transaction_open(server.port)
        assert (await _bdat(sender, b"Subject: s\r\n\r\n" + b"s" * (MiB // 2)))[0] == 250
        code, text = await _bdat(sender, b"s" * MiB)
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        assert (await _bdat(holder, b"", last=True))[0] == 250
        assert server.budget.used == 0
        await holder.close()
        await sender.close()
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["held"]


async def test_a_client_that_hangs_up_mid_chunk_leaves_nothing(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        conn = await _transaction_open(server.port)
        await conn.send(b"BDAT 5000 LAST\r\nSubject: cut\r\n\r\nonly part of it")
        await conn.close()
        await wait_until(lambda: server.budget.used == 0, "the share given back", timeout=5)
        again = await SMTPConn.open_session(server.port)  # the server serves on
        await again.close()
    assert await entries(redis) == []


@pytest.mark.parametrize(
    ("argument", "parsed"),
    [("10", (10, False)), ("0 LAST", (0, True)), ("7 last", (7, True)), (" 3  LAST ", (3, True))],
)
def test_parse_bdat(argument: str, parsed: tuple[int, bool]) -> None:
    command = parse_bdat(argument)
    assert command is not None
    assert (command.size, command.last) == parsed


async def test_a_bdat_refused_before_starttls_has_its_chunk_read(
    redis_url: str, tmp_path: Path
) -> None:
    """--require-tls: BDAT before STARTTLS gets 530 after its chunk was read (aiosmtpd's own
    530 came before any command ran, and the chunk's lines were taken for commands)."""
    cert, key = make_certificate(tmp_path)
    async with ingest(redis_url, tls_cert=str(cert), tls_key=str(key), require_tls=True) as server:
        conn = await SMTPConn.open_session(server.port)
        code, text = await _bdat(conn, b"NOOP\r\nHELP\r\n")
        assert (code, text.split()[0]) == (530, "5.7.0"), text
        # The next reply answers this RSET, not a NOOP or HELP from the chunk.
        code, text = await conn.cmd("RSET")
        assert (code, text) == (530, "5.7.0 Must issue a STARTTLS command first")
        assert await conn.cmd("NOOP") == (250, "2.0.0 OK")
        await conn.close()


async def test_any_bdat_line_up_to_the_line_limit_has_its_chunk_read(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """A BDAT line over 512 octets still reaches BDAT (which reads its chunk); before, it got
    500 and its chunk's RSET ran."""
    async with ingest(redis_url) as server:
        conn = await _transaction_open(server.port)
        chunk = b"RSET\r\nNOOP\r\n"
        await conn.send(b"BDAT %d" % len(chunk) + b" " * 600 + b"LAST\r\n" + chunk)
        code, _ = await conn.reply()
        await conn.close()
    assert code == 250
    [(_, msg)] = await entries(redis)
    assert msg["content"]["body"] == b"RSET\nNOOP\n"  # the chunk is content, not commands
