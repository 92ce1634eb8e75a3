"""Verification of one received message, in the two steps the SMTP transaction allows.

:meth:`Verifier.start` at MAIL FROM begins SPF for the MAIL FROM and HELO identities while the
client sends its recipients and data; :meth:`Verifier.finish` at the end of DATA checks every
DKIM signature and the ARC chain at once, then DMARC for the From domain, and gives the
verdicts, our ``Authentication-Results`` field and the content with any field forging our
verdict renamed.  Both are bounded by one budget per message (``--verify-budget``; the key
and policy lookups of the end of DATA get a second more, so that a sender who spends the
budget cannot leave the author's unasked): what is not known by then is ``temperror``.
Nothing here raises on a sender's input or a DNS failure.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import getaddresses

from workers.codec.encode import ascii_domain, utf8_text
from workers.codec.headers import decode_address_value, decode_header_value, unfold
from workers.codec.parse import DEFAULT_PARSE_LIMITS, HeaderBlock, field_values
from workers.codec.signing import author_domain, is_host_name
from workers.verify import arc, dkim, dmarc, spf
from workers.verify.resolver import Resolver
from workers.verify.results import RENAMED, Verdicts, claims_our_id, leads_with_our_id

SPF_REMEMBERED = 60.0  # seconds an SPF verdict serves the same client, sender and HELO again
SPF_REMEMBERED_SIZE = 10_000
UNSIGNED_REMEMBERED_SIZE = 4096  # verdicts on unsigned mail kept (then all forgotten at once)
UNSIGNED_REMEMBERED_AUTHORS = 2  # a message naming more From domains is not remembered

# Authentication-Results fields, to rename those claiming our authserv-id: a field runs to
# the next line not starting with white space (RFC 5322 folding); a bare CR starts a line
# too, as it does for some readers of the stored message.
_RESULTS_FIELD = re.compile(
    rb"(?:^|(?<=\r))(authentication-results)[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
    re.IGNORECASE | re.M,
)
# Whether to look for signatures and seals at all (most mail has no ARC, much no DKIM).
_DKIM_SIGNED = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.M)
_ARC_SEALED = re.compile(rb"^arc-seal[ \t]*:", re.IGNORECASE | re.M)


@dataclass(frozen=True, slots=True)
class Verified:
    """What :meth:`Verifier.finish` gives: ``field`` (``Authentication-Results: ...\\r\\n``,
    folded) goes above our Received field, ``content`` replaces the client's octets."""

    verdicts: Verdicts
    field: bytes
    content: bytes


class SpfChecks:
    """The SPF checks of one transaction, begun at MAIL FROM: each a verdict already known
    (remembered, or nothing to check) or the task finding it."""

    __slots__ = ("helo", "mailfrom")

    def __init__(self, mailfrom: SpfCheck, helo: SpfCheck) -> None:
        self.mailfrom = mailfrom
        self.helo = helo

    def cancel(self) -> None:
        """The transaction ended without DATA (RSET, QUIT, a lost connection)."""
        for check in (self.mailfrom, self.helo):
            if isinstance(check, asyncio.Future):
                check.cancel()


SpfCheck = spf.SpfResult | asyncio.Future[spf.SpfResult]


