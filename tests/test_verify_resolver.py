"""The resolver verification asks: one question on the wire for many askers, answers kept
for their TTL, and an asker that gives up (its session gone) never takes the answer away
from the others."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tests.dns_util import running_dns, txt
from workers.verify.resolver import TEMPORARY, Resolver


async def test_one_question_for_many_askers_and_kept_after(tmp_path: Path) -> None:
    records = {"example.com": [("TXT", txt("v=spf1 -all"))]}
    with running_dns(tmp_path, ["example.com"], records) as dns:
        resolver = dns.resolver()
        answers = await asyncio.gather(*(resolver.ask("example.com", "TXT") for _ in range(20)))
        assert {answer.records for answer in answers} == {("v=spf1 -all",)}
        assert resolver.questions == 1
        assert resolver.cached("EXAMPLE.com.", "TXT") == answers[0]
        missing = await resolver.ask("nothing.example.com", "TXT")
        assert (missing.records, missing.temporary) == ((), False)
        assert resolver.questions == 2


async def test_an_asker_cancelled_leaves_the_others_their_answer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = Resolver(("127.0.0.1", silent.getsockname()[1]), timeout=0.5)
        first = asyncio.ensure_future(resolver.ask("example.com", "TXT"))
        second = asyncio.ensure_future(resolver.ask("example.com", "TXT"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert await asyncio.wait_for(second, 5) is TEMPORARY
        assert first.cancelled()
        assert resolver.questions == 1


async def test_a_name_no_dns_could_hold_has_no_record_rather_than_a_failure() -> None:
    """A sender's label over 63 octets (a d= or a MAIL FROM domain) is its own error: no
    record (permerror, none), never temperror, which DMARC would read as "maybe passed"."""
    resolver = Resolver(("127.0.0.1", 9), timeout=2.0)
    for name in ("x" * 64 + ".example.com", "a..example.com", ("y" * 60 + ".") * 5 + "com"):
        answer = await resolver.ask(name, "TXT")
        assert (answer.records, answer.temporary) == ((), False), name
