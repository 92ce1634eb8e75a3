"""The suppression list: recipient addresses delivery does not attempt for a while.

A recipient a relay refused permanently as an address (``5.1.x`` bad mailbox or domain,
``5.2.1`` mailbox disabled, or ``550``/``551``/``553`` at RCPT without an enhanced code and
with a text that says the mailbox is unknown; never a refusal that names the sender) is
suppressed for ``--suppress-ttl`` seconds; an operator adds and removes addresses with
``mailpool suppress``.  A send to a suppressed recipient is not attempted for that recipient:
a dead letter and an event, both with reason ``suppressed`` (workers/delivery/attempt.py).

Layout (one copy per partition, so that delivery's look-up goes to the partition's own
Redis in the round trip it makes anyway; every write goes to every copy):

* ``<prefix>suppressed``, a sorted set: address (lower case) -> until (epoch seconds;
  ``+inf`` for an entry without an end);
* ``<prefix>suppressed:why``, a hash: address -> JSON ``{"reason", "since", "code",
  "text", "message_id"}`` (what suppressed it; ``reason`` is ``rejected`` or ``manual``).

An entry whose time is up counts as absent at once; housekeeping removes it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import redis.asyncio as aioredis

from workers.codec.encode import ascii_domain
from workers.streams.layout import SmtpReply, StreamKeys

REASON_REJECTED = "rejected"
REASON_MANUAL = "manual"
REASON_BOUNCED = "bounced"  # a hard bounce report received later (workers.streams.bounces)
DEFAULT_TTL = 30 * 86400  # 30 days

# Enhanced codes that say the recipient's address itself is bad (RFC 3463 sections 3.2 and
# 3.3, RFC 7505's 5.1.10 null MX): not 5.1.5 (valid), 5.1.7 and 5.1.8 (the SENDER's address
# is bad: Postfix's "Sender address rejected: Domain not found" comes at RCPT time) nor
# 5.1.9 (relayed to a non-DSN mailer).
_ADDRESS_STATUS = re.compile(r"5\.1\.(?:[0-46]|10)|5\.2\.1")
# At the start of the text (RFC 2034), or as qmail writes it, last: "... (#5.7.1)".  Not
# anywhere: "see 5.1.1 in our FAQ" or a version number is no status.
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?![\d.])|.*\(#([245]\.\d{1,3}\.\d{1,3})\)")
_ADDRESS_BASIC = (550, 551, 553)
# A refusal naming the sender blames the sender, whatever its code (Postfix's
# reject_unlisted_sender: "550 5.1.0 <a@b>: Sender address rejected: User unknown").
_BLAMES_THE_SENDER = re.compile(r"\bsender\b", re.IGNORECASE)
# Without an enhanced code, 550/551/553 are also what relays answer to relaying they do not
# allow, to policy, to spam, to the client's host: only a text that says the mailbox or its
# domain is unknown suppresses ("User unknown", Exim's "Unrouteable address"), and none
# that speaks of relaying, policy or the client (Exim's "550 relay not permitted", qmail's
# "553 sorry, that domain isn't in my list of allowed rcpthosts", "550 Mail from unknown IP
# address refused").  A refusal not recognised here suppresses nobody: the next send is
# refused again, not lost.
_MAILBOX = r"(?:user|recipient|mailbox|address|addressee|account|alias|local part)"
_UNKNOWN_MAILBOX = re.compile(
    rf"{_MAILBOX}s? (?:is )?unknown|unknown {_MAILBOX}|"
    rf"no such (?:{_MAILBOX}|person|local user|domain)|"
    rf"(?:{_MAILBOX}|domain)\b[^.;:]{{0,40}}?(?:does ?n[o']t|not|no longer) exists?|"
    r"unroutable address|unrouteable address|invalid (?:recipient|mailbox|address|user)|"
    r"mailbox (?:unavailable|not found|disabled)|(?:user|recipient) not found|no mailbox|"
    r"not a valid (?:mailbox|recipient|user)|recipient (?:address )?rejected|"
    r"bad destination",
    re.IGNORECASE,
)
_POLICY = re.compile(
    r"relay|rcpthosts|polic|spam|block|black|deny|denied|reputation|authenticat|"
    r"too many|\brate\b|quota|not permitted|not allowed|\bclient\b|\bhelo\b|\behlo\b|"
    r"reverse dns|\bptr\b|\bip\b|content|attachment|filter",
    re.IGNORECASE,
)


def normalise(address: str) -> str:
    """The form the list keys by: lower case (case does not tell mailboxes apart in
    practice), an internationalised domain in its ASCII form (IDNA 2008, as delivery
    sends it)."""
    local, at, domain = address.strip().rpartition("@")
    if at and not domain.isascii():
        # Kept as given when it has no ASCII form: it matches nothing delivery sends to.
        with contextlib.suppress(UnicodeError):
            domain = ascii_domain(domain)
    return f"{local}{at}{domain}".lower()


def address_status(status: str) -> bool:
    """True for a report's ``Status`` that blames the recipient's address (5.1.x but the
    sender's, 5.2.1)."""
    code = status.split(maxsplit=1)[0] if status.strip() else ""
    return _ADDRESS_STATUS.fullmatch(code) is not None


def refuses_the_address(reply: SmtpReply) -> bool:
    """True for a relay's permanent refusal of a recipient that blames the address, not the
    sender, the message or the relay's policy (``554 5.7.1 relay access denied`` and
    ``550 relay not permitted`` suppress nobody)."""
    if reply.code is None or not 500 <= reply.code < 600:
        return False
    if _BLAMES_THE_SENDER.search(reply.text):
        return False
    enhanced = _ENHANCED.match(reply.text)
    if enhanced is not None:
        code = enhanced.group(1) or enhanced.group(2)
        return _ADDRESS_STATUS.fullmatch(code) is not None
    return (
        reply.code in _ADDRESS_BASIC
        and _UNKNOWN_MAILBOX.search(reply.text) is not None
        and _POLICY.search(reply.text) is None
    )


def report_refuses_the_address(status: str, reply: SmtpReply, diagnostic: str) -> bool:
    """True for a delivery-status report's failed recipient that blames the address: its
    ``Status`` is one :func:`address_status` accepts, and its Diagnostic-Code names no
    sender and, when it holds an SMTP ``reply``, is a reply :func:`refuses_the_address`
    accepts (a later hop's ``550 5.1.0 <app@example.com>: Sender address rejected`` comes
    back with Status 5.1.0, and must suppress nobody, as the same reply at RCPT does)."""
    if not address_status(status) or _BLAMES_THE_SENDER.search(diagnostic):
        return False
    return reply.code is None or refuses_the_address(reply)


@dataclass(frozen=True)
class Suppression:
    address: str
    until: float  # epoch seconds; math.inf: no end
    reason: str
    since: float
    code: int | None = None
    text: str = ""
    message_id: str = ""

    def why(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k not in ("address", "until")})

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["until"] = None if math.isinf(self.until) else self.until
        return data


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def describe_until(until: float) -> str:
    try:
        return "further notice" if math.isinf(until) else _when(until)
    except (OverflowError, OSError, ValueError):  # an end beyond what gmtime can show
        return "further notice"


