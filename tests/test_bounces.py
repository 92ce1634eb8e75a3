"""Bounce reports on receive (RFC 3464): ingest stores a ``delivery_report`` key; housekeeping
turns a report on one of our sends into a ``bounced`` event and, for an address that does
not exist, a suppression.  Real bounces come from a private Postfix relaying to a sink that
refuses the recipient; other fixtures are CPython's email test messages."""

from __future__ import annotations

import asyncio
import json
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
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
from tests.ingest_util import entries, ingest, message
from tests.postfix_util import private_postfix
from tests.sinks import PostfixSink
from workers import housekeeping
from workers.codec import report as report_module
from workers.codec.build import build_message, sent_message_id
from workers.codec.parse import parse_message
from workers.housekeeping import HousekeepConfig
from workers.streams import layout
from workers.streams.bounces import BounceReader
from workers.streams.layout import StreamKeys

CPYTHON_EMAIL = Path(sysconfig.get_path("stdlib")) / "test" / "test_email" / "data"


def _parsed(name: str) -> dict[str, object]:
    raw = (CPYTHON_EMAIL / name).read_bytes()
    return dict(parse_message(raw, mail_from=None, rcpt_tos=["postmaster@example.com"]))


def test_a_report_of_other_mail_libraries_is_read() -> None:
    report = _parsed("msg_16.txt")["delivery_report"]
    assert report == {
        "reporting_mta": "dns; cougar.noc.ucla.edu",
        "original_envelope_id": "0GK500B4HD0888@cougar.noc.ucla.edu",
        "message_id": "<002001c144a6$8752e060$56104586@oxy.edu>",
        "recipients": [{
            "final_recipient": "rfc822;jangel1@cougar.noc.ucla.edu",
            "original_recipient": "rfc822;jangel1@cougar.noc.ucla.edu",
            "address": "jangel1@cougar.noc.ucla.edu",
            "original_address": "jangel1@cougar.noc.ucla.edu",
            "action": "failed",
            "status": "5.0.0 (recipient reached disk quota)",
        }],
    }  # fmt: skip
    several = _parsed("msg_43.txt")["delivery_report"]
    assert isinstance(several, dict)
    assert [r["status"] for r in several["recipients"]] == ["5.7.1"] * len(several["recipients"])
    assert len(several["recipients"]) > 1


def test_no_report_key_without_a_delivery_status_part() -> None:
    assert "delivery_report" not in _parsed("msg_05.txt")  # multipart/report, no status part
    assert "delivery_report" not in _parsed("msg_25.txt")  # no boundary: unreadable
    plain = parse_message(message(), mail_from="a@example.org", rcpt_tos=["b@example.com"])
    assert "delivery_report" not in plain


@pytest.mark.parametrize(
    ("given", "found"),
    [
        ("order-7", "order-7"),
        ("1712345678901-0", "1712345678901-0"),
        ("a.b.c", "a.b.c"),
        ("x" * 65, None),
        ("has space", None),
    ],
)
def test_the_message_id_names_the_send(given: str, found: str | None) -> None:
    built = build_message(send_message(["bob@example.com"], message_id=given), default_id="1-0")
    named = sent_message_id(built.message_id)
    if found is None:
        assert named != given
    else:
        assert named == found


def test_a_foreign_message_id_names_no_send() -> None:
    for field in ["<CAF=abc@mail.gmail.com>", "<x.123@y>", "", "<order-7.0123456789ab@>"]:
        assert sent_message_id(field) is None


