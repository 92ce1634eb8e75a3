"""DKIM (RFC 6376, ed25519 by RFC 8463) on receive: every signature of a message.

The keys are fetched first, all at once (cached, coalesced, within the message's deadline),
then dkimpy verifies each signature with a DNS function answering from those answers:
dkimpy's own DNS is never used, and its asyncio support (one signature, aiodns) is not.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from workers.codec import dkimpy_fence
from workers.verify.resolver import TEMPORARY, Answer, Resolver

# OpenSSL checks dkimpy's RSA signatures (DKIM here, ARC seals in .arc): the fence's doc.
assert dkim.RSASSA_PKCS1_v1_5_verify is dkimpy_fence.rsa_verify


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
    tags = [_tags(value) for value in fields[:MAX_SIGNATURES]]
    names = {f"{_token(t[b's'])}._domainkey.{_token(t[b'd'])}" for t in tags if t is not None}
    answers = await fetch_keys(resolver, names, deadline)
    checked = tags[:MAX_SIGNATURES]
    if len(message) < IN_THREAD_FROM:
        return _verify_all(signer, checked, answers)
    # Hashing a large body takes long enough to stall every other session: off the loop.
    return await asyncio.to_thread(_verify_all, signer, checked, answers)


# At most this many signatures of a message are checked (each hashes the body again); the
# rest are left out of the verdicts.  Real mail carries one to three.
MAX_SIGNATURES = 10
IN_THREAD_FROM = 1 << 19  # octets; as ingest's parsing


def _verify_all(
    signer: dkim.DKIM, tags: list[dict[bytes, bytes] | None], answers: dict[str, Answer]
) -> list[DkimResult]:
    return [_verify_one(signer, index, found, answers) for index, found in enumerate(tags)]


def _token(value: bytes) -> str:
    """A tag's value as one printable token of at most 253 characters: it is the sender's
    text, and goes into our Authentication-Results field and the stored verdicts."""
    return _NOT_TOKEN.sub("", value.decode("utf-8", "replace"))[:253]


_NOT_TOKEN = re.compile(r"[\x00-\x20\x7f;\\\"()]")


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList:
        return None
    return tags if b"d" in tags and b"s" in tags else None


async def fetch_keys(resolver: Resolver, names: set[str], deadline: float) -> dict[str, Answer]:
    """The TXT answers for ``names``, asked at once; TEMPORARY for those not in time."""
    answers = {}
    asked = {}
    for name in names:
        kept = resolver.cached(name, "TXT")
        if kept is not None:  # no task for what is known: a sender seen before
            answers[name] = kept
        else:
            asked[name] = asyncio.ensure_future(resolver.ask(name, "TXT"))
    if asked:
        await asyncio.wait(asked.values(), timeout=max(deadline - time.monotonic(), 0))
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
    domain, selector = _token(tags[b"d"]), _token(tags[b"s"])
    algorithm = _token(tags.get(b"a", b""))
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