def _score(until: float) -> str:
    return "+inf" if math.isinf(until) else repr(round(until, 3))


class SuppressionList:
    """Every partition's copy of the list: ``copies`` is (client, keys) per partition."""

    def __init__(self, copies: Sequence[tuple[aioredis.Redis, StreamKeys]]) -> None:
        self.copies = list(copies)

    async def add(self, entries: Iterable[Suppression], *, replace: bool = False) -> None:
        """Add in every copy.  An entry already there keeps the later end (a refusal seen
        twice extends it), unless ``replace`` (an operator's ``suppress add``)."""
        entries = list(entries)
        if not entries:
            return
        # Every copy at once, each on its own: one shard down leaves the others written.
        done = await asyncio.gather(
            *(self._add_to(redis, keys, entries, replace) for redis, keys in self.copies),
            return_exceptions=True,
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    @staticmethod
    async def _add_to(
        redis: aioredis.Redis, keys: StreamKeys, entries: list[Suppression], replace: bool
    ) -> None:
        pipe = redis.pipeline(transaction=False)
        for entry in entries:
            # GT still adds a new member; it only keeps a later end from moving back.  CH:
            # the reply says whether the end was written.
            pipe.zadd(
                keys.suppressed, {entry.address: _score(entry.until)}, gt=not replace, ch=True
            )
        written = await pipe.execute()
        # The reason goes with the end kept: a refusal that does not extend an entry leaves
        # its reason (an operator's note) as it is.
        pipe = redis.pipeline(transaction=False)
        for entry, changed in zip(entries, written, strict=True):
            if replace or changed:
                pipe.hset(keys.suppressed_why, entry.address, entry.why())
        _bump_version(pipe, keys)
        await pipe.execute()

    async def remove(self, addresses: Sequence[str]) -> int:
        """Remove from every copy; how many of ``addresses`` were on the list."""
        found: set[str] = set()
        for redis, keys in self.copies:
            pipe = redis.pipeline(transaction=False)
            for address in addresses:
                pipe.zrem(keys.suppressed, address)
            pipe.hdel(keys.suppressed_why, *addresses)
            _bump_version(pipe, keys)
            removed = await pipe.execute()
            found.update(a for a, gone in zip(addresses, removed, strict=False) if gone)
        return len(found)

    async def entries(self, now: float | None = None) -> list[Suppression]:
        """The entries in force, over every copy (a write that reached only some copies
        still shows), sorted by address."""
        now = time.time() if now is None else now
        merged: dict[str, Suppression] = {}
        for redis, keys in self.copies:
            members = cast(
                "list[tuple[bytes, float]]",
                await redis.zrangebyscore(keys.suppressed, f"({now}", "+inf", withscores=True),
            )
            if not members:
                continue
            names = [_text(member) for member, _ in members]
            whys = await redis.hmget(keys.suppressed_why, names)
            for (_, until), name, why in zip(members, names, whys, strict=True):
                entry = _entry(name, float(until), why)
                if name not in merged or merged[name].until < entry.until:
                    merged[name] = entry
        return [merged[name] for name in sorted(merged)]

    async def purge_expired(self, now: float | None = None) -> int:
        """Remove the entries whose time is up (housekeeping); how many, over the copies."""
        now = time.time() if now is None else now
        purged = 0
        for redis, keys in self.copies:
            expired = cast("list[bytes]", await redis.zrangebyscore(keys.suppressed, "-inf", now))
            if not expired:
                continue
            pipe = redis.pipeline(transaction=False)
            # Only those still expired: an address suppressed again meanwhile stays.
            pipe.zremrangebyscore(keys.suppressed, "-inf", now)
            pipe.hdel(keys.suppressed_why, *expired)
            _bump_version(pipe, keys)
            count, _, _ = await pipe.execute()
            purged += int(count)
        return purged


def _version_key(keys: StreamKeys) -> str:
    return keys.suppressed + ":version"


# How often a delivery worker asks whether the list changed, seconds; and the largest list it
# keeps a copy of (a larger one is asked about per read batch instead).
REFRESH = 1.0
MAX_LOCAL = 200_000


class SuppressionView:
    """A delivery worker's copy of one partition's list, so that a read batch needs no round
    trip for it: every :data:`REFRESH` seconds one ``GET`` of the list's version (every
    write increments it), and the whole list again only when it changed.  Changes reach the
    worker within a second; its own additions at once.  A list over :data:`MAX_LOCAL`
    entries is not copied: :attr:`local` is False and each batch asks Redis (ZMSCORE)."""

    def __init__(self, redis: aioredis.Redis, keys: StreamKeys) -> None:
        self.redis = redis
        self.keys = keys
        self.until: dict[str, float] = {}
        self.local = True
        self._version: bytes | None = None
        self._checked = -math.inf

    async def refresh_if_due(self) -> None:
        now = time.monotonic()
        if now - self._checked < REFRESH:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(_version_key(self.keys))
        pipe.zcard(self.keys.suppressed)
        version, size = await pipe.execute()
        self._checked = now
        if version == self._version and version is not None:
            return
        self.local = int(size) <= MAX_LOCAL
        if self.local:
            members = cast(
                "list[tuple[bytes, float]]",
                await self.redis.zrangebyscore(
                    self.keys.suppressed, f"({time.time()}", "+inf", withscores=True
                ),
            )
            self.until = {_text(member): float(end) for member, end in members}
        else:
            self.until = {}
        self._version = version

    def added(self, entries: Iterable[Suppression]) -> None:
        """This worker's own additions, in force before the next refresh."""
        for entry in entries:
            self.until[entry.address] = max(entry.until, self.until.get(entry.address, 0.0))


def _bump_version(pipe: aioredis.client.Pipeline, keys: StreamKeys) -> None:
    """The list changed: workers copy it again.  INCR, not redis-py's ``incr`` (INCRBY),
    which the role users of deploy/redis/users.acl are not allowed: the write half applied,
    the command exited 1, and the workers never saw the change."""
    pipe.execute_command("INCR", _version_key(keys))


def _text(value: bytes | str) -> str:
    """A member as text; one that is not UTF-8 (written by hand) matches no address, and
    crashed the delivery worker that copied the list."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _entry(address: str, until: float, why: bytes | str | None) -> Suppression:
    """An entry with its reason, from whatever ``why`` holds (a hand-written value that is
    not our JSON object is left out)."""
    try:
        data = json.loads(why) if why is not None else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    since, code = data.get("since"), data.get("code")
    return Suppression(
        address=address,
        until=until,
        reason=str(data.get("reason", REASON_MANUAL)),
        since=float(since) if isinstance(since, int | float) and _finite(since) else 0.0,
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        text=str(data.get("text", "")),
        message_id=str(data.get("message_id", "")),
    )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
