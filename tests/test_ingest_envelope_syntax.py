"""What ingest refuses in MAIL FROM and RCPT TO beyond aiosmtpd's own checks, and the one
parameter it takes that aiosmtpd does not know:

* a path opened with ``<`` and never closed: 501 (RFC 5321 section 4.1.2), not the rest of
  the line, parameters and all, taken as a quoted local part;
* the null path ``<>`` as a recipient: 501 5.1.3 (it names a sender only);
* a non-ASCII address in a transaction that did not declare SMTPUTF8: 553 5.6.7
  (RFC 6531 section 3.4);
* RFC 4954's ``AUTH=`` MAIL parameter where AUTH is offered: taken (checked, then dropped),
  not refused with 555, which bounced the mail of clients such as Exim's
  ``authenticated_sender``.

Each refusal leaves the session usable: the next transaction is stored as sent."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.ingest_util import SMTPConn, client_tls, entries, ingest, message


async def _then_a_good_transaction(conn: SMTPConn, redis: aioredis.Redis) -> dict[str, object]:
    assert (await conn.cmd("RSET"))[0] == 250
    assert (await conn.transaction(message("good")))[0] == 250
    await conn.close()
    [(_, msg)] = await entries(redis)
    return msg


async def _codes(conn: SMTPConn, *commands: str) -> list[int]:
    """The reply codes to ``commands`` (the last one DATA) and to a message after them."""
    codes = [(await conn.cmd(command))[0] for command in commands]
    await conn.send(message() + b".\r\n")
    return [*codes, (await conn.reply())[0]]


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        ("MAIL FROM:<alice@example.org", "501 5.1.7"),
        ("MAIL FROM:<alice@example.org RET=HDRS", "501 5.1.7"),
        ('MAIL FROM:<"quoted > here"@example.org', "501 5.1.7"),
        ("RCPT TO:<bob@example.com", "501 5.1.3"),
        ("RCPT TO:<bad NOTIFY=DELAY", "501 5.1.3"),
        ("RCPT TO:<>", "501 5.1.3"),
        ("RCPT TO:<> NOTIFY=NEVER", "501 5.1.3"),
    ],
)
async def test_an_unclosed_path_or_a_null_recipient_is_refused(
    redis_url: str, redis: aioredis.Redis, command: str, refusal: str
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        if command.startswith("RCPT"):
            assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        code, text = await conn.cmd(command)
        assert f"{code} {text.split()[0]}" == refusal, text
        msg = await _then_a_good_transaction(conn, redis)
    assert (msg["from"], msg["to"]) == ("alice@example.org", ["bob@example.com"])


async def test_a_helo_session_refuses_an_unclosed_path_too(
    redis_url: str, redis: aioredis.Redis
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        assert (await conn.cmd("HELO client.test"))[0] == 250
        assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
        code, text = await conn.cmd("RCPT TO:<bob@example.com")
        await conn.close()
    assert (code, text.split()[0]) == (501, "5.1.3")
    assert await entries(redis) == []


@pytest.mark.parametrize(
    "commands",
    [
        ["MAIL FROM:<jürgen@example.org>"],
        ["MAIL FROM:<alice@example.org>", "RCPT TO:<jürgen@exämple.com>"],
    ],
)
async def test_a_unicode_address_needs_smtputf8(
    redis_url: str, redis: aioredis.Redis, commands: list[str]
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        replies = [await conn.cmd(command) for command in commands]
        assert (replies[-1][0], replies[-1][1].split()[0]) == (553, "5.6.7"), replies
        msg = await _then_a_good_transaction(conn, redis)
    assert msg["to"] == ["bob@example.com"]


@pytest.mark.parametrize(
    ("mail", "rcpt", "sender", "recipient"),
    [
        ("MAIL FROM:<>", 'RCPT TO:<"odd > local"@example.com>', None, '"odd > local"@example.com'),
        (
            "MAIL FROM:<jürgen@example.org> SMTPUTF8", "RCPT TO:<zoë@exämple.com>",
            "jürgen@example.org", "zoë@exämple.com",
        ),
    ],
)  # fmt: skip
async def test_the_null_sender_a_quoted_path_and_declared_unicode_are_taken(
    redis_url: str, redis: aioredis.Redis, mail: str, rcpt: str, sender: str | None, recipient: str
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        codes = await _codes(conn, mail, f"{rcpt} NOTIFY=NEVER", "DATA")
        await conn.close()
    assert codes == [250, 250, 354, 250]
    [(_, msg)] = await entries(redis)
    assert (msg["from"], msg["to"]) == (sender, [recipient])
    assert msg["dsn"]["recipients"] == {recipient: {"notify": ["NEVER"]}}


@pytest.mark.parametrize(
    ("parameter", "code"),
    [
        ("AUTH=<>", 250),
        ("AUTH=carol+2Bfilter@example.org", 250),
        ("auth=carol@example.org SIZE=100", 250),
        ("AUTH=", 501),
        ("AUTH=carol+2@example.org", 501),  # not xtext
        ("AUTH=<> AUTH=<>", 501),
        ("AUTH=" + "x" * 501, 501),
    ],
)
async def test_the_auth_parameter_is_taken_where_auth_is_offered(
    redis_url: str,
    redis: aioredis.Redis,
    certificate: tuple[Path, Path],
    parameter: str,
    code: int,
) -> None:
    cert, key = certificate
    async with ingest(
        redis_url, tls_cert=str(cert), tls_key=str(key), auth_users="carol:s3cret"
    ) as server:
        conn = await SMTPConn.open_session(server.port)
        await conn.starttls(client_tls(cert))
        await conn.ehlo()
        assert (await conn.cmd("AUTH PLAIN AGNhcm9sAHMzY3JldA=="))[0] == 235
        reply = await conn.cmd(f"MAIL FROM:<alice@example.org> {parameter}")
        assert reply[0] == code, reply
        if code == 250:
            assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            assert (await conn.cmd("DATA"))[0] == 354
            await conn.send(message("submitted") + b".\r\n")
            assert (await conn.reply())[0] == 250
            await conn.close()
            [(_, msg)] = await entries(redis)
            assert msg["from"] == "alice@example.org"
        else:
            assert reply[1].split()[0] == "5.5.4", reply
            msg = await _then_a_good_transaction(conn, redis)
            assert msg["to"] == ["bob@example.com"]


async def test_the_auth_parameter_is_unknown_where_auth_is_not_offered(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        code, text = await conn.cmd("MAIL FROM:<alice@example.org> AUTH=<>")
        await conn.close()
    assert (code, text.split()[0]) == (555, "5.5.4")
