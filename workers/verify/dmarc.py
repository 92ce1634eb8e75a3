"""DMARC (RFC 7489) on receive: the From domain's policy and whether SPF or DKIM passed for
a domain aligned with it.  The organizational domain comes from the public suffix list
that publicsuffixlist ships (never fetched at run time)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from publicsuffixlist import PublicSuffixList

from workers.codec.encode import ascii_domain
from workers.verify.dkim import DkimResult
from workers.verify.resolver import TEMPORARY, Answer, Resolver
from workers.verify.spf import SpfResult

_SUFFIXES = PublicSuffixList()  # 34 ms to read, once per process
POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """``result``: pass, fail, none (no record), temperror, permerror (a broken record);
    ``policy``: what the domain asks for a failing message (none, quarantine, reject;
    "" without a record); ``aligned``: what passed aligned (spf, dkim)."""

    result: str
    domain: str
    policy: str = ""
    aligned: tuple[str, ...] = ()
    comment: str = field(default="", compare=False)  # not part of the verdict


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    return _SUFFIXES.privatesuffix(domain.lower()) or domain.lower()


def aligned(authenticated: str, author: str, *, strict: bool) -> bool:
    """RFC 7489 section 3.1: the same domain (strict), or the same organizational domain.
    Compared as A-labels: SPF names a UTF-8 sender's domain as sent (``faß.test``), the
    From domain comes as ``xn--fa-hia.test``, and the two did not align."""
    authenticated, author = _a_labels(authenticated), _a_labels(author)
    if strict:
        return authenticated == author
    return organizational_domain(authenticated) == organizational_domain(author)


@functools.lru_cache(maxsize=4096)
def _a_labels(domain: str) -> str:
    """``domain`` in lower case with A-labels (as it is when it has no A-label form)."""
    try:
        return ascii_domain(domain).lower()
    except UnicodeError:
        return domain.lower()


async def check(
    resolver: Resolver,
    author: str,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    deadline: float,
) -> DmarcResult:
    """The verdict for mail whose From domain is ``author``."""
    organization = organizational_domain(author)
    record = await _record(resolver, f"_dmarc.{author}", deadline)
    at_organization = False
    unpublished = record is not None and not record.temporary and not _policy_records(record)
    if unpublished and organization != author.lower():  # RFC 7489 6.6.3: ask the organization
        record = await _record(resolver, f"_dmarc.{organization}", deadline)
        at_organization = True
    if record is None or record.temporary:
        return DmarcResult("temperror", author)
    found = _policy_records(record)
    if not found:
        return DmarcResult("none", author)
    if len(found) > 1:
        return DmarcResult("permerror", author)
    tags = _tags(found[0])
    policy = tags.get("p", "")
    if policy not in POLICIES:
        return DmarcResult("permerror", author)
    if at_organization and tags.get("sp") in POLICIES:
        policy = tags["sp"]
    passed = []
    # ``spf``: the MAIL FROM identity's verdict, which for the null sender is the HELO
    # identity's (RFC 7489 section 4.1, RFC 7208 section 2.4).
    if (
        spf is not None
        and spf.result == "pass"
        and aligned(spf.domain, author, strict=tags.get("aspf") == "s")
    ):
        passed.append("spf")
    if any(
        d.result == "pass" and aligned(d.domain, author, strict=tags.get("adkim") == "s")
        for d in dkim
    ):
        passed.append("dkim")
    if not passed and _unknown(spf, dkim, author, tags):
        # An aligned identifier DNS did not answer for may have passed: not a fail that an
        # application would refuse legitimate mail on during a DNS outage.
        return DmarcResult("temperror", author, policy, comment="an aligned check timed out")
    return DmarcResult("pass" if passed else "fail", author, policy, tuple(passed))


def _unknown(
    spf: SpfResult | None, dkim: Sequence[DkimResult], author: str, tags: dict[str, str]
) -> bool:
    """Whether DNS did not answer in time for an identifier aligned with ``author`` (not
    any temperror: a sender can make our own checks run out of time, but not the author
    domain's DNS)."""
    strict_spf = tags.get("aspf") == "s"
    if spf is not None and spf.unanswered and spf.domain:
        return aligned(spf.domain, author, strict=strict_spf) or _unknown(None, dkim, author, tags)
    return any(
        d.unanswered and d.domain and aligned(d.domain, author, strict=tags.get("adkim") == "s")
        for d in dkim
    )


# Seconds a policy lookup may take past the message's deadline: a sender whose own key
# lookups spend the budget must not leave the author's policy unasked (a temperror).
POLICY_GRACE = 1.0


async def _record(resolver: Resolver, name: str, deadline: float) -> Answer | None:
    kept = resolver.cached(name, "TXT")
    if kept is not None:  # no task for wait_for to make: the common case, a sender seen
        return kept
    try:
        return await asyncio.wait_for(
            resolver.ask(name, "TXT"), max(deadline - time.monotonic(), 0) + POLICY_GRACE
        )
    except TimeoutError:
        return TEMPORARY


def _policy_records(answer: Answer) -> list[str]:
    return [text for text in answer.records if text.replace(" ", "").startswith("v=DMARC1")]


@functools.lru_cache(maxsize=1024)
def _tags(record: str) -> dict[str, str]:  # callers only read it
    tags = {}
    for part in record.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            tags[name.strip().lower()] = value.strip().lower()
    return tags
