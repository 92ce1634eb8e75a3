"""ARC (RFC 8617) on receive: the chain's validation, with the sealers' keys fetched first
(cached, coalesced, within the message's deadline) and dkimpy checking the chain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from workers.verify.dkim import IN_THREAD_FROM, fetch_keys
from workers.verify.resolver import Answer, Resolver

_ARC_SIGNED = (b"arc-seal", b"arc-message-signature")


@dataclass(frozen=True, slots=True)
class ArcResult:
    """``result``: none (no chain), pass, fail (RFC 8617 section 4.4), temperror (a key
    not answered in time); ``instances``: the chain's length; ``comment``: why not pass."""

    result: str
    instances: int = 0
    comment: str = ""


async def verify(resolver: Resolver, message: bytes, *, deadline: float) -> ArcResult:
    try:
        sealed = dkim.ARC(message)
    except dkim.MessageFormatError as exc:
        return ArcResult("fail", comment=f"unreadable message: {exc}")
    names = set()
    instances = 0
    for name, value in sealed.headers:
        if name.lower() not in _ARC_SIGNED:
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue
        if b"d" in tags and b"s" in tags:
            names.add(f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}")
        if name.lower() == b"arc-seal":
            instances += 1
    if not instances:
        return ArcResult("none")
    answers = await fetch_keys(resolver, names, deadline)
    if any(answer.temporary for answer in answers.values()):
        return ArcResult("temperror", instances, "a sealer's key was not answered in time")
    if len(message) < IN_THREAD_FROM:
        return _chain(message, answers, instances)
    return await asyncio.to_thread(_chain, message, answers, instances)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _chain(message: bytes, answers: dict[str, Answer], instances: int) -> ArcResult:
    def key(name: bytes, timeout: int = 5) -> bytes | None:
        answer = answers.get(_text(name).rstrip("."))
        return answer.records[0].encode() if answer and answer.records else None

    try:
        result, _details, reason = dkim.arc_verify(message, dnsfunc=key)
    except (dkim.DKIMException, IndexError, KeyError, ValueError) as exc:  # a broken chain
        return ArcResult("fail", instances, f"{type(exc).__name__}: {exc}")
    verdict = result.decode()
    return ArcResult(verdict, instances, "" if verdict == "pass" else str(reason))
