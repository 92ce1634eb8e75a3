"""DNS answers for authentication checks: dnspython's asyncio resolver behind a cache.

Answers are kept for their TTL (a negative answer for the zone's negative TTL, bounded),
so a sender seen again costs no query; questions asked while the same one is in flight wait
for it instead of asking again.  A failure (timeout, SERVFAIL, no server answering) is an
answer too, :data:`TEMPORARY`, kept briefly: checks turn it into ``temperror``, never
into a refusal.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

MAX_TTL = 3600.0  # seconds an answer is kept at most, whatever its TTL
NEGATIVE_TTL = 300.0  # at most, for "no such name" / "no such record"
FAILURE_TTL = 5.0  # a failed question is asked again after this


@dataclass(frozen=True, slots=True)
class Answer:
    """What DNS said: ``records`` as text (TXT: the strings joined, as bytes tuples kept
    in ``strings``), ``temporary`` when it could not say (then ``records`` is empty)."""

    records: tuple[str, ...] = ()
    strings: tuple[tuple[bytes, ...], ...] = ()  # TXT only: each record's strings
    temporary: bool = False


TEMPORARY = Answer(temporary=True)
NOTHING = Answer()


class Resolver:
    """Cached, coalesced DNS questions; ``server``: ``(host, port)``, else the system's."""

    def __init__(
        self, server: tuple[str, int] | None = None, *, timeout: float = 5.0, size: int = 20_000
    ) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=server is None)
        if server is not None:
            self._resolver.nameservers = [server[0]]
            self._resolver.port = server[1]
        self._resolver.lifetime = timeout
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._asking: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        self._size = size
        self.questions = 0  # sent to the server (the cache and coalescing spare the rest)

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The kept answer, if there is one still fresh (no await: SPF's replay asks this
        first)."""
        kept = self._fresh(name, rdtype)
        return kept[1] if kept is not None else None

    def kept_until(self, name: str, rdtype: str) -> float | None:
        """Until when (``time.monotonic()``) the kept answer stays fresh; None when there
        is none."""
        kept = self._fresh(name, rdtype)
        return kept[0] if kept is not None else None

    def _fresh(self, name: str, rdtype: str) -> tuple[float, Answer] | None:
        kept = self._cache.get((name.lower().rstrip("."), rdtype))
        return kept if kept is not None and kept[0] > time.monotonic() else None

    def prefetch(self, name: str, rdtype: str) -> None:
        """Start asking, unless the answer is kept or being asked for: a later :meth:`ask`
        finds it sooner."""
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._asking and self.cached(*key) is None:
            self._asking[key] = asyncio.ensure_future(self._fetch(key))

    async def ask(self, name: str, rdtype: str) -> Answer:
        key = (name.lower().rstrip("."), rdtype)
        kept = self._cache.get(key)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        asking = self._asking.get(key)
        if asking is None:
            # The question runs as its own task: an asker cancelled (its session gone, its
            # budget spent) leaves it running for the others waiting on it, and the answer
            # is kept for the next; dnspython's lifetime bounds it.
            asking = asyncio.ensure_future(self._fetch(key))
            self._asking[key] = asking
        return await asyncio.shield(asking)

    async def _fetch(self, key: tuple[str, str]) -> Answer:
        try:
            answer, ttl = await self._query(*key)
        except Exception:  # dnspython's own failure modes beyond DNSException
            answer, ttl = TEMPORARY, FAILURE_TTL
        finally:
            del self._asking[key]
        self._keep(key, answer, ttl)
        return answer

    async def _query(self, name: str, rdtype: str) -> tuple[Answer, float]:
        self.questions += 1
        try:
            result = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            # The zone's negative TTL is not carried on the exception in every dnspython
            # release: our bound stands for it.
            return NOTHING, NEGATIVE_TTL
        except (dns.exception.SyntaxError, dns.name.NameTooLong, dns.name.IDNAException):
            # A name no DNS could hold (a label over 63 octets, an empty one): the sender
            # wrote it, so there is no such record, not a failure to find it.
            return NOTHING, NEGATIVE_TTL
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.exception.DNSException):
            return TEMPORARY, FAILURE_TTL
        if result.rrset is None:
            return NOTHING, min(NEGATIVE_TTL, float(result.expiration - time.time()))
        ttl = min(MAX_TTL, float(result.rrset.ttl))
        if rdtype == "TXT":
            strings = tuple(tuple(rdata.strings) for rdata in result.rrset)
            text = tuple(b"".join(parts).decode("utf-8", "replace") for parts in strings)
            return Answer(text, strings), ttl
        return Answer(tuple(rdata.to_text() for rdata in result.rrset)), ttl

    def _keep(self, key: tuple[str, str], answer: Answer, ttl: float) -> None:
        self._cache[key] = (time.monotonic() + max(ttl, 0.0), answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
