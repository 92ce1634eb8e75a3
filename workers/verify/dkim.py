"""DKIM (RFC 6376, ed25519 by RFC 8463) on receive: every signature of a message.

The keys are fetched first, all at once (cached, coalesced, within the message's deadline),
then dkimpy verifies each signature with a DNS function answering from those answers:
dkimpy's own DNS is never used, and its asyncio support (one signature, aiodns) is not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from workers.verify.resolver import TEMPORARY, Answer, Resolver


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One signature's verdict (RFC 8601 section 2.7.1): pass, fail, neutral (not
    checkable: a malformed signature), temperror (no key answer in time), permerror (no
    key, a malformed or unusable key)."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    comment: str = ""


async def verify(resolver: Resolver, message: bytes, *, deadline: float) -> list[DkimResult]:
    """A verdict per DKIM-Signature field, top down; [] for an unsigned message."""
    try:
        signer = dkim.DKIM(message)
    except dkim.MessageFormatError as exc:
        return [DkimResult("neutral", comment=f"unreadable message: {exc}")]
    fields = [value for name, value in signer.headers if name.lower() == b"dkim-signature"]
    tags = [_tags(value) for value in fields]
    names = {f"{t[b's'].decode()}._domainkey.{t[b'd'].decode()}" for t in tags if t is not None}
    answers = await fetch_keys(resolver, names, deadline)
    return [_verify_one(signer, index, found, answers) for index, found in enumerate(tags)]


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList:
        return None
    return tags if b"d" in tags and b"s" in tags else None


async def fetch_keys(resolver: Resolver, names: set[str], deadline: float) -> dict[str, Answer]:
    """The TXT answers for ``names``, asked at once; TEMPORARY for those not in time."""
    asked = {name: asyncio.ensure_future(resolver.ask(name, "TXT")) for name in names}
    if asked:
        await asyncio.wait(asked.values(), timeout=max(deadline - time.monotonic(), 0))
    answers = {}
    for name, task in asked.items():
        if task.done() and not task.cancelled() and task.exception() is None:
            answers[name] = task.result()
        else:
            task.cancel()
            answers[name] = TEMPORARY
    return answers


def _verify_one(
    signer: dkim.DKIM, index: int, tags: dict[bytes, bytes] | None, answers: dict[str, Answer]
) -> DkimResult:
    if tags is None:
        return DkimResult("neutral", comment="malformed signature")
    domain, selector = tags[b"d"].decode(), tags[b"s"].decode()
    algorithm = tags.get(b"a", b"").decode()
    answer = answers[f"{selector}._domainkey.{domain}"]
    if answer.temporary or not answer.records:
        result, comment = (
            ("temperror", "no key answer in time")
            if answer.temporary
            else ("permerror", "no key published")
        )
        return DkimResult(result, domain, selector, algorithm, comment)
    result, comment = _checked(signer, index, answer.records[0].encode())
    return DkimResult(result, domain, selector, algorithm, comment)


def _checked(signer: dkim.DKIM, index: int, record: bytes) -> tuple[str, str]:
    """(result, comment) of dkimpy's verification of signature ``index`` with ``record``."""

    def key(name: bytes, timeout: int = 5) -> bytes:
        return record

    try:
        ok = signer.verify(idx=index, dnsfunc=key)
    except dkim.ValidationError as exc:
        return "fail", str(exc)
    except (dkim.KeyFormatError, dkim.UnknownKeyTypeError) as exc:
        return "permerror", str(exc)
    except dkim.DKIMException as exc:
        return "neutral", str(exc)
    return ("pass", "") if ok else ("fail", "signature did not verify")