class Verifier:
    """Checks received mail against DNS through ``resolver``; ``authserv_id`` names us in
    the Authentication-Results field (RFC 8601 section 2.5)."""

    def __init__(self, resolver: Resolver, authserv_id: str, budget: float) -> None:
        self.resolver = resolver
        self.authserv_id = authserv_id
        self.budget = budget
        self._spf_remembered: OrderedDict[tuple[str, str, str], tuple[float, spf.SpfResult]]
        self._spf_remembered = OrderedDict()
        # Verdicts on mail with no DKIM signature and no ARC seal, by its SPF verdicts and
        # From fields: nothing else goes into them, so they hold while the DMARC policy
        # answers they were drawn from are kept.  A busy sender's mail skips DMARC.
        self._unsigned: dict[_UnsignedKey, _Remembered] = {}

    def start(self, peer_ip: str, sender: str, helo: str) -> SpfChecks:
        """Begin SPF for MAIL FROM ``sender`` ('' for the null sender, then the HELO identity
        stands for it) and for the HELO name, from ``peer_ip``."""
        ip = _plain_ip(peer_ip)
        sender = "" if sender == "<>" else sender  # aiosmtpd's null reverse-path
        # The HELO name as aiosmtpd decoded it: an octet that is not UTF-8 is a lone
        # surrogate, which went into the entry's auth map and failed its packing (451 to
        # every message of the session).  Escaped, it is no host name: SPF "none".
        helo = utf8_text(helo)
        now = time.monotonic()
        helo_check = self._spf(ip, "", helo, now)
        mailfrom = self._spf(ip, sender, helo, now) if sender else helo_check
        return SpfChecks(mailfrom, helo_check)

    def _spf(self, ip: str, sender: str, helo: str, now: float) -> SpfCheck:
        """The verdict when remembered, else the task finding it (within the budget from
        ``now``)."""
        key = (ip, sender.lower(), helo.lower())
        kept = self._spf_remembered.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        if not sender and not is_host_name(helo.lower().rstrip(".")):
            # RFC 7208 section 2.3: a HELO that is no domain (an address literal, a bare
            # word) has no SPF record to check.
            return spf.SpfResult("none", "helo", helo[:253])
        deadline = now + self.budget
        return asyncio.ensure_future(self._checked_spf(key, ip, sender, helo, deadline))

    async def _checked_spf(
        self, key: tuple[str, str, str], ip: str, sender: str, helo: str, deadline: float
    ) -> spf.SpfResult:
        result = await spf.check(self.resolver, ip, sender, helo, deadline=deadline)
        if result.result != "temperror":
            self._spf_remembered[key] = (time.monotonic() + SPF_REMEMBERED, result)
            self._spf_remembered.move_to_end(key)
            if len(self._spf_remembered) > SPF_REMEMBERED_SIZE:
                self._spf_remembered.popitem(last=False)
        return result

    async def finish(
        self, checks: SpfChecks, content: bytes, read: HeaderBlock | None = None
    ) -> Verified:
        """The verdicts on ``content`` (the client's octets), SPF from ``checks``;
        ``read``: :func:`read_header_block` of ``content``, when the caller has it."""
        now = time.monotonic()
        head = _Head.of(content, read)
        unsigned = _unsigned_key(checks, head)
        if unsigned is not None:
            kept = self._unsigned.get(unsigned)
            if kept is not None and kept.until > now:
                return Verified(kept.verdicts, kept.field, self._renamed(content, head))
        authors = (
            author_domains(head.from_values)
            if head.from_values is not None
            else await self._authors(head.block)
        )
        deadline = now + self.budget
        verdicts = await self._verdicts(checks, content, head, authors, unsigned, deadline=deadline)
        return Verified(verdicts, self.field(verdicts), self._renamed(content, head))

    async def _verdicts(
        self,
        checks: SpfChecks,
        content: bytes,
        head: _Head,
        authors: list[str] | None,
        unsigned: _UnsignedKey | None,
        *,
        deadline: float,
    ) -> Verdicts:
        """Every check the message asks for, by ``deadline``; remembered under ``unsigned``
        when that is given and the policies they follow from are kept."""
        for author in authors or ():  # DMARC records fetched while the signatures are
            self.resolver.prefetch(f"_dmarc.{author}", "TXT")
            self.resolver.prefetch(f"_dmarc.{dmarc.organizational_domain(author)}", "TXT")
        signatures: list[dkim.DkimResult] = []
        chain = arc.ArcResult("none")
        if head.signed and head.sealed:  # their keys fetched at the same time
            signatures, chain = await asyncio.gather(
                dkim.verify(self.resolver, content, deadline=deadline),
                arc.verify(self.resolver, content, deadline=deadline),
            )
        elif head.signed:
            signatures = await dkim.verify(self.resolver, content, deadline=deadline)
        elif head.sealed:
            chain = await arc.verify(self.resolver, content, deadline=deadline)
        mailfrom = await _spf_result(checks.mailfrom)
        helo = await _spf_result(checks.helo)
        # Remembered only for few authors (a key stays small), until the first of their
        # policy answers goes stale, read before DMARC runs: an answer it fetches again
        # meanwhile is newer, so the verdict never outlives the answers it was drawn from.
        policies_until = None
        if unsigned is not None and authors and len(authors) <= UNSIGNED_REMEMBERED_AUTHORS:
            policies_until = self._policies_kept_until(authors)
        verdict = await self._dmarc(authors, mailfrom, signatures, deadline)
        verdicts = Verdicts(mailfrom, helo, tuple(signatures), verdict, chain)
        if unsigned and policies_until is not None and verdict.result != "temperror":
            if len(self._unsigned) >= UNSIGNED_REMEMBERED_SIZE:
                self._unsigned.clear()
            self._unsigned[unsigned] = _Remembered(policies_until, verdicts, self.field(verdicts))
        return verdicts

    def _policies_kept_until(self, authors: list[str]) -> float | None:
        """Until when every DMARC policy answer for ``authors`` stays fresh (the
        organizations' too, which DMARC reads when an author publishes none); None when
        one is not kept."""
        until = []
        for author in authors:
            for name in (author, dmarc.organizational_domain(author)):
                kept = self.resolver.kept_until(f"_dmarc.{name}", "TXT")
                if kept is None:
                    return None
                until.append(kept)
        return min(until)

    async def _authors(self, head: bytes) -> list[str] | None:
        """:func:`author_domains` of the From fields the parser reads in the large header
        block ``head``: off the loop, always found (a sender must not be able to
        turn DMARC into "no author" by keeping the threads busy): when they are, on the
        loop, which costs at most about 0.5 s for the largest message ingest takes."""
        try:
            return await dkim.off_loop(_authors_of, head, deadline=time.monotonic() + 60)
        except TimeoutError:
            return _authors_of(head)

    async def _dmarc(
        self,
        authors: list[str] | None,
        mailfrom: spf.SpfResult,
        signatures: list[dkim.DkimResult],
        deadline: float,
    ) -> dmarc.DmarcResult:
        """DMARC for each From domain (RFC 7489 section 6.6.1: a message with several
        authors is checked for each); the strictest verdict stands for the message."""
        if not authors:
            return dmarc.DmarcResult("permerror", "", comment="no From domain to check")
        verdicts = [
            await dmarc.check(self.resolver, author, mailfrom, signatures, deadline=deadline)
            for author in authors
        ]
        return min(verdicts, key=_strictness)

    def field(self, verdicts: Verdicts) -> bytes:
        return authentication_results(verdicts, self.authserv_id)

    def renamed(self, content: bytes) -> bytes:
        """``content`` with every Authentication-Results field that speaks for us renamed
        (RFC 8601 section 5: a sender must not forge our verdict).  Looked for up to the
        first empty line, also after a bare CR (a line break to some readers)."""
        return self._renamed(content, _Head.of(content))

    def _renamed(self, content: bytes, head: _Head) -> bytes:
        if not head.results:
            return content

        def rename(field: re.Match[bytes]) -> bytes:
            # As sent, and as the application reads it: decoded (encoded-words and all).
            value = _unfolded(field[2])
            if claims_our_id(value, self.authserv_id) or leads_with_our_id(
                decode_header_value(value), self.authserv_id
            ):
                return RENAMED.encode() + b":" + field[2]
            return field[0]

        return _RESULTS_FIELD.sub(rename, head.block) + content[len(head.block) :]

    def failed(self, checks: SpfChecks | None, content: bytes) -> Verified:
        """Verdicts for a message whose verification failed on our side: temperror, never
        a refusal (the caller logs the failure)."""
        temperror = spf.SpfResult("temperror", "mailfrom", "")
        verdicts = Verdicts(
            temperror,
            spf.SpfResult("temperror", "helo", ""),
            (),
            dmarc.DmarcResult("temperror", ""),
            arc.ArcResult("temperror"),
        )
        if checks is not None:
            checks.cancel()
        return Verified(verdicts, self.field(verdicts), self.renamed(content))


