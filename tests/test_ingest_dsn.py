"""RFC 3461 on ingest: DSN advertised; RET, ENVID, NOTIFY and ORCPT accepted, checked and
stored decoded in the entry's ``dsn`` key; a malformed one is refused with 501 5.5.4 and the
session goes on.  A real Postfix relaying to ingest passes its sender's request on (and so
no longer answers "relayed" on our behalf)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tests.harness import wait_until
from tests.ingest_util import SMTPConn, entries, ingest, message
from tests.postfix_util import private_postfix
from workers.codec.dsn import xtext_decode, xtext_encode


async def _transaction(conn: SMTPConn, mail: str, *rcpts: str) -> list[tuple[int, str]]:
    replies = [await conn.cmd(mail)]
    replies += [await conn.cmd(rcpt) for rcpt in rcpts]
    await conn.send(b"DATA\r\n")
    assert (await conn.reply())[0] == 354
    await conn.send(message() + b".\r\n")
    replies.append(await conn.reply())
    return replies


async def test_dsn_parameters_are_stored_decoded(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        assert "DSN" in await conn.ehlo()
        replies = await _transaction(
            conn,
            "MAIL FROM:<alice@example.org> RET=hdrs ENVID=QQ+2B314159+3DpI SIZE=100",
            "RCPT TO:<bob@example.com> NOTIFY=success,Failure ORCPT=rfc822;Bob+2Bx@Example.com",
            "RCPT TO:<carol@example.com>",
            "RCPT TO:<dave@example.com> notify=never",
        )
        await conn.close()
    assert [code for code, _ in replies] == [250, 250, 250, 250, 250]
    [(_, msg)] = await entries(redis)
    assert msg["to"] == ["bob@example.com", "carol@example.com", "dave@example.com"]
    assert msg["dsn"] == {
        "ret": "HDRS",
        "envid": "QQ+314159=pI",  # xtext decoded, case kept
        "recipients": {
            "bob@example.com": {
                "notify": ["SUCCESS", "FAILURE"],
                "orcpt": "rfc822;Bob+x@Example.com",
            },
            "dave@example.com": {"notify": ["NEVER"]},
        },
    }


async def test_no_dsn_key_without_parameters(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        await _transaction(conn, "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>")
        await conn.close()
    [(_, msg)] = await entries(redis)
    assert "dsn" not in msg


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<a@example.org> RET=BODY",
        "MAIL FROM:<a@example.org> RET=FULL RET=HDRS",
        "MAIL FROM:<a@example.org> ENVID=a+zz",  # not xtext
        "MAIL FROM:<a@example.org> ENVID=a+0A",  # a control character once decoded
        "MAIL FROM:<a@example.org> ENVID=" + "x" * 101,
        "MAIL FROM:<a@example.org> ENVID=",
    ],
)
async def test_a_bad_mail_parameter_gets_501_and_the_session_goes_on(
    redis_url: str, redis: aioredis.Redis, command: str
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        code, text = await conn.cmd(command)
        assert (code, text.split()[0]) == (501, "5.5.4"), text
        replies = await _transaction(conn, "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>")
        await conn.close()
    assert [c for c, _ in replies] == [250, 250, 250]
    [(_, msg)] = await entries(redis)
    assert "dsn" not in msg


@pytest.mark.parametrize(
    "parameters",
    [
        "NOTIFY=NEVER,SUCCESS",
        "NOTIFY=SOMETIMES",
        "NOTIFY=SUCCESS,SUCCESS",
        "NOTIFY=",
        "NOTIFY=DELAY NOTIFY=FAILURE",
        "ORCPT=bob@example.com",  # no addr-type
        "ORCPT=rfc822;",
        "ORCPT=rfc822;bob+4@example.com",  # not xtext
        "ORCPT=rfc822;a+0D+0Ab+00@x",  # controls once decoded
        "ORCPT=rfc822;b+C3+BCcher@x",  # xtext stands for ASCII only
        "ORCPT=utf-8;bob\\x{20}smith@x",  # a space once decoded
        "ORCPT=utf-8;bob\\x{D800}@x",  # no code point
    ],
)
async def test_a_bad_rcpt_parameter_gets_501_and_the_recipient_is_not_taken(
    redis_url: str, redis: aioredis.Redis, parameters: str
) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        assert (await conn.cmd("MAIL FROM:<a@example.org>"))[0] == 250
        code, text = await conn.cmd(f"RCPT TO:<x@example.com> {parameters}")
        assert (code, text.split()[0]) == (501, "5.5.4"), text
        replies = await _transaction(conn, "RSET", "MAIL FROM:<a@example.org>", "RCPT TO:<b@x.com>")
        await conn.close()
    assert [c for c, _ in replies] == [250, 250, 250, 250]
    [(_, msg)] = await entries(redis)
    assert msg["to"] == ["b@x.com"]


async def test_parameters_of_a_refused_command_are_not_kept(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """A nested MAIL's RET does not replace the first one's; a refused RCPT's NOTIFY is not
    stored; a recipient named twice keeps its first parameters; unknown ones still get 555."""
    async with ingest(redis_url, accept_domain=["example.com"]) as server:
        conn = await SMTPConn.open_session(server.port)
        replies = await _transaction(
            conn,
            "MAIL FROM:<a@example.org> RET=FULL",
            "MAIL FROM:<a@example.org> RET=HDRS",  # nested: 503
            "RCPT TO:<x@elsewhere.net> NOTIFY=SUCCESS",  # domain refused: 550
            "RCPT TO:<b@example.com> NOTIFY=DELAY",
            "RCPT TO:<b@example.com> NOTIFY=NEVER",
            "RCPT TO:<c@example.com> NOTIFY=DELAY XYZ=1",  # 555
        )
        await conn.close()
    assert [c for c, _ in replies] == [250, 503, 550, 250, 250, 555, 250]
    [(_, msg)] = await entries(redis)
    assert msg["dsn"] == {"ret": "FULL", "recipients": {"b@example.com": {"notify": ["DELAY"]}}}


async def test_a_recipient_named_first_without_parameters_keeps_none(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """Its first naming asked for the default (failure reports): a later NOTIFY=NEVER
    naming the same recipient does not take them away."""
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        replies = await _transaction(
            conn,
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.com>",
            "RCPT TO:<b@example.com> NOTIFY=NEVER",
            "RCPT TO:<c@example.com> NOTIFY=DELAY",
        )
        await conn.close()
    assert [c for c, _ in replies] == [250, 250, 250, 250, 250]
    [(_, msg)] = await entries(redis)
    assert msg["dsn"] == {"recipients": {"c@example.com": {"notify": ["DELAY"]}}}


async def test_a_helo_session_takes_no_dsn_parameters(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open(server.port)
        assert (await conn.cmd("HELO client.test"))[0] == 250
        code, _ = await conn.cmd("MAIL FROM:<a@example.org> RET=HDRS")
        await conn.close()
    assert code == 501


async def test_long_dsn_parameters_fit_the_command_line(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """RFC 3461 lets NOTIFY and ORCPT add ~540 octets to RCPT, RET and ENVID ~120 to MAIL:
    such lines are taken, not refused as over 512 octets (a permanent 500 would bounce)."""
    local = "x" * 64
    rcpt = f"{local}@{'d' * 60}.example.com"
    envid = "e" * 100
    async with ingest(redis_url) as server:
        conn = await SMTPConn.open_session(server.port)
        replies = await _transaction(
            conn,
            f"MAIL FROM:<{'s' * 64}@{'d' * 180}.org> SIZE=1000 RET=HDRS ENVID={envid}",
            f"RCPT TO:<{rcpt}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{rcpt}" + "+2B" * 100,
            "RCPT TO:<u@example.com> ORCPT=utf-8;b\\x{FC}cher@example.com",
        )
        await conn.close()
    assert [c for c, _ in replies] == [250, 250, 250, 250], replies
    [(_, msg)] = await entries(redis)
    assert msg["dsn"]["envid"] == envid
    assert msg["dsn"]["recipients"][rcpt]["orcpt"] == f"rfc822;{rcpt}" + "+" * 100
    assert msg["dsn"]["recipients"]["u@example.com"]["orcpt"] == "utf-8;bücher@example.com"


def test_xtext_round_trip() -> None:
    for text in ["plain", "a+b=c", "sp ace", "+++", "QQ314159"]:
        assert xtext_decode(xtext_encode(text)) == text
    for not_ascii_text in ["a+09b", "a+7F", "b+C3+BC"]:  # xtext carries printable ASCII only
        with pytest.raises(ValueError):
            xtext_decode(not_ascii_text)
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    with pytest.raises(ValueError):
        xtext_decode("a+2b")  # hex digits are upper case (RFC 3461 section 4)


async def test_postfix_relays_its_senders_dsn_request_to_ingest(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """A private Postfix whose next hop is ingest: the DSN request reaches the entry, and
    Postfix sends no "relayed" notice of its own (it would when the next hop had no DSN)."""
    async with ingest(redis_url) as server:
        with private_postfix(server.port) as postfix:
            conn = await SMTPConn.open_session(postfix.port)
            replies = await _transaction(
                conn,
                "MAIL FROM:<alice@example.org> RET=HDRS ENVID=batch+2B7",
                "RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com",
            )
            await conn.close()
            assert [c for c, _ in replies] == [250, 250, 250], replies
            await wait_until(lambda: _count(redis), "the relayed message", timeout=20)
            log = await asyncio.to_thread(postfix.wait_for_log, "status=sent")
            await asyncio.sleep(2)  # time for a notice Postfix would send
    assert "status=sent" in log, log
    [(_, msg)] = await entries(redis)
    assert msg["from"] == "alice@example.org"
    assert msg["dsn"] == {
        "ret": "HDRS",
        "envid": "batch+7",
        "recipients": {
            "bob@example.com": {"notify": ["SUCCESS", "FAILURE"], "orcpt": "rfc822;bob@example.com"}
        },
    }


async def _count(redis: aioredis.Redis) -> bool:
    return bool(await redis.xlen("email.receive"))
