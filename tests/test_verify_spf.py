"""SPF on receive: every RFC 7208 result through a real DNS server
(unbound on loopback), and a DNS that does not answer giving temperror."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dns_util import DnsServer, running_dns, txt
from tests.harness import longest_stall
from workers.verify.resolver import Resolver
from workers.verify.spf import check

RECORDS = {
    "pass.test": [("TXT", txt("v=spf1 ip4:127.0.0.1 -all"))],
    "fail.test": [("TXT", txt("v=spf1 ip4:192.0.2.1 -all"))],
    "soft.test": [("TXT", txt("v=spf1 ~all"))],
    "neutral.test": [("TXT", txt("v=spf1 ?all"))],
    "perm.test": [("TXT", txt("v=spf1 foo:bar -all"))],
    "include.test": [("TXT", txt("v=spf1 include:fail.test include:pass.test -all"))],
    "mx.test": [("TXT", txt("v=spf1 mx -all")), ("MX", "10 mail.mx.test.")],
    "mail.mx.test": [("A", "127.0.0.1")],
    "loop.test": [
        ("TXT", txt("v=spf1 " + " ".join(f"a:h{n}.loop.test" for n in range(11)) + " -all"))
    ],
    "helo.test": [("TXT", txt("v=spf1 a -all")), ("A", "127.0.0.1")],
}
# Within RFC 7208's limits and still many questions: 5 mx terms of 10 exchanges each,
# the client's address the very last one asked for (56 questions, each one more run).
for term in range(5):
    RECORDS[f"m{term}.many.test"] = [("MX", f"10 h{term}-{n}.many.test.") for n in range(10)]
    for n in range(10):
        last = term == 4 and n == 9
        RECORDS[f"h{term}-{n}.many.test"] = [("A", "127.0.0.1" if last else "192.0.2.9")]
RECORDS["many.test"] = [
    ("TXT", txt("v=spf1 " + " ".join(f"mx:m{term}.many.test" for term in range(5)) + " -all"))
]
# Legal and absurd: 9 includes of 1 000 ip4 terms each (15 KB records, over TCP).  pyspf
# reads every record again at each run, and each run took tens of milliseconds.
BIG_INCLUDES, BIG_TERMS = 9, 1000
for include in range(BIG_INCLUDES):
    terms = " ".join(f"ip4:10.{include}.{n // 250}.{n % 250}" for n in range(BIG_TERMS))
    RECORDS[f"b{include}.big.test"] = [("TXT", txt(f"v=spf1 {terms} ?all"))]
RECORDS["big.test"] = [
    ("TXT", txt("v=spf1 " + " ".join(f"include:b{n}.big.test" for n in range(9)) + " -all"))
]
ZONES = [*RECORDS, "none.test"]


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with running_dns(tmp_path_factory.mktemp("dns"), ZONES, RECORDS) as server:
        yield server


@pytest.mark.parametrize(
    ("domain", "result"),
    [
        ("pass.test", "pass"), ("fail.test", "fail"), ("soft.test", "softfail"),
        ("neutral.test", "neutral"), ("none.test", "none"), ("perm.test", "permerror"),
        ("include.test", "pass"), ("mx.test", "pass"), ("loop.test", "permerror"),
        ("many.test", "pass"),
    ],
)  # fmt: skip
async def test_each_result(dns: DnsServer, domain: str, result: str) -> None:
    got = await check(dns.resolver(), "127.0.0.1", f"a@{domain}", "x.test",
                      deadline=time.monotonic() + 5)  # fmt: skip
    assert (got.result, got.identity, got.domain) == (result, "mailfrom", domain)


async def test_the_helo_identity_for_the_null_sender(dns: DnsServer) -> None:
    got = await check(dns.resolver(), "127.0.0.1", "", "helo.test", deadline=time.monotonic() + 5)
    assert (got.result, got.identity, got.domain) == ("pass", "helo", "helo.test")


async def test_answers_are_cached(dns: DnsServer) -> None:
    resolver = dns.resolver()
    for _ in range(3):
        await check(
            resolver, "127.0.0.1", "a@include.test", "x.test", deadline=time.monotonic() + 5
        )
    assert resolver.questions == 3  # include.test, fail.test, pass.test: once each


async def test_dns_down_is_temperror_within_the_budget(tmp_path: Path) -> None:
    resolver = Resolver(("127.0.0.1", 9), timeout=10.0)  # nothing listens on the discard port
    started = time.monotonic()
    got = await check(resolver, "127.0.0.1", "a@pass.test", "x.test", deadline=started + 0.5)
    assert got.result == "temperror"
    assert time.monotonic() - started < 2.0


async def test_records_too_large_to_evaluate_do_not_stall_other_sessions(dns: DnsServer) -> None:
    """Once their answers were cached, each MAIL FROM with a new local part ran pyspf a
    dozen times over them in one go, on the event loop: every other session of the worker
    waited (0.96 s with 2 000 terms a record, found by an adversarial review).  Runs now
    let the loop in between, and an evaluation stops at RUN_BUDGET: temperror, the
    domain's doing, not DNS's."""
    resolver = dns.resolver()
    await check(resolver, "127.0.0.1", "a@big.test", "x.test", deadline=time.monotonic() + 10)
    got, stall = await longest_stall(
        check(resolver, "127.0.0.1", "fresh@big.test", "x.test", deadline=time.monotonic() + 10)
    )
    assert (got.result, got.explanation, got.unanswered) == (
        "temperror", "records too large to evaluate", False
    )  # fmt: skip
    assert stall < 0.2, f"the loop stalled {stall:.2f} s"
