"""ARC (RFC 8617) on receive: the chain's validation, with the sealers' keys fetched first
(cached, coalesced, within the message's deadline) and dkimpy checking the chain.

A chain of more than :data:`MAX_INSTANCES` sets fails before any key is asked for (RFC 8617
section 4.2.1 caps it at 50: a sender cannot make us ask DNS once per field), and a large
message is read and checked off the event loop within the deadline, as in :mod:`.dkim`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from workers.verify.dkim import (
    IN_THREAD_FROM,
    MAX_HEADER_FIELDS,
    MAX_SIGNED_FIELDS,
    brief,
    fetch_keys,
    off_loop,
)
from workers.verify.resolver import Answer, Resolver

_SEAL = b"arc-seal"
_SIGNED = (_SEAL, b"arc-message-signature")
MAX_INSTANCES = 50


@dataclass(frozen=True, slots=True)
class ArcResult:
    """``result``: none (no chain), pass, fail (RFC 8617 section 4.4), temperror (a key
    not answered in time); ``instances``: the chain's length; ``comment``: why not pass."""

    result: str
    instances: int = 0
    comment: str = field(default="", compare=False)  # not part of the verdict


async def verify(resolver: Resolver, message: bytes, *, deadline: float) -> ArcResult:
    large = len(message) >= IN_THREAD_FROM
    try:
        read = await off_loop(_read, message, deadline=deadline) if large else _read(message)
    except TimeoutError:
        return ArcResult("temperror", comment="not read in time")
    if isinstance(read, ArcResult):
        return read
    names, instances = read
    answers = await fetch_keys(resolver, names, deadline)
    if any(answer.temporary for answer in answers.values()):
        return ArcResult("temperror", instances, "a sealer's key was not answered in time")
    if not large:
        return _chain(message, answers, instances)
    try:
        return await off_loop(_chain, message, answers, instances, deadline=deadline)
    except TimeoutError:
        return ArcResult("temperror", instances, "not checked in time")


def _read(message: bytes) -> tuple[set[str], int] | ArcResult:
    """The sealers' key names and the chain's length, or the verdict without them."""
    try:
        sealed = dkim.ARC(message)
    except Exception as exc:  # dkimpy's parser fails in more ways than MessageFormatError
        return ArcResult("fail", comment=f"unreadable message: {type(exc).__name__}")
    fields = [(name.lower(), value) for name, value in sealed.headers]
    instances = sum(1 for name, _ in fields if name == _SEAL)
    if not instances:
        return ArcResult("none")
    if len(fields) > MAX_HEADER_FIELDS:
        return ArcResult("fail", instances, f"over {MAX_HEADER_FIELDS} header fields")
    signatures = sum(1 for name, _ in fields if name == _SIGNED[1])
    if max(instances, signatures) > MAX_INSTANCES:
        return ArcResult("fail", instances, f"over {MAX_INSTANCES} ARC sets")
    names = set()
    for name, value in fields:
        if name not in _SIGNED:
            continue
        try:
            tags = parse_tag_value(value)
        except (InvalidTagValueList, ValueError):
            continue
        if tags.get(b"h", b"").count(b":") >= MAX_SIGNED_FIELDS:  # dkimpy's cost: see .dkim
            return ArcResult("fail", instances, f"over {MAX_SIGNED_FIELDS} signed fields")
        if b"d" in tags and b"s" in tags:
            names.add(f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}")
    return names, instances


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _chain(message: bytes, answers: dict[str, Answer], instances: int) -> ArcResult:
    def key(name: bytes, timeout: int = 5) -> bytes | None:
        answer = answers.get(_text(name).rstrip("."))
        return answer.records[0].encode() if answer and answer.records else None

    try:
        result, _details, reason = dkim.arc_verify(message, dnsfunc=key)
    except Exception as exc:  # a broken chain, or dkimpy failing on what a sender wrote
        return ArcResult("fail", instances, brief(f"{type(exc).__name__}: {exc}"))
    verdict = result.decode()
    return ArcResult(verdict, instances, "" if verdict == "pass" else brief(str(reason)))