@dataclass(slots=True)
class _Head:
    """The header block of a message (``block``: up to the empty line) and what verification
    looks for in it: DKIM signatures, ARC seals, Authentication-Results fields, and the From
    fields' values as the parser reads them (None: a block too large to read on the loop)."""

    block: bytes
    signed: bool
    sealed: bool
    results: bool
    from_values: list[bytes] | None

    @classmethod
    def of(cls, content: bytes, read: HeaderBlock | None = None) -> _Head:
        """From ``read`` (:func:`read_header_block` of ``content``) when given: the parser
        reads it anyway.  Else one lower-case copy and three plain searches spare most mail
        the regexes."""
        if (
            read is not None
            and read.body_start < dkim.IN_THREAD_FROM  # a large block: its old way, off the loop
            and len(read.fields) <= DEFAULT_PARSE_LIMITS.max_headers
        ):
            return cls._of_read(content, read)
        block = _header_block(content)
        lower = block.lower()
        small = len(block) < dkim.IN_THREAD_FROM
        return cls(
            block,
            b"dkim-signature" in lower and _DKIM_SIGNED.search(block) is not None,
            b"arc-seal" in lower and _ARC_SEALED.search(block) is not None,
            b"authentication-results" in lower,
            field_values(block, b"from") if small else None,
        )

    @classmethod
    def _of_read(cls, content: bytes, read: HeaderBlock) -> _Head:
        """What :meth:`of` finds, from the fields of a common block (names without blanks
        before the colon, values without blanks before them or a CRLF after them, nothing
        the parser drops, fewer fields than it keeps): ``field_values`` reads the same."""
        block = content[: max(read.body_start - 2, 0)]  # up to the empty line
        names = set()
        from_values = []
        for name, value in read.fields:
            lower = name.lower()
            if lower == "from":
                from_values.append(value)
            else:
                names.add(lower)
        return cls(
            block,
            "dkim-signature" in names,
            "arc-seal" in names,
            "authentication-results" in names,
            from_values,
        )


