"""RFC 3461 on send: a message's ``dsn`` key becomes RET/ENVID on MAIL FROM and NOTIFY/ORCPT
on each RCPT TO for a relay that offers DSN; a relay that does not gets none of them, and the
``delivered`` event says ``dsn: not_offered``.  Real peers: Postfix's smtp-sink (which dumps
the parameters it got), and a private Postfix relaying into mailpool's own ingest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    REAL_RELAY,
    enqueue,
    events,
    make_config,
    run_until_settled,
    send_message,
)
from tests.harness import wait_until
from tests.ingest_util import entries, ingest
from tests.postfix_util import private_postfix
from tests.sinks import PostfixSink, RecordingSink
from workers.codec.build import build_message
from workers.codec.errors import SchemaError
from workers.codec.validate import validate_send

DSN = {
    "ret": "HDRS",
    "envid": "order 42+x=y",
    "recipients": {
        "ann@example.com": {"notify": ["SUCCESS", "FAILURE"], "orcpt": "rfc822;Ann+1@example.com"},
        "bob@example.com": {"notify": ["NEVER"]},
    },
}
RECIPIENTS = ["ann@example.com", "bob@example.com", "cid@example.com"]


def _args(dump: bytes, name: bytes) -> list[str]:
    return [line.split(b": ", 1)[1].decode() for line in dump.splitlines() if line.startswith(name)]


async def test_the_request_goes_to_a_relay_that_offers_dsn(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    relay = make_postfix_sink()
    await enqueue(redis, send_message(RECIPIENTS, dsn=DSN))
    await run_until_settled(redis, make_config(redis_url, relay.url))
    [dump] = relay.wait_for_dumps(1)
    assert _args(dump, b"X-Mail-Args") == ["<app@example.com> RET=HDRS ENVID=order+2042+2Bx+3Dy"]
    assert _args(dump, b"X-Rcpt-Args") == [
        "<ann@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Ann+2B1@example.com",
        "<bob@example.com> NOTIFY=NEVER",
        "<cid@example.com>",
    ]
    [event] = await events(redis)
    assert event["event"] == "delivered"
    assert "dsn" not in event


async def test_a_relay_without_dsn_gets_none_and_the_event_says_so(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    relay = make_postfix_sink("-N")  # smtp-sink: do not announce DSN
    await enqueue(redis, send_message(RECIPIENTS, dsn=DSN))
    await enqueue(redis, send_message(["dee@example.com"], subject="no request"))
    await run_until_settled(redis, make_config(redis_url, relay.url))
    dumps = relay.wait_for_dumps(2)
    assert sorted(arg for d in dumps for arg in _args(d, b"X-Mail-Args")) == [
        "<app@example.com>", "<app@example.com>"
    ]  # fmt: skip
    by_recipients = {tuple(e["recipients"]): e for e in await events(redis)}
    assert by_recipients[tuple(RECIPIENTS)]["dsn"] == "not_offered"
    assert "dsn" not in by_recipients[("dee@example.com",)]


async def test_an_aiosmtpd_relay_without_dsn_still_takes_the_message(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """aiosmtpd refuses parameters it does not know (555): none may reach it."""
    await enqueue(redis, send_message(RECIPIENTS, dsn=DSN))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [tuple(RECIPIENTS)]
    [event] = await events(redis)
    assert (event["event"], event["dsn"]) == ("delivered", "not_offered")


async def test_postfix_passes_the_request_on_to_the_next_hop(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """delivery -> a private Postfix -> mailpool ingest: the receive entry holds the same
    request the send message made."""
    async with ingest(redis_url) as server:
        with private_postfix(server.port) as postfix:
            await enqueue(redis, send_message(RECIPIENTS[:2], dsn=DSN))
            await run_until_settled(
                redis, make_config(redis_url, f"smtp://127.0.0.1:{postfix.port}", **REAL_RELAY)
            )
            await wait_until(lambda: _received(redis), "the message relayed by Postfix", timeout=20)
    [(_, received)] = await entries(redis)
    assert (received["dsn"]["ret"], received["dsn"]["envid"]) == ("HDRS", "order 42+x=y")
    # Postfix adds an ORCPT where the sender gave none (RFC 3461 section 4.2 allows it).
    assert received["dsn"]["recipients"] == {
        "ann@example.com": DSN["recipients"]["ann@example.com"],
        "bob@example.com": {"notify": ["NEVER"], "orcpt": "rfc822;bob@example.com"},
    }


async def _received(redis: aioredis.Redis) -> bool:
    return bool(await redis.exists("email.receive"))


def test_a_utf8_orcpt_is_sent_as_one_ascii_token() -> None:
    """RFC 6533's utf-8-addr-xtext: non-ASCII, "+", "=" and "\\" as \\x{HEX}."""
    message = send_message(
        ["ann@example.com"],
        dsn={"recipients": {"ann@example.com": {"orcpt": "utf-8;jö+x@bücher.de"}}},
    )
    built = build_message(message, default_id="1-0")
    assert built.dsn_rcpt == {"ann@example.com": ("ORCPT=utf-8;j\\x{F6}\\x{2B}x@b\\x{FC}cher.de",)}


@pytest.mark.parametrize(
    ("dsn", "path"),
    [
        ({"ret": "SOME"}, "dsn.ret"),
        ({"envid": ""}, "dsn.envid"),
        ({"envid": "tab\there"}, "dsn.envid"),
        ({"envid": "+" * 40}, "dsn.envid"),  # 120 octets as xtext
        ({"recipients": {"zed@example.com": {}}}, "dsn.recipients['zed@example.com']"),
        ({"recipients": {"ann@example.com": {"notify": ["NEVER", "DELAY"]}}}, "notify"),
        ({"recipients": {"ann@example.com": {"notify": "SUCCESS"}}}, "notify"),
        ({"recipients": {"ann@example.com": {"orcpt": "ann@example.com"}}}, "orcpt"),
        ({"recipients": {"ann@example.com": {"orcpt": "rfc822;a\r\nb"}}}, "orcpt"),
        ({"recipients": ["ann@example.com"]}, "dsn.recipients"),
        ({"recipients": {"ann@example.com": {"orcpt": "rfc822;bücher@x"}}}, "orcpt"),
        ({"recipients": {"ann@example.com": {"orcpt": "utf-8;a b@x NOTIFY=NEVER"}}}, "orcpt"),
        ({"recipients": {"ann@example.com": {"orcpt": "utf-8;a\tb@x"}}}, "orcpt"),
        ("HDRS", "dsn"),
    ],
)
def test_a_bad_dsn_key_is_a_schema_error(dsn: Any, path: str) -> None:
    with pytest.raises(SchemaError) as caught:
        validate_send(send_message(["ann@example.com"], dsn=dsn))
    assert path in caught.value.path


async def test_a_bad_dsn_key_is_dead_lettered_as_invalid(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await enqueue(redis, send_message(["ann@example.com"], dsn={"ret": "ALL"}))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert sink.received == []
    [event] = await events(redis)
    assert event["event"] == "failed"
    [dead] = [e async for e in _dead(redis)]
    assert dead["reason"] == "invalid"
    assert "dsn.ret" in dead["error"]


async def _dead(redis: aioredis.Redis) -> Any:
    for _, fields in await redis.xrange("email.send.dead"):
        yield {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
