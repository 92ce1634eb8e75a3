"""SPF (RFC 7208) without blocking: pyspf evaluates, this module asks DNS.

Each evaluation runs pyspf over a table of answers; a question it lacks stops it
(:class:`.pyspf_fence.NeedLookup`), the question is asked (cached and coalesced by the
:class:`.resolver.Resolver`), and the evaluation runs again, until it ends or the deadline
passes (then ``temperror``).  Runs are cheap (about 0.1 ms each) next to DNS round trips;
an evaluation whose runs take more than :data:`RUN_BUDGET` in all is ``temperror``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from workers.verify import pyspf_fence
from workers.verify.dkim import brief
from workers.verify.resolver import TEMPORARY, Resolver

# RFC 7208's limits let an honest record ask 10 DNS terms, each MX with 10 names to look up:
# 10 * (1 + 10) questions, each one more run.  More is a loop of ours.
MAX_RUNS = 120
# Seconds of pyspf's runs one evaluation may take, all runs together.  Each run reads every
# record again: records of thousands of terms (29 KB, legal) took 65 ms a run and 0.7 s an
# evaluation, on the event loop, at every MAIL FROM with a new local part: every other
# session stalled.  Real records take about 0.1 ms a run.
RUN_BUDGET = 0.05


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One identity's verdict: ``result`` is pass, fail, softfail, neutral, none,
    permerror or temperror."""

    result: str
    identity: str  # "mailfrom" or "helo"
    domain: str
    explanation: str = field(default="", compare=False)  # not part of the verdict
    unanswered: bool = False  # a temperror of DNS's (see dkim.DkimResult.unanswered)


async def check(
    resolver: Resolver, ip: str, sender: str, helo: str, *, deadline: float
) -> SpfResult:
    """The SPF verdict for ``sender`` (MAIL FROM; empty: the HELO identity) from ``ip``.
    ``deadline``: ``time.monotonic()`` by which to give up (temperror)."""
    identity = "mailfrom" if sender else "helo"
    local, _, domain = sender.rpartition("@")
    # pyspf splits at the first "@", RFC 5321 at the last (a quoted local part may hold
    # one): the local part without it, so pyspf checks the domain reported here (a record's
    # %{l} macro then sees that local part without its "@").
    if "@" in local:
        sender = f"{local.replace('@', '')}@{domain}"
    domain = domain if sender else helo
    table: pyspf_fence.Table = {}
    running = 0.0  # seconds spent in pyspf
    for _ in range(MAX_RUNS):
        if running > RUN_BUDGET:  # the domain's records, not its DNS: never "unanswered"
            return SpfResult("temperror", identity, domain, "records too large to evaluate")
        started = time.perf_counter()
        try:
            result, explanation = pyspf_fence.evaluate(table, ip, sender, helo)
        except pyspf_fence.NeedLookup as need:
            running += time.perf_counter() - started
            kept = resolver.cached(*need.key)
            if kept is not None:
                table[need.key] = kept
                await asyncio.sleep(0)  # other sessions run between runs
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return SpfResult("temperror", identity, domain, "time budget spent", True)
            try:
                table[need.key] = await asyncio.wait_for(resolver.ask(*need.key), left)
            except TimeoutError:
                table[need.key] = TEMPORARY
            if need.key[1] == "MX":  # pyspf asks each exchange's address next, one by one
                for record in table[need.key].records:
                    exchange = record.partition(" ")[2]
                    resolver.prefetch(exchange, "AAAA" if ":" in ip else "A")
            continue
        except Exception as exc:  # pyspf failing on some input: ours, not the sender's
            return SpfResult("temperror", identity, domain, brief(f"{type(exc).__name__}: {exc}"))
        # pyspf's temperror is a DNS question that got no answer (pyspf_fence).
        return SpfResult(result, identity, domain, brief(explanation), result == "temperror")
    return SpfResult("permerror", identity, domain, "too many DNS questions")