async def test_a_postfix_bounce_becomes_a_bounced_event_and_a_suppression(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    """delivery -> a private Postfix (250) -> a sink that says 550 5.1.1 -> Postfix's bounce
    -> mailpool ingest -> housekeeping's bounce reader."""
    sink = make_postfix_sink("-f", "RCPT", "-B", "550 5.1.1 <bob@bad.example>: no such user")
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    assert await reader.read_once(0) == 0  # the group starts at the stream's end
    async with ingest(redis_url) as server:
        transport = f"inline:{{ bad.example=smtp:[127.0.0.1]:{sink.port} }}"
        with private_postfix(server.port, transport_maps=transport) as postfix:
            await enqueue(redis, send_message(["bob@bad.example"], message_id="order-7"))
            relay = f"smtp://127.0.0.1:{postfix.port}"
            await run_until_settled(redis, make_config(redis_url, relay, **REAL_RELAY))
            await wait_until(lambda: _received(redis), "Postfix's bounce", timeout=30)
            log = postfix.log
    [(report_id, bounce)] = await entries(redis)
    assert bounce["from"] is None  # a bounce has the null sender
    report = bounce["delivery_report"]
    assert report["recipients"][0]["action"] == "failed"
    assert report["recipients"][0]["status"] == "5.1.1", log
    assert await reader.read_once(0) == 1
    kinds = [(e["event"], e["id"], e["recipients"]) for e in await events(redis)]
    assert kinds == [
        ("delivered", "order-7", ["bob@bad.example"]),  # Postfix took it
        ("bounced", "order-7", ["bob@bad.example"]),  # and then it bounced
    ]
    bounced = (await events(redis))[1]
    assert (bounced["status"], bounced["smtp_code"], bounced["report_id"]) == (
        "5.1.1",
        "550",
        report_id,
    )
    assert "no such user" in bounced["smtp_text"]
    why = json.loads(await redis.hget("mailpool:suppressed:why", "bob@bad.example"))
    assert why["reason"] == "bounced"
    assert await reader.read_once(0) == 0  # read once


async def test_a_report_on_a_recipient_we_never_reached_records_nothing(
    redis: aioredis.Redis,
) -> None:
    """A forged or foreign report that copies one of our Message-IDs names a send, but not a
    recipient a relay accepted from us: no event, no suppression."""
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    await redis.hset("mailpool:sent:order-9", "ann@example.com", "1")
    raw = _report(message_id="<order-9.0123456789ab@mailpool.test>", rcpt="mallory@example.com")
    parsed = parse_message(raw, mail_from=None, rcpt_tos=["app@example.com"])
    await redis.xadd("email.receive", {"data": msgpack.packb(parsed, use_bin_type=True)})
    assert await reader.read_once(0) == 0
    assert await redis.exists("email.send.events", "mailpool:suppressed") == 0


def _report(*, message_id: str, rcpt: str) -> bytes:
    return (
        "From: MAILER-DAEMON@example.net\r\nTo: app@example.com\r\nSubject: failure\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {message_id}\r\nSubject: hello\r\n\r\n"
        "--b--\r\n"
    ).encode()


async def _received(redis: aioredis.Redis) -> bool:
    return bool(await redis.xlen("email.receive"))  # the reader's group made the stream


async def _store_report(redis: aioredis.Redis, raw: bytes, *, stream: str = "email.receive",
                        sender: str | None = None) -> None:  # fmt: skip
    parsed = parse_message(raw, mail_from=sender, rcpt_tos=["app@example.com"])
    await redis.xadd(stream, {"data": msgpack.packb(parsed, use_bin_type=True)})


async def test_a_pass_that_fails_midway_reads_the_rest_next_time(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries left pending by a failure are read first by the next pass (before, they stayed
    pending for good and held back the stream's trimming)."""
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    for n in range(5):
        await redis.hset(f"mailpool:sent:order-{n}", "bob@example.com", "1")
        await _store_report(
            redis, _report(message_id=f"<order-{n}.0123456789ab@x>", rcpt="bob@example.com")
        )
    record = BounceReader._record_bounce
    calls = []

    async def fails_once(self: BounceReader, bounce: object, number: int, **how: bool) -> bool:
        calls.append(bounce)
        if len(calls) == 2:
            raise aioredis.ConnectionError("Redis went away")
        return await record(self, bounce, number, **how)  # type: ignore[arg-type]

    monkeypatch.setattr(BounceReader, "_record_bounce", fails_once)
    with pytest.raises(aioredis.ConnectionError):
        await reader.read_once(0)
    assert await reader.read_once(0) == 4
    assert [e["id"] for e in await events(redis)] == [f"order-{n}" for n in range(5)]
    assert (await redis.xpending("email.receive", "mailpool-bounces"))["pending"] == 0


async def test_one_pass_catches_up_with_a_backlog(redis: aioredis.Redis) -> None:
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    pipe = redis.pipeline()
    for _ in range(1200):
        pipe.xadd("email.receive", {"data": msgpack.packb({"from": "a@b.c"})})
    await pipe.execute()
    await reader.read_once(0)
    [group] = await redis.xinfo_groups("email.receive")
    assert (group["pending"], group["lag"]) == (0, 0)


async def test_reading_bounces_off_removes_the_group(redis: aioredis.Redis, redis_url: str) -> None:
    """A group left behind would hold back trimming of email.receive for good."""
    await BounceReader([(redis, StreamKeys())], suppress_ttl=0).read_once(0)
    config = HousekeepConfig(redis_url=redis_url, read_bounces=False, housekeep_interval=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(housekeeping.serve(config, stop))
    await wait_until(lambda: _no_groups(redis), "the group removed", timeout=10)
    stop.set()
    await task


async def test_bounced_events_keep_the_events_stream_as_long_as_delivery_does(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Housekeeping's --events-maxlen is delivery's: the stream both write to was cut to
    about 100 000 by every bounce, whatever delivery kept (150 000 events -> 140 034)."""
    kept = 60_000
    for start in range(0, kept, 5_000):
        pipe = redis.pipeline(transaction=False)
        for _ in range(start, start + 5_000):
            pipe.xadd("email.send.events", {"event": "delivered"})
        await pipe.execute()
    await redis.hset("mailpool:sent:order-7", "ann@example.com", "1")
    config = HousekeepConfig(redis_url=redis_url, housekeep_interval=0.1, events_maxlen=50_000)
    stop = asyncio.Event()
    task = asyncio.create_task(housekeeping.serve(config, stop))
    await wait_until(lambda: redis.exists("email.receive"), "the bounce group", timeout=10)
    await _store_report(
        redis, _report(message_id="<order-7.0123456789ab@x>", rcpt="ann@example.com")
    )
    await wait_until(lambda: _bounced(redis), "the bounced event", timeout=10)
    stop.set()
    await task
    assert 50_000 <= await redis.xlen("email.send.events") < kept  # ~: whole nodes


async def _bounced(redis: aioredis.Redis) -> bool:
    last = await redis.xrevrange("email.send.events", count=1)
    return bool(last) and last[0][1].get(b"event") == b"bounced"


async def _no_groups(redis: aioredis.Redis) -> bool:
    return await redis.xinfo_groups("email.receive") == []


async def test_a_send_without_an_id_is_found_in_any_partition(redis: aioredis.Redis) -> None:
    """Sends without an id go to any partition: their record is looked for in each."""
    keys = [StreamKeys(), *[layout.partition_keys(StreamKeys(), p) for p in range(3)]][1:]
    reader = BounceReader([(redis, k) for k in keys], suppress_ttl=3600)
    await reader.read_once(1)
    await redis.hset("mailpool:{2}sent:1712345678901-0", "bob@example.com", "1")
    raw = _report(message_id="<1712345678901-0.0123456789ab@x>", rcpt="bob@example.com")
    await _store_report(redis, raw, stream="email.receive{1}")
    assert await reader.read_once(1) == 1
    [event] = [e async for e in _events(redis, "email.send.events{2}")]
    assert event["id"] == "1712345678901-0"


async def _events(redis: aioredis.Redis, stream: str) -> Any:
    for _, fields in await redis.xrange(stream):
        yield {k.decode(): v.decode() for k, v in fields.items()}


async def test_only_an_address_status_from_the_null_sender_suppresses(
    redis: aioredis.Redis,
) -> None:
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    await redis.hset(
        "mailpool:sent:order-1", mapping={"ann@example.com": "1", "bob@example.com": "1"}
    )
    policy = _report(message_id="<order-1.0123456789ab@x>", rcpt="ann@example.com")
    policy = policy.replace(b"Status: 5.1.1\r\n", b"").replace(b"550 5.1.1", b"550 5.7.1 spam")
    await _store_report(redis, policy)  # no Status field: a bounce, not a bad address
    forged = _report(message_id="<order-1.0123456789ab@x>", rcpt="bob@example.com")
    await _store_report(redis, forged, sender="mallory@example.net")  # not the null sender
    assert await reader.read_once(0) == 1
    assert [e["recipients"] for e in await events(redis)] == [["ann@example.com"]]
    assert await redis.exists("mailpool:suppressed") == 0


async def test_a_bounce_that_blames_the_sender_suppresses_nobody(redis: aioredis.Redis) -> None:
    """Status 5.1.7/5.1.8 is the sender's address (RFC 3463 section 3.2): the bounce is an
    event, and the recipient stays on no list (before, every recipient went on it)."""
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    await redis.hset("mailpool:sent:order-2", mapping={"ann@example.com": "1"})
    report = _report(message_id="<order-2.0123456789ab@x>", rcpt="ann@example.com")
    report = report.replace(b"Status: 5.1.1", b"Status: 5.1.8").replace(
        b"550 5.1.1 no such user", b"554 5.1.8 Sender address rejected: Domain not found"
    )
    await _store_report(redis, report)
    assert await reader.read_once(0) == 1
    assert [e["recipients"] for e in await events(redis)] == [["ann@example.com"]]
    assert await redis.exists("mailpool:suppressed") == 0


@pytest.mark.parametrize(
    ("status", "diagnostic"),
    [
        # Postfix's reject_unlisted_sender at a later hop: the status is a 5.1.x, the
        # text names the sender; the same reply at RCPT suppresses nobody either.
        (
            b"5.1.0",
            b"smtp; 550 5.1.0 <app@example.com>: Sender address rejected: "
            b"User unknown in local recipient table",
        ),
        (b"5.1.1", b"smtp; 550 5.7.1 Message rejected as spam"),  # the reply says policy
        (b"5.1.1", b"x-unix; sender domain has no MX"),  # no SMTP reply, names the sender
    ],
)
async def test_a_report_whose_diagnostic_blames_no_address_suppresses_nobody(
    redis: aioredis.Redis, status: bytes, diagnostic: bytes
) -> None:
    """A report suppresses as the same refusal at RCPT would (the Status alone is not
    enough): a sender misconfigured at a later hop must not suppress its recipients."""
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    await redis.hset("mailpool:sent:order-3", mapping={"carol@corp.test": "1"})
    report = _report(message_id="<order-3.0123456789ab@x>", rcpt="carol@corp.test")
    report = report.replace(b"Status: 5.1.1", b"Status: " + status).replace(
        b"smtp; 550 5.1.1 no such user", diagnostic
    )
    await _store_report(redis, report)
    assert await reader.read_once(0) == 1
    assert [e["recipients"] for e in await events(redis)] == [["carol@corp.test"]]
    assert await redis.exists("mailpool:suppressed") == 0


def _report_of(status_part: bytes, *, kind: bytes = b"message/delivery-status") -> bytes:
    """A report on order-9 whose status part's body is ``status_part``."""
    return (
        b"From: MAILER-DAEMON@example.net\r\nTo: app@example.com\r\nSubject: failure\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/report; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
        b"--b\r\nContent-Type: " + kind + b"\r\n\r\n" + status_part + b"\r\n"
        b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"Message-ID: <order-9.0123456789ab@x>\r\nSubject: hello\r\n\r\n--b--\r\n"
    )


def _recipients_read(raw: bytes) -> list[dict[str, str]]:
    parsed = parse_message(raw, mail_from=None, rcpt_tos=["app@example.com"])
    report = parsed["delivery_report"]  # type: ignore[typeddict-item]
    assert report["message_id"] == "<order-9.0123456789ab@x>"
    return [{k: r[k] for k in ("address", "action", "status")} for r in report["recipients"]]


FAILED = {"action": "failed", "status": "5.1.1"}


@pytest.mark.parametrize(
    "status_part",
    [
        # The per-message fields in the first recipient's block (AOL's relays write this).
        b"Reporting-MTA: dns; mx.example.net\r\nFinal-Recipient: rfc822; ann@example.com\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"Final-Recipient: rfc822; bob@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        # No per-message block at all (no Reporting-MTA).
        b"Final-Recipient: rfc822; ann@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"Final-Recipient: rfc822; bob@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n",
    ],
)
def test_every_recipient_block_is_read_whatever_comes_first(status_part: bytes) -> None:
    """Before, such a report was no report (one block), or lost its first recipient."""
    assert _recipients_read(_report_of(status_part)) == [
        {"address": "ann@example.com", **FAILED},
        {"address": "bob@example.com", **FAILED},
    ]


def test_a_huge_block_is_read_no_further_than_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile report's block of megabytes of folded lines: the stdlib's header parser
    took seconds over it, at ingest; a block is read up to report.MAX_BLOCK octets."""
    parsed: list[int] = []
    parse = report_module._parser.parsestr
    monkeypatch.setattr(report_module._parser, "parsestr",
                        lambda text: parsed.append(len(text)) or parse(text))  # fmt: skip
    folded = b"X-Padding: " + b"x\r\n " * 2_000_000 + b"x\r\n"
    block = b"Final-Recipient: rfc822; ann@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    assert _recipients_read(_report_of(block + folded)) == [
        {"address": "ann@example.com", **FAILED}
    ]
    assert max(parsed) <= 1 << 20  # not the 6 MB


def test_a_global_report_has_its_utf8_addresses_decoded() -> None:
    """message/global-delivery-status (RFC 6533): raw UTF-8, and the utf-8 address type's
    \\x{HEX} escapes (before, both came out as replacement characters or escapes)."""
    status_part = (
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        "Final-Recipient: utf-8; jösé@bücher.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        "Final-Recipient: utf-8; j\\x{F6}s\\x{E9}@example.org\r\nAction: failed\r\n"
        "Status: 5.1.1\r\n"
    ).encode()
    raw = _report_of(status_part, kind=b"message/global-delivery-status")
    assert _recipients_read(raw) == [
        {"address": "jösé@bücher.example", **FAILED},
        {"address": "jösé@example.org", **FAILED},
    ]


async def _bounces_of(
    redis: aioredis.Redis,
    *reports: bytes,
    sent: Sequence[str] = ("Ann@example.com", "zoe@xn--bcher-kva.example"),
) -> list[dict[str, Any]]:
    """The events of order-9 (sent to ``sent``: Ann and Zoë at bücher.example) after these
    reports."""
    reader = BounceReader([(redis, StreamKeys())], suppress_ttl=3600)
    await reader.read_once(0)
    await redis.hset("mailpool:sent:order-9", mapping=dict.fromkeys(sent, "1"))
    await redis.expire("mailpool:sent:order-9", 600)
    for report in reports:
        await _store_report(redis, report)
    await reader.read_once(0)
    return [e async for e in _events(redis, "email.send.events")]


def _failed(final: str, original: str | None = None) -> bytes:
    fields = f"Final-Recipient: rfc822; {final}\r\n"
    if original is not None:
        fields += f"Original-Recipient: rfc822; {original}\r\n"
    return _report_of(f"Reporting-MTA: dns; mx\r\n\r\n{fields}Action: failed\r\nStatus: 5.1.1\r\n"
                      .encode())  # fmt: skip


async def test_a_bounce_names_the_recipient_as_sent_and_matches_its_original(
    redis: aioredis.Redis,
) -> None:
    """Matched by Final-Recipient in any case or IDN form, or by Original-Recipient when an
    alias was expanded (RFC 3464 section 2.3.1); the event names the address as sent."""
    found = await _bounces_of(
        redis, _failed("ANN@EXAMPLE.COM"), _failed("real-box@other.example", "zoe@bücher.example")
    )
    assert [json.loads(e["recipients"]) for e in found] == [
        ["Ann@example.com"], ["zoe@xn--bcher-kva.example"]
    ]  # fmt: skip
    # Each recipient of order-9 holds its Message-ID, so Ann could have written the report
    # on Zoë: a send that reached several recipients gets events, and suppresses nobody.
    assert await redis.exists("mailpool:suppressed") == 0


async def test_a_bounce_of_a_send_to_one_recipient_suppresses_it(redis: aioredis.Redis) -> None:
    found = await _bounces_of(
        redis, _failed("real-box@other.example", "zoe@bücher.example"), sent=["Zoe@bücher.example"]
    )
    assert [json.loads(e["recipients"]) for e in found] == [["Zoe@bücher.example"]]
    assert await redis.zrange("mailpool:suppressed", 0, -1) == [b"zoe@xn--bcher-kva.example"]


async def test_a_report_received_twice_makes_one_event(redis: aioredis.Redis) -> None:
    found = await _bounces_of(redis, _failed("ann@example.com"), _failed("ann@example.com"))
    assert len(found) == 1
    ends = await redis.pexpiretime("mailpool:bounced:order-9")  # with the send's record
    assert ends > 0 and ends == await redis.pexpiretime("mailpool:sent:order-9")
