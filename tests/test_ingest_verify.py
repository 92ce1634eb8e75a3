"""Verification on receive, end to end: mail sent over SMTP to ``mailpool ingest`` with a real
DNS server (unbound on loopback) serving the senders' SPF, DKIM and DMARC records, signed and
sealed by an independent implementation (npm mailauth); the entry carries the verdicts in
``auth`` and the stored message our Authentication-Results field above our Received field.
A DNS that is down or silent gives temperror and still 250."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.dkim_util import KeyFile, mailauth_seal, mailauth_sign, write_key
from tests.dns_util import DnsServer, running_dns, txt
from tests.harness import longest_stall, verification_threads_idle, wait_until
from tests.ingest_util import HOSTNAME, SMTPConn, entries, ingest
from workers.codec.parse import read_header_block
from workers.verify.dkim import AT_ONCE, DkimResult, brief, off_loop
from workers.verify.dmarc import DmarcResult
from workers.verify.resolver import Resolver
from workers.verify.results import Verdicts
from workers.verify.spf import SpfResult
from workers.verify.verifier import Verifier, authentication_results

ZONES = ["example.com", "forged.test", "lax.test", "lists.test", "client.test", "other.test"]
POLICIES = {
    "example.com": [("TXT", txt("v=spf1 ip4:127.0.0.1 -all"))],
    "_dmarc.example.com": [("TXT", txt("v=DMARC1; p=reject"))],
    "forged.test": [("TXT", txt("v=spf1 ip4:192.0.2.1 -all"))],
    "_dmarc.forged.test": [("TXT", txt("v=DMARC1; p=quarantine"))],
    "_dmarc.lax.test": [("TXT", txt("v=DMARC1; p=none"))],
    "client.test": [("TXT", txt("v=spf1 a -all")), ("A", "127.0.0.1")],
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyFile]:
    directory = tmp_path_factory.mktemp("keys")
    return {
        "ed25519": write_key(directory, "example.com", "e1", "ed25519"),
        "rsa": write_key(directory, "example.com", "r1", "rsa"),
        "forwarder": write_key(directory, "lists.test", "f1", "rsa"),
    }


@pytest.fixture(scope="module")
def dns(keys: dict[str, KeyFile], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    records = {**POLICIES, **dict(key.dns_record() for key in keys.values())}
    with running_dns(tmp_path_factory.mktemp("dns"), ZONES, records) as server:
        yield server


def mail(author: str = "a@example.com", subject: str = "hi", **more: str) -> bytes:
    fields = {"From": author, "To": "b@example.net", "Subject": subject, **more}
    head = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in fields.items())
    return (head + "\r\nHello  there,\r\nthe body.\r\n").encode()


async def received(
    redis_url: str, redis: aioredis.Redis, content: bytes, mail_from: str, **config: Any
) -> tuple[tuple[int, str], dict[str, Any]]:
    """The reply to ``content`` sent from ``mail_from`` (HELO client.test), and its entry."""
    async with ingest(redis_url, **{"verify": True, **config}) as server:
        conn = await SMTPConn.open(server.port)
        try:
            await conn.ehlo("client.test")
            reply = await conn.transaction(content, mail_from=mail_from)
        finally:
            await conn.close()
    stored = await entries(redis)
    return reply, stored[-1][1] if stored else {}


def fields_named(entry: dict[str, Any], name: str) -> list[str]:
    return [value for field, value in entry["header_list"] if field.lower() == name.lower()]


async def test_mail_signed_with_both_algorithms_passes_dkim_and_dmarc(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer, keys: dict[str, KeyFile]
) -> None:
    signed = mailauth_sign(mailauth_sign(mail(), keys["rsa"]), keys["ed25519"])
    reply, entry = await received(redis_url, redis, signed, "bounce@other.test",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    auth = entry["auth"]
    assert [(d["result"], d["domain"], d["selector"], d["algorithm"]) for d in auth["dkim"]] == [
        ("pass", "example.com", "e1", "ed25519-sha256"),
        ("pass", "example.com", "r1", "rsa-sha256"),
    ]
    assert auth["spf_mailfrom"] == {"result": "none", "domain": "other.test"}
    assert auth["spf_helo"] == {"result": "pass", "domain": "client.test"}
    assert auth["dmarc"] == {
        "result": "pass", "domain": "example.com", "policy": "reject", "aligned": ["dkim"]
    }  # fmt: skip
    assert auth["arc"] == {"result": "none", "instances": 0}
    # Our field first, then our Received field, then what the client sent.
    assert [name for name, _ in entry["header_list"][:2]] == ["Authentication-Results", "Received"]
    [ours] = fields_named(entry, "Authentication-Results")
    assert ours.startswith(f"{HOSTNAME};")
    assert "dkim=pass header.d=example.com header.a=ed25519-sha256 header.s=e1" in ours
    assert "dmarc=pass" in ours and "header.from=example.com" in ours


@pytest.mark.parametrize(
    ("mail_from", "author", "spf", "dmarc"),
    [
        ("a@example.com", "a@example.com", "pass",
         {"result": "pass", "domain": "example.com", "policy": "reject", "aligned": ["spf"]}),
        ("x@forged.test", "x@forged.test", "fail",
         {"result": "fail", "domain": "forged.test", "policy": "quarantine", "aligned": []}),
        ("a@example.com", "ceo@forged.test", "pass",
         {"result": "fail", "domain": "forged.test", "policy": "quarantine", "aligned": []}),
        ("x@lax.test", "x@lax.test", "none",
         {"result": "fail", "domain": "lax.test", "policy": "none", "aligned": []}),
        ("x@other.test", "x@other.test", "none",
         {"result": "none", "domain": "other.test", "policy": "", "aligned": []}),
        ("a@example.com", "a@example.com, ceo@forged.test", "pass",
         {"result": "fail", "domain": "forged.test", "policy": "quarantine", "aligned": []}),
        ("a@example.com", "undisclosed-recipients:;", "pass",
         {"result": "permerror", "domain": "", "policy": "", "aligned": []}),
        ("a@example.com", "ceo@forged.test, x@[192.0.2.1], undisclosed", "pass",
         {"result": "fail", "domain": "forged.test", "policy": "quarantine", "aligned": []}),
    ],
    ids=["aligned-spf", "spf-fail-quarantine", "unaligned", "policy-none", "no-record",
         "two-authors-strictest", "no-author", "author-among-junk"],
)  # fmt: skip
async def test_spf_and_dmarc_of_unsigned_mail_always_250(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer,
    mail_from: str, author: str, spf: str, dmarc: dict[str, Any],
) -> None:  # fmt: skip
    reply, entry = await received(redis_url, redis, mail(author), mail_from,
                                  dns_server=dns.address)  # fmt: skip
    # The verdicts are the application's to act on: nothing is refused for them.
    assert reply[0] == 250, reply
    assert entry["auth"]["spf_mailfrom"]["result"] == spf
    assert entry["auth"]["dmarc"] == dmarc
    assert entry["auth"]["dkim"] == []
    [ours] = fields_named(entry, "Authentication-Results")
    assert f"spf={spf} smtp.mailfrom={mail_from.rpartition('@')[2]}" in ours
    assert "dkim=none" in ours


async def test_an_arc_sealed_forward_passes_where_dkim_broke(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer, keys: dict[str, KeyFile]
) -> None:
    signed = mailauth_sign(mail(), keys["rsa"])
    # The list tags the subject (breaking the author's signature), then seals the hop.
    tagged = signed.replace(b"Subject: hi", b"Subject: [list] hi")
    sealed = mailauth_seal(
        tagged, keys["forwarder"], "mx.lists.test; dkim=pass header.d=example.com", "none"
    )
    reply, entry = await received(redis_url, redis, sealed, "list@lists.test",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    assert entry["auth"]["arc"] == {"result": "pass", "instances": 1}
    assert [d["result"] for d in entry["auth"]["dkim"]] == ["fail"]
    assert entry["auth"]["dmarc"]["result"] == "fail"
    [ours] = fields_named(entry, "Authentication-Results")
    assert "arc=pass" in ours


async def test_a_forged_verdict_in_our_name_is_renamed_others_kept(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    forged = (
        f"Authentication-Results: {HOSTNAME.upper()};\r\n\tdkim=pass header.d=bank.test\r\n"
        "Authentication-Results: mx.elsewhere.example; spf=pass smtp.mailfrom=example.com\r\n"
        f"authentication-results:{HOSTNAME}; dmarc=pass header.from=bank.test\r\n"
    ).encode()
    reply, entry = await received(redis_url, redis, forged + mail(), "a@example.com",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    results = fields_named(entry, "Authentication-Results")
    assert len(results) == 2
    assert results[0].startswith(f"{HOSTNAME};") and "spf=pass" in results[0]
    assert results[1].startswith("mx.elsewhere.example;")
    renamed = fields_named(entry, "X-Forged-Authentication-Results")
    assert len(renamed) == 2
    assert "header.d=bank.test" in renamed[0] and "header.from=bank.test" in renamed[1]


async def test_our_authserv_id_is_configurable(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    forged = b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
    _, entry = await received(redis_url, redis, forged + mail(), "a@example.com",
                              dns_server=dns.address, authserv_id="auth.example")  # fmt: skip
    results = fields_named(entry, "Authentication-Results")
    # Another authserv-id: mx.test speaks for someone else now, and is kept.
    assert results[0].startswith("auth.example;") and results[1].startswith("mx.test;")


@pytest.fixture
def silent_dns() -> Iterator[str]:
    """A UDP port on loopback that takes DNS questions and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("down", ["refused", "silent"])