@dataclass(frozen=True, slots=True)
class _Remembered:
    """Verdicts on unsigned, unsealed mail and their field, good until ``until``."""

    until: float  # time.monotonic()
    verdicts: Verdicts
    field: bytes


_UnsignedKey = tuple[spf.SpfResult, spf.SpfResult, tuple[bytes, ...]]
UNSIGNED_REMEMBERED_FROM = 512  # octets of From fields at most in a key


def _unsigned_key(checks: SpfChecks, head: _Head) -> _UnsignedKey | None:
    """What the verdicts on unsigned, unsealed mail follow from: both SPF verdicts, when
    known already (remembered: the common case for a sender seen before), and the From
    fields as sent (the author domains are theirs; short ones only: a key stays small)."""
    if head.signed or head.sealed or not head.from_values:
        return None
    mailfrom, helo = checks.mailfrom, checks.helo
    if not isinstance(mailfrom, spf.SpfResult) or not isinstance(helo, spf.SpfResult):
        return None
    if sum(map(len, head.from_values)) > UNSIGNED_REMEMBERED_FROM:
        return None
    return (mailfrom, helo, tuple(head.from_values))


async def _spf_result(check: SpfCheck) -> spf.SpfResult:
    if isinstance(check, spf.SpfResult):
        return check
    return check.result() if check.done() else await check


@functools.lru_cache(maxsize=1024)  # by the verdicts alone: comments do not take part
def authentication_results(verdicts: Verdicts, authserv_id: str) -> bytes:
    """The Authentication-Results field, folded between results where a line would pass
    RFC 5322's 78 characters (fewer lines: less for every reader to unfold); remembered: a
    busy sender gets the same verdicts again and again, and authres takes 15 us to write
    them."""
    lines = [""]
    for piece in [f"Authentication-Results: {authserv_id}", *verdicts.texts()]:
        if lines[-1] and len(lines[-1]) + 2 + len(piece) > FOLD_AT:
            lines[-1] += ";"
            lines.append("\t" + piece)
        else:
            lines[-1] += ("; " if lines[-1] else "") + piece
    return "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"


FOLD_AT = 78


def _plain_ip(peer_ip: str) -> str:
    """The client's address as SPF sees it: an IPv4-mapped IPv6 address is the IPv4 one."""
    if ":" not in peer_ip:  # IPv4 as the socket gives it
        return peer_ip
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(address)


def _header_block(content: bytes) -> bytes:
    """The header section: up to and with the line ending before the first empty line."""
    if content.startswith((b"\r\n", b"\n")):
        return b""
    empty_line = _EMPTY_LINE.search(content)  # one pass, stopping at the first
    return content[: empty_line.start() + 1] if empty_line else content


_EMPTY_LINE = re.compile(rb"\n\r?\n")


def _unfolded(value: bytes) -> str:
    return unfold(value.decode("utf-8", "replace")).strip()


MAX_AUTHORS = 20  # From domains checked; a message naming more is a permerror


def author_domains(values: list[bytes]) -> list[str] | None:
    """The From domains DMARC checks, of the From field ``values`` the application will
    read, decoded as the parser stores them (an encoded-word in an address, against RFC
    2047, is decoded there: ``ceo@=?utf-8?q?victim.com?=`` reads ``ceo@victim.com``, so
    victim.com's policy is what counts): every address's domain that is a host name (an
    address literal or a bare word beside them changes nothing); None without any, or with
    more than :data:`MAX_AUTHORS` (RFC 7489 section 6.6.1 leaves such mail to the receiver)."""
    domains: list[str] = []
    for value in values:
        text = decode_address_value(value.decode("utf-8", "replace")).strip()
        one = author_domain(text)
        domains += [one] if one is not None else _listed_domains(text)
    unique = list(dict.fromkeys(domains))
    return unique if 0 < len(unique) <= MAX_AUTHORS else None


def _authors_of(content: bytes) -> list[str] | None:
    return author_domains(field_values(content, b"from"))


def _listed_domains(text: str) -> list[str]:
    """The host-name domains of a From field's addresses (lower case, A-labels)."""
    domains = []
    for _, address in getaddresses([text]):
        domain = address.rpartition("@")[2].rstrip(".").lower()
        if not domain.isascii():
            try:
                domain = ascii_domain(domain)
            except UnicodeError:
                continue
        if is_host_name(domain):
            domains.append(domain)
    return domains


def _strictness(verdict: dmarc.DmarcResult) -> int:
    """Lower first: which of several authors' verdicts stands for the message."""
    if verdict.result == "fail":
        return ("reject", "quarantine").index(verdict.policy) if verdict.policy in (
            "reject", "quarantine") else 3  # fmt: skip
    return {"temperror": 2, "permerror": 4, "none": 5, "pass": 6}.get(verdict.result, 4)
