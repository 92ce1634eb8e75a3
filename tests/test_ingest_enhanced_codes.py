"""RFC 2034: ingest advertises ENHANCEDSTATUSCODES, and then every reply but the greeting and
the answers to HELO/EHLO carries an enhanced status code, aiosmtpd's own replies included."""

from __future__ import annotations

import re

import pytest

from tests.ingest_util import SMTPConn, ingest, message
from workers.ingest.replies import with_enhanced_code

ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}( |$)")

# Commands whose replies come from aiosmtpd itself (none of ours), each refused or answered
# in its own way, in one session that stays usable.
COMMANDS = [
    "MAIL FROM:<a@example.org>",  # before EHLO: 503
    "NOOP",
    "RSET",
    "VRFY bob",
    "HELP",
    "EXPN list",
    "BOGUS",
    "",  # an empty line: 500
    "EHLO client.test",  # not checked (RFC 2034 section 3)
    "MAIL FROM:<a@example.org> FOO=BAR",  # 555
    "MAIL FROM:<a@example.org> BODY=9BIT",  # 501
    "MAIL FROM:<a@example.org> SMTPUTF8=x",  # 501
    "MAIL FROM:<a@example.org> SIZE=abc",  # 501
    "RCPT TO:<b@example.com>",  # no MAIL yet: 503
    "DATA",  # 503
    "MAIL FROM:<a@example.org>",
    "MAIL FROM:<a@example.org>",  # nested: 503
    "RCPT TO:<b@example.com> FOO=BAR",  # 555
    "RCPT TO:",  # 501
    "RCPT TO:<b@example.com>",
    "DATA x",  # 501
    "RSET",
    "QUIT",
]


async def test_every_reply_of_a_session_has_an_enhanced_code(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        seen = []
        for command in COMMANDS:
            code, text = await conn.cmd(command)
            seen.append(code)
            if command.startswith("EHLO"):
                assert "ENHANCEDSTATUSCODES" in text.splitlines()
                continue
            for line in text.splitlines():
                assert ENHANCED.match(line), f"{command!r} -> {code} {line!r}"
        await conn.close()
    # The session went through the refusals it was meant to (so the codes above were seen).
    assert seen == [503, 250, 250, 252, 250, 502, 500, 500, 250, 555, 501, 501, 501, 503, 503,
                    250, 503, 555, 501, 250, 501, 250, 221]  # fmt: skip


async def test_a_whole_transaction_is_coded(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        replies = [await conn.cmd("MAIL FROM:<a@example.org>"), await conn.cmd("RCPT TO:<b@x.com>")]
        await conn.send(b"DATA\r\n")
        assert (await conn.reply())[0] == 354  # a 3xx reply has none (RFC 2034)
        await conn.send(message() + b".\r\n")
        replies.append(await conn.reply())
        await conn.close()
    assert [text.split()[0] for _, text in replies] == ["2.1.0", "2.1.5", "2.0.0"]


@pytest.mark.parametrize(
    ("reply", "coded"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("503 Error: nested MAIL command", "503 5.5.1 Error: nested MAIL command"),
        ("555 MAIL parameters not recognized", "555 5.5.4 MAIL parameters not recognized"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("250-first", "250-2.0.0 first"),
        ("421", "421 4.3.0"),
        ("599 odd", "599 5.0.0 odd"),
        ("250 2.1.0 OK", "250 2.1.0 OK"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
    ],
)
def test_with_enhanced_code(reply: str, coded: str) -> None:
    assert with_enhanced_code(reply) == coded
