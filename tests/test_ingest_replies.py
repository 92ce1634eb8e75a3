"""Every SMTP reply of ``mailpool ingest`` on a real session against a real redis-server:
EHLO extensions, 250 with the entry id (and the entry it names), 550, 452, 552, 553, 500, 521."""

from __future__ import annotations

import asyncio
import re

import redis.asyncio as aioredis

from tests.ingest_util import HOSTNAME, SMTPConn, entries, ingest, message, send_one


async def test_ehlo_advertises_the_extensions(redis_url: str) -> None:
    async with ingest(redis_url, max_size=123456) as server:
        conn = await SMTPConn.open(server.port)
        extensions = await conn.ehlo()
        await conn.close()
    assert "PIPELINING" in extensions
    assert "SIZE 123456" in extensions
    assert "8BITMIME" in extensions
    assert "SMTPUTF8" in extensions
    # No certificate, no STARTTLS; no credentials, no AUTH.
    assert not any(e.startswith(("STARTTLS", "AUTH")) for e in extensions)


async def test_250_names_the_stream_entry_holding_the_message(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        code, text = await send_one(
            server.port, message("Grüße", "body text"), to=["bob@example.com"]
        )
    assert code == 250
    match = re.fullmatch(r"2\.0\.0 OK queued as (\d+-\d+)", text)
    assert match, text
    [(entry_id, msg)] = await entries(redis)
    assert entry_id == match.group(1)
    assert msg["from"] == "alice@example.org"
    assert msg["to"] == ["bob@example.com"]
    assert msg["headers"]["subject"] == "Grüße"
    assert msg["content"]["body"].rstrip(b"\n") == b"body text"
    # Our Received field comes first, names the peer, us, the protocol, the id and the recipient.
    received = msg["header_list"][0]
    assert received[0] == "Received"
    assert received[1].startswith("from client.test ([127.0.0.1])")
    assert f"by {HOSTNAME} with ESMTP id {msg['id']}" in received[1]
    assert "for <bob@example.com>;" in received[1]


async def test_null_sender_and_pipelined_transaction(redis_url: str, redis: aioredis.Redis) -> None:
    """RFC 2920: a client may send MAIL, RCPT, DATA in one write; replies come in order."""
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        await conn.send(
            b"MAIL FROM:<>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        )
        replies = [await conn.reply() for _ in range(4)]
        assert [code for code, _ in replies] == [250, 250, 250, 354]
        await conn.send(message() + b".\r\nQUIT\r\n")
        code, _ = await conn.reply()
        assert code == 250
        assert (await conn.reply())[0] == 221
        await conn.close()
    [(_, msg)] = await entries(redis)
    assert msg["from"] is None
    assert msg["to"] == ["a@example.com", "b@example.com"]
    assert "for <" not in msg["header_list"][0][1]  # several recipients: not named


async def test_550_outside_the_accepted_domains(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url, accept_domain=["Example.COM."]) as server:
        conn = await SMTPConn.open_session(server.port)
        assert (await conn.cmd("MAIL FROM:<x@elsewhere.net>"))[0] == 250
        code, text = await conn.cmd("RCPT TO:<bob@elsewhere.net>")
        assert (code, text.split()[0]) == (550, "5.7.1")
        assert (await conn.cmd("RCPT TO:<bob@EXAMPLE.com>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<postmaster>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<joe@sub.example.com>"))[0] == 550
        await conn.close()


async def test_452_beyond_the_recipient_limit(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url, max_recipients=100) as server:
        conn = await SMTPConn.open_session(server.port)
        await conn.cmd("MAIL FROM:<a@example.org>")
        await conn.send(b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(102)))
        codes = [(await conn.reply())[0] for _ in range(102)]
        assert codes == [250] * 100 + [452, 452]
        assert (await conn.cmd("DATA"))[0] == 354
        await conn.send(message() + b".\r\n")
        assert (await conn.reply())[0] == 250
        await conn.close()
    [(_, msg)] = await entries(redis)
    assert len(msg["to"]) == 100


async def test_552_over_the_size_limit(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url, max_size=2000) as server:
        conn = await SMTPConn.open_session(server.port)
        code, text = await conn.cmd("MAIL FROM:<a@example.org> SIZE=2001")
        assert (code, text.split()[0]) == (552, "5.3.4")
        code, text = await conn.transaction(message(body=("y" * 70 + "\r\n") * 40))
        assert (code, text.split()[0]) == (552, "5.3.4"), text
        # The session goes on and a message within the limit is taken.
        code, _ = await conn.transaction(message(body="small"))
        assert code == 250
        await conn.close()
    assert len(await entries(redis)) == 1


async def test_500_for_lines_and_commands_over_the_rfc_limits(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        # RFC 5321 4.5.3.1.4: a command line is at most 512 octets.
        code, text = await conn.cmd("NOOP " + "x" * 600)
        assert (code, text.split()[0]) == (500, "5.5.2")
        # 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
        code, text = await conn.transaction(message(body="z" * 1200))
        assert (code, text.split()[0]) == (500, "5.5.2"), text
        code, _ = await conn.transaction(message(body="z" * 990))
        assert code == 250
        await conn.close()
    assert len(await entries(redis)) == 1


async def test_reply_text_never_echoes_control_or_8bit_octets(redis_url: str) -> None:
    """RFC 5321 section 4.2: reply text is printable ASCII.  aiosmtpd's 500 names the
    unknown command as sent: a NUL or a bare CR went back to the client in the reply."""
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        await conn.send(b"FO\x00O\rBAR x\r\n")
        line = await asyncio.wait_for(conn.reader.readline(), 5)
        assert line == b'500 5.5.2 Error: command "FO?O?BAR" not recognized\r\n'
        await conn.close()


async def test_the_mail_line_limit_is_the_sessions_own(redis_url: str) -> None:
    """After EHLO a MAIL line may be 512 + 26 (SIZE=) + 10 (SMTPUTF8) + 120 (RET=, ENVID=) =
    668 octets, whatever other sessions connect or say EHLO meanwhile."""

    def mail_line(octets: int) -> str:
        return "MAIL FROM:<" + "x" * (octets - 24) + "@example.org>"

    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        others = [await SMTPConn.open(server.port)]  # a new session, no EHLO yet
        assert (await conn.cmd(mail_line(668)))[0] == 250
        assert (await conn.cmd("RSET"))[0] == 250
        others += [await SMTPConn.open_session(server.port) for _ in range(3)]
        code, text = await conn.cmd(mail_line(669))
        assert (code, text.split()[0]) == (500, "5.5.2"), text
        for each in [conn, *others]:
            await each.close()


async def test_smtputf8_addresses_and_invalid_utf8(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        assert (await conn.cmd("MAIL FROM:<jürgen@exämple.org> SMTPUTF8"))[0] == 250
        assert (await conn.cmd("RCPT TO:<\xff\xfe@example.com>".encode("latin-1")))[0] == 553
        # Control characters in a quoted local part would reach our Received field.
        for control in (b"\r", b"\x00", b"\x1b"):
            code, text = await conn.cmd(b'RCPT TO:<"a' + control + b'b"@example.com>')
            assert (code, "not allowed" in text) == (553, True), (control, text)
        assert (await conn.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        await conn.send(message() + b".\r\n")
        assert (await conn.reply())[0] == 250
        await conn.close()
    [(_, msg)] = await entries(redis)
    assert msg["from"] == "jürgen@exämple.org"
    assert msg["to"] == ["δοκιμή@παράδειγμα.δοκιμή"]
    assert " with UTF8SMTP id " in msg["header_list"][0][1]


async def test_http_request_refused_at_once(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        await conn.send(b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n")
        code, text = await conn.reply()
        assert (code, text.split()[0]) == (521, "5.7.0")
        assert await conn.closed_by_server()
        conn = await SMTPConn.open(server.port)
        await conn.send(b"POST /form HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        assert (await conn.reply())[0] == 521
        assert await conn.closed_by_server()


async def test_mail_before_helo_and_rcpt_before_mail(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        assert (await conn.cmd("MAIL FROM:<a@example.org>"))[0] == 503
        await conn.ehlo()
        assert (await conn.cmd("RCPT TO:<a@example.org>"))[0] == 503
        assert (await conn.cmd("DATA"))[0] == 503
        code, text = await conn.cmd("HELP")
        assert code == 250 and "DATA" in text and "GET" not in text
        # Only what this listener offers: no AUTH without credentials, no STARTTLS without
        # a certificate (aiosmtpd 1.4.6 listed AUTH either way).
        assert "AUTH" not in text.split() and "STARTTLS" not in text.split(), text
        assert (await conn.cmd("QUIT"))[0] == 221


HOSTILE = [
    b"Subject: caf\xe9 in latin-1\r\nFrom: \xff\xfe@x\r\n\r\nbody \xe9\r\n",
    b"Subject: =?utf-8?b?!!!?= =?x-unknown?q?a?=\r\n\r\nbad words\r\n",
    b"Subject: nul\x00byte\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n",
    b"no header block at all, just text\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 60,
    b"\xc3\x28\xa0\xa1 raw invalid utf-8 \xf0\x28\x8c\x28\r\n",
]  # fmt: skip


async def test_hostile_bytes_are_stored_never_refused(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """Bad input from the internet is kept (best effort + defects + raw), never a 4xx loop."""
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        for data in HOSTILE:
            code, text = await conn.transaction(data)
            assert code == 250, (data, text)
        await conn.close()
    stored = await entries(redis)
    assert len(stored) == len(HOSTILE)
    with_defects = [msg for _, msg in stored if msg.get("defects")]
    assert with_defects
    assert all("raw" in msg for msg in with_defects)  # --keep-raw defects (the default)
