"""Verdicts on mail with no DKIM signature and no ARC seal are remembered by their SPF
verdicts and author domains (a busy sender's mail skips DMARC), and only while the DMARC
policy answers they were drawn from are kept: a changed policy shows once its TTL is over.
A real DNS server (unbound on loopback) serves the records, with a TTL of one second."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.dns_util import DnsServer, txt
from tests.ingest_util import HOSTNAME
from workers.verify.dmarc import DmarcResult
from workers.verify.verifier import Verifier

ZONES = ["example.com", "forged.test", "client.test"]
RECORDS = {
    "example.com": [("TXT", txt("v=spf1 ip4:127.0.0.1 -all"))],
    "_dmarc.example.com": [("TXT", txt("v=DMARC1; p=reject"))],
    "_dmarc.forged.test": [("TXT", txt("v=DMARC1; p=quarantine"))],
    "client.test": [("TXT", txt("v=spf1 a -all")), ("A", "127.0.0.1")],
}
TTL = 1


def mail(author: str, number: int) -> bytes:
    return (
        f"From: {author}\r\nTo: b@example.net\r\nMessage-ID: <{number}@x>\r\n\r\nbody\r\n"
    ).encode()


async def dmarc_of(verifier: Verifier, author: str, number: int = 0) -> DmarcResult | None:
    checks = verifier.start("127.0.0.1", "a@example.com", "client.test")
    verified = await verifier.finish(checks, mail(author, number))
    return verified.verdicts.dmarc


@pytest.mark.parametrize("author", ["a@example.com", "a@news.example.com"])
async def test_a_changed_policy_shows_once_its_answer_expires(tmp_path: Path, author: str) -> None:
    """Also for an author domain that publishes no policy, whose organization's applies
    (RFC 7489 section 6.6.3)."""
    domain = author.partition("@")[2]
    server = DnsServer(tmp_path, ZONES, RECORDS, ttl=TTL)
    server.start()
    try:
        verifier = Verifier(server.resolver(), HOSTNAME, budget=3.0)
        for number in range(3):  # the SPF verdicts remembered, then these verdicts too
            assert await dmarc_of(verifier, author, number) == DmarcResult(
                "pass", domain, "reject", ("spf",)
            )
        server.stop()
        server.records["_dmarc.example.com"] = [("TXT", txt("v=DMARC1; p=quarantine"))]
        server.start()
        await asyncio.sleep(TTL + 0.2)
        assert await dmarc_of(verifier, author, 3) == DmarcResult(
            "pass", domain, "quarantine", ("spf",)
        )
    finally:
        server.stop()


async def test_each_author_domain_gets_its_own_verdict(tmp_path: Path) -> None:
    server = DnsServer(tmp_path, ZONES, RECORDS)
    server.start()
    try:
        verifier = Verifier(server.resolver(), HOSTNAME, budget=3.0)
        for number in range(3):
            passed = await dmarc_of(verifier, "a@example.com", number)
            forged = await dmarc_of(verifier, "ceo@forged.test", number)
            assert passed == DmarcResult("pass", "example.com", "reject", ("spf",))
            assert forged == DmarcResult("fail", "forged.test", "quarantine")
    finally:
        server.stop()
