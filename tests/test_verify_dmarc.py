"""DMARC on receive: policies from a real DNS server, alignment by the
bundled public suffix list."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.dns_util import DnsServer, running_dns, txt
from workers.verify.dkim import DkimResult
from workers.verify.dmarc import aligned, check
from workers.verify.resolver import Resolver
from workers.verify.spf import SpfResult

RECORDS = {
    "_dmarc.example.com": [("TXT", txt("v=DMARC1; p=reject; sp=quarantine"))],
    "_dmarc.strict.test": [("TXT", txt("v=DMARC1; p=none; adkim=s; aspf=s"))],
    "_dmarc.broken.test": [("TXT", txt("v=DMARC1; p=maybe"))],
}
ZONES = ["example.com", "strict.test", "broken.test", "nothing.test"]


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with running_dns(tmp_path_factory.mktemp("dns"), ZONES, RECORDS) as server:
        yield server


def test_alignment_uses_the_public_suffix_list() -> None:
    assert aligned("mail.example.co.uk", "example.co.uk", strict=False)
    assert not aligned("co.uk", "example.co.uk", strict=False)
    assert not aligned("mail.example.com", "example.com", strict=True)


def test_an_internationalised_domain_aligns_with_its_a_labels() -> None:
    """SPF names a UTF-8 sender's domain as sent (SMTPUTF8), the From domain comes with
    A-labels: the same domain, which did not align (DMARC failed legitimate mail)."""
    assert aligned("faß.test", "xn--fa-hia.test", strict=True)
    assert aligned("mail.faß.test", "xn--fa-hia.test", strict=False)
    assert aligned("xn--fa-hia.test", "FAß.test", strict=True)
    assert not aligned("fass.test", "xn--fa-hia.test", strict=False)  # IDNA 2003's reading


async def test_pass_by_dkim_or_spf_fail_with_the_policy(dns: DnsServer) -> None:
    resolver = dns.resolver()
    spf_ok = SpfResult("pass", "mailfrom", "bounce.example.com")
    dkim_ok = [DkimResult("pass", "example.com", "s1", "ed25519-sha256")]
    by_spf = await check(resolver, "example.com", spf_ok, [], deadline=time.monotonic() + 5)
    assert (by_spf.result, by_spf.aligned, by_spf.policy) == ("pass", ("spf",), "reject")
    by_dkim = await check(resolver, "example.com", None, dkim_ok, deadline=time.monotonic() + 5)
    assert (by_dkim.result, by_dkim.aligned) == ("pass", ("dkim",))
    other = [DkimResult("pass", "example.net", "s1", "rsa-sha256")]
    failed = await check(resolver, "example.com", None, other, deadline=time.monotonic() + 5)
    assert (failed.result, failed.policy) == ("fail", "reject")
    sub = await check(resolver, "news.example.com", None, [], deadline=time.monotonic() + 5)
    assert (sub.result, sub.policy) == ("fail", "quarantine")  # sp= of the organization


async def test_strict_none_broken_and_down(dns: DnsServer) -> None:
    resolver = dns.resolver()
    relaxed_only = [DkimResult("pass", "mail.strict.test", "s1", "rsa-sha256")]
    strict = await check(resolver, "strict.test", None, relaxed_only, deadline=time.monotonic() + 5)
    assert (strict.result, strict.policy) == ("fail", "none")
    none = await check(resolver, "nothing.test", None, [], deadline=time.monotonic() + 5)
    assert none.result == "none"
    broken = await check(resolver, "broken.test", None, [], deadline=time.monotonic() + 5)
    assert broken.result == "permerror"
    silent = Resolver(("127.0.0.1", 9), timeout=10.0)
    down = await check(silent, "example.com", None, [], deadline=time.monotonic() + 0.3)
    assert down.result == "temperror"


async def test_an_aligned_check_that_timed_out_is_a_temperror_not_a_fail(dns: DnsServer) -> None:
    """During a DNS outage the aligned SPF or DKIM check may have passed: DMARC says it does
    not know (keeping the policy), so an application does not refuse legitimate mail."""
    late_spf = SpfResult("temperror", "mailfrom", "example.com", unanswered=True)
    got = await check(dns.resolver(), "example.com", late_spf, [], deadline=time.monotonic() + 5)
    assert (got.result, got.policy) == ("temperror", "reject")
    late_dkim = [DkimResult("temperror", "example.com", "s1", unanswered=True)]
    unaligned = SpfResult("pass", "mailfrom", "elsewhere.example")
    got = await check(dns.resolver(), "example.com", unaligned, late_dkim,
                      deadline=time.monotonic() + 5)  # fmt: skip
    assert (got.result, got.policy) == ("temperror", "reject")
    # A timeout for a domain not aligned with the author changes nothing: still a fail.
    other = SpfResult("temperror", "mailfrom", "elsewhere.example", unanswered=True)
    got = await check(dns.resolver(), "example.com", other, [], deadline=time.monotonic() + 5)
    assert (got.result, got.policy) == ("fail", "reject")
    # Nor does a check of ours that ran out of time (a sender's huge message can make it):
    # only DNS not answering for the author's domain may stand for "might have passed".
    unchecked = [DkimResult("temperror", "example.com", "s1", comment="not checked in time")]
    got = await check(dns.resolver(), "example.com", unaligned, unchecked,
                      deadline=time.monotonic() + 5)  # fmt: skip
    assert (got.result, got.policy) == ("fail", "reject")


async def test_the_policy_is_still_asked_when_the_budget_is_spent(dns: DnsServer) -> None:
    """A sender whose own key lookups use up the message's budget must not leave the
    author's policy unasked (a temperror instead of the fail it is)."""
    got = await check(dns.resolver(), "example.com", None, [], deadline=time.monotonic() - 1)
    assert (got.result, got.policy) == ("fail", "reject")