async def test_dns_down_gives_temperror_and_still_250(
    redis_url: str, redis: aioredis.Redis, silent_dns: str, down: str
) -> None:
    server = silent_dns if down == "silent" else "127.0.0.1:9"  # nothing listens on discard
    started = time.monotonic()
    reply, entry = await received(redis_url, redis, mail(), "a@example.com",
                                  dns_server=server, verify_budget=0.5)  # fmt: skip
    assert reply[0] == 250, reply
    auth = entry["auth"]
    assert auth["spf_mailfrom"] == {"result": "temperror", "domain": "example.com"}
    assert auth["spf_helo"]["result"] == "temperror"
    assert auth["dmarc"]["result"] == "temperror"
    # The budget bounds the wait (from MAIL FROM for SPF, from the end of DATA for DMARC,
    # whose policy lookup gets a second more), not dnspython's own timeout of 5 s.
    assert time.monotonic() - started < 4  # budget + the policy lookup's grace, not 5 s
    [ours] = fields_named(entry, "Authentication-Results")
    assert "spf=temperror" in ours and "dmarc=temperror" in ours


async def test_a_helo_name_that_is_not_utf8_is_kept_escaped_and_250(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    """aiosmtpd decodes the name with surrogateescape; its lone surrogate went into the
    entry's auth map, which then could not be packed: 451 to every message of the session,
    and the mail was never stored."""
    async with ingest(redis_url, verify=True, dns_server=dns.address) as server:
        conn = await SMTPConn.open(server.port)
        try:
            assert (await conn.cmd(b"EHLO cli\xe7nt.test"))[0] == 250
            reply = await conn.transaction(mail(), mail_from="a@example.com")
        finally:
            await conn.close()
    assert reply[0] == 250, reply
    [(_, entry)] = await entries(redis)
    assert entry["auth"]["spf_helo"] == {"result": "none", "domain": "cli\\xe7nt.test"}


async def test_no_verify_adds_nothing(redis_url: str, redis: aioredis.Redis) -> None:
    reply, entry = await received(redis_url, redis, mail(), "a@example.com", verify=False)
    assert reply[0] == 250
    assert "auth" not in entry
    assert fields_named(entry, "Authentication-Results") == []
    assert entry["header_list"][0][0] == "Received"


async def test_spf_begins_at_mail_from_before_the_data(dns: DnsServer) -> None:
    resolver = dns.resolver()
    verifier = Verifier(resolver, HOSTNAME, budget=3.0)
    checks = verifier.start("127.0.0.1", "a@example.com", "client.test")
    assert isinstance(checks.mailfrom, asyncio.Future) and isinstance(checks.helo, asyncio.Future)
    await asyncio.wait_for(asyncio.gather(checks.mailfrom, checks.helo), 3)
    asked = resolver.questions
    assert asked >= 2  # both identities' records, before any content exists
    verified = await verifier.finish(checks, mail())
    assert verified.verdicts.spf_mailfrom is not None
    assert verified.verdicts.spf_mailfrom.result == "pass"
    # Seen again: the SPF verdicts are remembered, and DNS answers kept.
    again = verifier.start("127.0.0.1", "a@example.com", "client.test")
    assert isinstance(again.mailfrom, SpfResult) and isinstance(again.helo, SpfResult)
    await verifier.finish(again, mail())
    assert resolver.questions == asked + 1  # _dmarc.example.com, asked once


async def test_the_null_sender_is_checked_as_its_helo(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    """MAIL FROM:<> (a bounce): the HELO identity stands for MAIL FROM (RFC 7208 section
    2.4), and DMARC aligns with it."""
    reply, entry = await received(redis_url, redis, mail("postmaster@client.test"), "",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    assert entry["from"] is None
    assert entry["auth"]["spf_mailfrom"] == {"result": "pass", "domain": "client.test"}
    [ours] = fields_named(entry, "Authentication-Results")
    assert "smtp.mailfrom=client.test" in ours and "<>" not in ours


async def test_dmarc_judges_the_from_the_application_reads(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    """A line the parser does not take for a field ends the header block for the
    application; verification reads the same fields, so no hidden From can turn the
    author's fail into a permerror without a policy."""
    content = (b"From: ceo@forged.test\r\nTo: b@example.net\r\nSubject: hi\r\n"
               b"From : x@evil.test\r\n\r\nbody\r\n")  # fmt: skip
    reply, entry = await received(redis_url, redis, content, "a@example.com",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    assert entry["headers"]["from"] == "ceo@forged.test"
    assert entry["auth"]["dmarc"] == {
        "result": "fail", "domain": "forged.test", "policy": "quarantine", "aligned": []
    }  # fmt: skip


@pytest.mark.parametrize(
    "author",
    [
        "a@client.test, ceo@=?utf-8?q?forged.test?=",
        "ceo@=?utf-8?q?forged?=.test",
        "Ceo <ceo@=?utf-8?b?Zm9yZ2VkLnRlc3Q=?=>",
        "ceo@forged\x00.test",
    ],
    ids=["second-address-encoded", "domain-part-encoded", "base64", "nul"],
)
async def test_dmarc_judges_the_from_as_decoded_for_the_application(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer, author: str
) -> None:
    """An encoded-word inside an address (against RFC 2047, decoded by the parser all the
    same) named forged.test to the application while DMARC read past it: it judged
    client.test alone, or nothing, and an attacker passed or escaped forged.test's policy."""
    content = mail(author).replace(b"\\x00", b"\x00")
    reply, entry = await received(redis_url, redis, content, "a@client.test",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    assert "forged" in entry["headers"]["from"]
    dmarc = entry["auth"]["dmarc"]
    assert (dmarc["result"], dmarc["domain"], dmarc["policy"]) == (
        "fail", "forged.test", "quarantine"
    )  # fmt: skip


async def test_a_forged_verdict_with_our_id_encoded_is_renamed(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    """The application reads ``=?us-ascii?q?<our id>?=`` decoded: as ours."""
    forged = (
        f"Authentication-Results: =?us-ascii?q?{HOSTNAME}?=; dmarc=pass header.from=bank.test\r\n"
    ).encode()
    reply, entry = await received(redis_url, redis, forged + mail(), "a@example.com",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    [ours] = fields_named(entry, "Authentication-Results")
    assert ours.startswith(f"{HOSTNAME};") and "header.from=bank.test" not in ours
    [renamed] = fields_named(entry, "X-Forged-Authentication-Results")
    assert "header.from=bank.test" in renamed


async def test_another_hosts_verdict_with_an_encoded_comment_is_kept(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    """Decoded, its comment ``(café)`` made the value unreadable to authres, and an
    unreadable value counted as ours: an upstream's honest field was renamed forged."""
    upstream = (
        b"Authentication-Results: mx.upstream.example; spf=pass "
        b"smtp.mailfrom=a@example.com (=?utf-8?q?caf=C3=A9?=)\r\n"
    )
    forged = (
        f"Authentication-Results: (x) =?us-ascii?q?{HOSTNAME}?= 1; dmarc=pass "
        "header.from=bank.test (=?utf-8?q?caf=C3=A9?=)\r\n"
    ).encode()
    reply, entry = await received(redis_url, redis, upstream + forged + mail(), "a@example.com",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    kept = fields_named(entry, "Authentication-Results")
    assert len(kept) == 2 and kept[1].startswith("mx.upstream.example;")
    [renamed] = fields_named(entry, "X-Forged-Authentication-Results")
    assert "header.from=bank.test" in renamed


async def test_what_dkimpy_cannot_read_still_gets_verdicts_and_renaming(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    content = (b" a first line that continues nothing\r\nDKIM-Signature: x\r\n"
               b"Authentication-Results: mx.test; dmarc=pass header.from=forged.test\r\n"
               + mail("ceo@forged.test"))  # fmt: skip
    reply, entry = await received(redis_url, redis, content, "a@example.com",
                                  dns_server=dns.address)  # fmt: skip
    assert reply[0] == 250, reply
    assert [d["result"] for d in entry["auth"]["dkim"]] == ["neutral"]
    assert entry["auth"]["dmarc"]["result"] == "fail"
    [ours] = fields_named(entry, "Authentication-Results")
    assert ours.startswith(f"{HOSTNAME};") and "dmarc=fail" in ours
    assert fields_named(entry, "X-Forged-Authentication-Results") == [
        "mx.test; dmarc=pass header.from=forged.test"
    ]


async def test_a_field_after_a_bare_cr_is_renamed_too(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    """Some readers of the stored raw message take a bare CR for a line break."""
    hidden = b"Subject: hi\rAuthentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
    reply, entry = await received(redis_url, redis, hidden + mail(), "a@example.com",
                                  dns_server=dns.address, keep_raw="always")  # fmt: skip
    assert reply[0] == 250, reply
    assert b"\rX-Forged-Authentication-Results: mx.test; dkim=pass" in entry["raw"]
    assert b"\rAuthentication-Results" not in entry["raw"]


async def test_a_hostile_helo_cannot_write_into_our_field(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer
) -> None:
    async with ingest(redis_url, verify=True, dns_server=dns.address, keep_raw="always") as server:
        conn = await SMTPConn.open(server.port)
        try:
            await conn.cmd("EHLO x\rAuthentication-Results: mx.test; dmarc=pass header.from=b.test")
            reply = await conn.transaction(mail(), mail_from="")
        finally:
            await conn.close()
    assert reply[0] == 250, reply
    [(_, entry)] = await entries(redis)
    ours = entry["raw"].split(b"\r\nReceived:")[0]
    assert ours.startswith(b"Authentication-Results: mx.test;")
    assert b"\r" not in ours.replace(b"\r\n", b"") and b"dmarc=pass" not in ours
    assert len(fields_named(entry, "Authentication-Results")) == 1


def test_renaming_does_not_depend_on_verification_succeeding() -> None:
    """When our verification fails (a bug of ours), the forged field is renamed all the same
    and the verdicts are temperror."""
    verifier = Verifier(Resolver(("127.0.0.1", 9)), HOSTNAME, budget=1.0)
    forged = b"Authentication-Results: mx.test; dmarc=pass header.from=bank.test\r\n" + mail()
    verified = verifier.failed(None, forged)
    assert verified.content.startswith(b"X-Forged-Authentication-Results: mx.test;")
    assert verified.verdicts.dmarc is not None and verified.verdicts.dmarc.result == "temperror"


async def test_a_header_block_of_megabytes_is_read_without_stalling(dns: DnsServer) -> None:
    """The From fields of a large message are found off the loop, and found: DMARC judges
    the author the application will read, however much follows it."""
    verifier = Verifier(dns.resolver(), HOSTNAME, budget=3.0)
    content = b"From: ceo@forged.test\r\n" + b"X-Filler: x\r\n" * 300_000 + b"\r\nbody\r\n"
    checks = verifier.start("127.0.0.1", "a@example.com", "client.test")
    verified, stall = await longest_stall(verifier.finish(checks, content))
    assert verified.verdicts.dmarc == DmarcResult("fail", "forged.test", "quarantine")
    assert stall < 0.3, "the event loop stalled"


def test_sender_text_is_kept_short_and_our_field_ascii() -> None:
    """dkimpy's messages quote the sender's tags (a b= of megabytes), and a d= may be any
    text: what is remembered and written stays small, one ASCII line per result."""
    huge = DkimResult("fail", "\u00fc" * 300, "s" * 300, "a" * 300, brief("x" * 2_000_000))
    verdicts = Verdicts(None, None, (huge,), None, None)
    field = authentication_results(verdicts, HOSTNAME)
    assert len(huge.comment) <= 200
    assert field.isascii()
    assert max(len(line) for line in field.split(b"\r\n")) < 998


async def test_busy_verification_threads_do_not_hide_the_author(dns: DnsServer) -> None:
    """With every verification thread taken, a large header block's From is read on the
    loop: DMARC still judges the author (no "no From domain" permerror to hide behind)."""
    verifier = Verifier(dns.resolver(), HOSTNAME, budget=1.0)
    content = b"From: ceo@forged.test\r\n" + b"X-Filler: x\r\n" * 10_000 + b"\r\nbody\r\n"
    await wait_until(verification_threads_idle, "earlier verification threads done", timeout=30)
    release = threading.Event()
    held = [asyncio.ensure_future(off_loop(release.wait, deadline=time.monotonic() + 30))
            for _ in range(AT_ONCE)]  # fmt: skip
    try:
        await asyncio.sleep(0.05)
        checks = verifier.start("127.0.0.1", "a@example.com", "client.test")
        verified = await verifier.finish(checks, content)
    finally:
        release.set()
        await asyncio.gather(*held)
    assert verified.verdicts.dmarc == DmarcResult("fail", "forged.test", "quarantine")


def test_our_field_is_remembered_by_verdict_and_unreadable_domains_left_out() -> None:
    spf = SpfResult("none", "mailfrom", "paypal.com\ue000")
    first = Verdicts(spf, None, (DkimResult("fail", "a.example", comment="x" * 150),), None, None)
    again = Verdicts(spf, None, (DkimResult("fail", "a.example", comment="y"),), None, None)
    hits = authentication_results.cache_info().hits
    field = authentication_results(first, HOSTNAME)
    assert authentication_results(again, HOSTNAME) is field
    assert authentication_results.cache_info().hits == hits + 1
    assert b"paypal" not in field and b"spf=none" in field


async def test_a_message_parsed_off_the_loop_has_its_header_block_read_off_it_too(
    redis_url: str, redis: aioredis.Redis, dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header block read once for the verifier and the parser is read on the loop only
    for a message the parser reads there: a larger one (a block of 100 000 short fields
    is as slow to read as it is to parse) is parsed on a thread, and verified as before."""
    from workers.ingest import handler

    sizes: list[int] = []

    def recorded(data: bytes) -> Any:
        sizes.append(len(data))
        return read_header_block(data)

    monkeypatch.setattr(handler, "read_header_block", recorded)
    lines = b"x" * 78 + b"\r\n"
    large = mail(subject="large") + lines * (handler.PARSE_IN_THREAD_FROM // len(lines))
    for content in (mail(subject="small"), large):
        reply, entry = await received(redis_url, redis, content, "a@example.com",
                                      dns_server=dns.address)  # fmt: skip
        assert reply[0] == 250, reply
        assert entry["auth"]["dmarc"]["result"] == "pass"
        assert fields_named(entry, "Subject") == [entry["headers"]["subject"]]
    assert sizes == [len(mail(subject="small"))]
