"""DKIM (RFC 6376, ed25519 by RFC 8463) on receive: every signature of a message.

The keys are fetched first, all at once (cached, coalesced, within the message's deadline),
then dkimpy verifies each signature with a DNS function answering from those answers:
dkimpy's own DNS is never used, and its asyncio support (one signature, aiodns) is not.

The sender chooses what dkimpy works through, so the work is bounded before it starts: at
most :data:`MAX_SIGNATURES` signatures, none naming more than :data:`MAX_SIGNED_FIELDS`
fields, none checked over more than :data:`MAX_HEADER_FIELDS` fields, and a message of
:data:`IN_THREAD_FROM` octets or more read and checked off the event loop, on threads of
verification's own (:func:`off_loop`), waited for no longer than the deadline (then
``temperror``).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from workers.codec import dkimpy_fence
from workers.verify.resolver import TEMPORARY, Answer, Resolver

# OpenSSL checks dkimpy's RSA signatures (DKIM here, ARC seals in .arc): the fence's doc.
assert dkim.RSASSA_PKCS1_v1_5_verify is dkimpy_fence.rsa_verify

# At most this many signatures of a message are checked (each hashes the body again); the
# rest are left out of the verdicts.  Real mail carries one to three.
MAX_SIGNATURES = 10
# dkimpy looks each name of h= up among all the fields: a long h= over many fields costs
# their product.  Signers name 10 to 40 (over-signing doubles some).
MAX_SIGNED_FIELDS = 100
MAX_HEADER_FIELDS = 1000  # a message with more is not checked (real mail: under 100)
KEY_GRACE = 1.0  # seconds key lookups may take past the message's deadline
IN_THREAD_FROM = 1 << 16  # octets: larger messages are read and hashed off the loop
# Threads of verification's own (ingest's parsing keeps the default executor to itself), and
# how much work may wait for them: beyond it a message's checks are temperror at once.  A
# thread past its message's deadline runs on, bounded by the limits above.
THREADS = 2
AT_ONCE = 4
_EXECUTOR = ThreadPoolExecutor(THREADS, thread_name_prefix="mailpool-verify")
_admitted = threading.BoundedSemaphore(AT_ONCE)


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One signature's verdict (RFC 8601 section 2.7.1): pass, fail, neutral (not
    checkable: a malformed signature, or one over our limits), temperror (no key answer in
    time, or not checked in time), permerror (no key, a malformed or unusable key).
    ``unanswered``: the temperror is DNS's (the key was asked for and not answered in time),
    the only one DMARC may take for "might have passed": a sender can make our own checks
    run out of time, not the signing domain's DNS."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    comment: str = field(default="", compare=False)  # not part of the verdict
    unanswered: bool = False


Tags = dict[bytes, bytes] | str  # a signature's tags, or why it cannot be checked


async def verify(resolver: Resolver, message: bytes, *, deadline: float) -> list[DkimResult]:
    """A verdict per DKIM-Signature field, top down; [] for an unsigned message."""
    large = len(message) >= IN_THREAD_FROM
    try:
        read = await off_loop(_read, message, deadline=deadline) if large else _read(message)
    except TimeoutError:
        return [DkimResult("temperror", comment="not read in time")]
    if isinstance(read, DkimResult):
        return [read]
    signer, tags = read
    names = {_key_name(t) for t in tags if not isinstance(t, str)}
    answers = await fetch_keys(resolver, names, deadline)
    if not large:
        return _verify_all(signer, tags, answers)
    try:
        return await off_loop(_verify_all, signer, tags, answers, deadline=deadline)
    except TimeoutError:
        return [_unchecked(t, "temperror", "not checked in time") for t in tags]


T = TypeVar("T")


async def off_loop(work: Callable[..., T], *args: object, deadline: float) -> T:
    """``work(*args)`` on a verification thread, waited for until ``deadline``; TimeoutError
    then (the thread finishes on its own, its result unused), or at once when
    :data:`AT_ONCE` pieces of work are already running or waiting."""
    if not _admitted.acquire(blocking=False):
        raise TimeoutError("verification threads busy")
    try:
        future = _EXECUTOR.submit(work, *args)
    except BaseException:
        _admitted.release()
        raise
    future.add_done_callback(lambda _: _admitted.release())  # when the work really ends
    return await asyncio.wait_for(
        asyncio.wrap_future(future), max(deadline - time.monotonic(), 0.001)
    )


def _read(message: bytes) -> tuple[dkim.DKIM, list[Tags]] | DkimResult:
    try:
        signer = dkim.DKIM(message)
    except Exception as exc:  # dkimpy's parser fails in more ways than MessageFormatError
        return DkimResult("neutral", comment=f"unreadable message: {type(exc).__name__}")
    fields = [value for name, value in signer.headers if name.lower() == b"dkim-signature"]
    tags = [_tags(value) for value in fields[:MAX_SIGNATURES]]
    if len(signer.headers) > MAX_HEADER_FIELDS:
        reason = f"over {MAX_HEADER_FIELDS} header fields, not checked"
        tags = [reason if isinstance(t, dict) else t for t in tags]
    return signer, tags


def _token(value: bytes) -> str:
    """A tag's value as one token of at most 253 ASCII characters: it is the sender's text,
    and goes into our Authentication-Results field and the stored verdicts."""
    return _NOT_TOKEN.sub("", value.decode("ascii", "ignore"))[:253]


_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._-]")


def brief(text: str) -> str:
    """A comment as kept: dkimpy's messages quote the sender's tags (a b= of megabytes)."""
    return text if len(text) <= 200 else text[:197] + "..."


def _tags(value: bytes) -> Tags:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except (InvalidTagValueList, ValueError):
        return "malformed signature"
    if b"d" not in tags or b"s" not in tags:
        return "malformed signature"
    if tags.get(b"h", b"").count(b":") >= MAX_SIGNED_FIELDS:
        return f"over {MAX_SIGNED_FIELDS} signed fields, not checked"
    return tags


def _key_name(tags: dict[bytes, bytes]) -> str:
    return f"{_token(tags[b's'])}._domainkey.{_token(tags[b'd'])}"


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
        # A second past the deadline: a sender who spent the budget (a large message queued
        # for the threads) must not leave the author's key unasked, a temperror DMARC would
        # take for "might have passed".
        wait = max(deadline - time.monotonic(), 0) + KEY_GRACE
        await asyncio.wait(asked.values(), timeout=wait)
    for name, task in asked.items():
        if task.done() and not task.cancelled() and task.exception() is None:
            answers[name] = task.result()
        else:
            task.cancel()
            answers[name] = TEMPORARY
    return answers


def _verify_all(
    signer: dkim.DKIM, tags: list[Tags], answers: dict[str, Answer]
) -> list[DkimResult]:
    return [_verify_one(signer, index, found, answers) for index, found in enumerate(tags)]


def _unchecked(tags: Tags, result: str, comment: str) -> DkimResult:
    if isinstance(tags, str):
        return DkimResult("neutral", comment=tags)
    return DkimResult(result, _token(tags[b"d"]), _token(tags[b"s"]),
                      _token(tags.get(b"a", b"")), brief(comment))  # fmt: skip


def _unanswered(tags: dict[bytes, bytes]) -> DkimResult:
    domain, selector, algorithm = (_token(tags.get(tag, b"")) for tag in (b"d", b"s", b"a"))
    comment = "no key answer in time"
    return DkimResult("temperror", domain, selector, algorithm, comment, unanswered=True)


def _verify_one(
    signer: dkim.DKIM, index: int, tags: Tags, answers: dict[str, Answer]
) -> DkimResult:
    if isinstance(tags, str):
        return DkimResult("neutral", comment=tags)
    answer = answers[_key_name(tags)]
    if answer.temporary:
        return _unanswered(tags)
    if not answer.records:
        return _unchecked(tags, "permerror", "no key published")
    record = answer.records[0].encode()
    refused = _key_refuses(record, tags)
    if refused is not None:
        return _unchecked(tags, "permerror", refused)
    return _unchecked(tags, *_checked(signer, index, tags, record))


def _key_refuses(record: bytes, tags: dict[bytes, bytes]) -> str | None:
    """Why the key record does not allow this signature (RFC 6376 section 3.6.1), which
    dkimpy does not check: a hash algorithm not in its ``h=``, an ``i=`` in a subdomain of
    ``d=`` under ``t=s``.  The key's owner's restrictions: a signature past them is a
    permerror, not a pass.  None when it allows it (or cannot be read: dkimpy says so)."""
    try:
        key: dict[bytes, bytes] = parse_tag_value(record)
    except InvalidTagValueList:
        return None
    hash_name = tags.get(b"a", b"").partition(b"-")[2].strip().lower()
    allowed = key.get(b"h")
    if allowed is not None and hash_name not in _listed(allowed):
        return f"the key does not allow {hash_name.decode(errors='replace')} (h=)"
    if b"s" in _listed(key.get(b"t", b"")):
        identity = tags.get(b"i", b"").rpartition(b"@")[2].strip().lower()
        if identity and identity != tags.get(b"d", b"").strip().lower():
            return "the key allows no subdomain in i= (t=s)"
    return None


def _listed(value: bytes) -> set[bytes]:
    """A key tag's colon-separated list, lower case."""
    return {item.strip().lower() for item in value.split(b":")}


def _checked(
    signer: dkim.DKIM, index: int, tags: dict[bytes, bytes], record: bytes
) -> tuple[str, str]:
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
    except Exception as exc:  # dkimpy failing on what a sender wrote: not checkable
        return "neutral", f"unverifiable: {type(exc).__name__}"
    if ok:
        return "pass", ""
    return _key_unusable(record, tags) or ("fail", "signature did not verify")


def _key_unusable(record: bytes, tags: dict[bytes, bytes]) -> tuple[str, str] | None:
    """dkimpy's verify answers False for a key it cannot use as well: that is a permerror
    (RFC 8601 section 2.7.1), told apart here with dkimpy's own key reader."""
    try:
        dkim.evaluate_pk(tags[b"s"] + b"._domainkey." + tags[b"d"], record)
    except Exception as exc:  # KeyFormatError, UnknownKeyTypeError, a key it chokes on
        return "permerror", f"unusable key: {exc}"
    return None
