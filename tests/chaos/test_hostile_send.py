"""Hostile input on ``email.send``: entries a careless or malicious producer can XADD.

Truncated msgpack, deep nesting, huge declared lengths, wrong types, ext types, invalid
UTF-8, missing ``data``, mangled retry fields and header injection (CR/LF/NUL in header
names and values, envelope addresses, encoded-words) go in between valid sends.

Guarantee: each hostile entry becomes a dead letter ``invalid`` with an error saying why
(its ``data`` kept as it was) and is never sent; every valid send is delivered once; the one
worker process handles all of it without dying or restarting, and its resident memory stays
bounded while thousands of hostile entries go through.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis

from tests.chaos.delivery_chaos_util import Fleet, dead_letters, enqueue_many, observe
from tests.chaos.ledger import Ledger
from tests.chaos.scenario import rss_kib, size
from tests.delivery_util import pack, send_message, settled
from tests.harness import wait_until
from tests.sinks import RecordingSink

RSS_GROWTH_LIMIT_KIB = 20 * 1024


def _valid() -> dict[str, Any]:
    return send_message(["victim@example.com"], subject="x")


def _with(**changes: Any) -> bytes:
    return pack({**_valid(), **changes})


def _headers(**changes: str) -> bytes:
    message = _valid()
    message["headers"] = {**message["headers"], **changes}
    return pack(message)


def _nested_map(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"x": value}
    return value


CRLF_WORD = "=?utf-8?b?" + base64.b64encode(b"x\r\nBcc: victim@example.com").decode() + "?="

# name -> the fields of one XADD (``data`` unless told otherwise)
HOSTILE: dict[str, dict[str, bytes]] = {
    "empty": {"data": b""},
    "not-msgpack": {"data": b"hello, this is not msgpack"},
    "truncated-half": {"data": pack(_valid())[: len(pack(_valid())) // 2]},
    "truncated-1": {"data": pack(_valid())[:1]},
    "deep-arrays": {"data": b"\x91" * 100_000 + b"\xc0"},
    "deep-maps": {"data": b"\x81\xa1x" * 50_000 + b"\xc0"},
    "deep-in-schema": {"data": _with(headers=_nested_map(200))},
    "huge-str32": {"data": b"\x81\xa4from\xdb\xff\xff\xff\xffabc"},
    "huge-bin32": {"data": b"\x81\xa4body\xc6\xff\xff\xff\xffabc"},
    "huge-array32": {"data": b"\x81\xa2to\xdd\xff\xff\xff\xff\xc0"},
    "huge-map32": {"data": b"\xdf\xff\xff\xff\xff\xc0\xc0"},
    "top-array": {"data": msgpack.packb([1, 2, 3])},
    "int-key": {"data": msgpack.packb({1: "x"})},
    "ext-type": {"data": msgpack.packb({"from": msgpack.ExtType(5, b"xyz")})},
    "bad-utf8": {"data": b"\x81\xa4from\xa2\xff\xfe"},
    "trailing": {"data": pack(_valid()) + b"\xc0"},
    "to-int": {"data": _with(to=5)},
    "to-empty": {"data": _with(to=[])},
    "to-mixed": {"data": _with(to=["a@example.com", 7])},
    "from-int": {"data": _with(**{"from": 12})},
    "headers-list": {"data": _with(headers=["subject", "x"])},
    "body-int": {"data": _with(content={"content-type": "text/plain", "body": 5})},
    "content-missing": {
        "data": msgpack.packb({"from": None, "to": ["a@example.com"], "headers": {}})
    },
    "max-attempts-str": {"data": _with(max_attempts="many")},
    "inject-subject": {"data": _headers(subject="hi\r\nBcc: victim@example.com")},
    "inject-lf": {"data": _headers(subject="hi\nBcc: victim@example.com")},
    "inject-nul": {"data": _headers(subject="hi\x00there")},
    "inject-name": {"data": _headers(**{"x-a\r\nbcc": "victim@example.com"})},
    "inject-encoded-word": {"data": _headers(subject=CRLF_WORD)},
    "inject-rcpt": {"data": _with(to=["a@example.com>\r\nRCPT TO:<victim@example.com"])},
    "inject-from": {"data": _with(**{"from": "a@example.com>\r\nRCPT TO:<victim@example.com"})},
    "inject-content-type": {
        "data": _with(
            content={"content-type": "text/plain\r\nBcc: victim@example.com", "body": b"x"}
        )
    },
    "no-data-field": {"payload": pack(_valid())},
    "mangled-attempts": {"data": pack(_valid()), "attempts": b"lots"},
    "mangled-recipients": {"data": pack(_valid()), "recipients": b"[not json"},
}


async def _hostile_round(redis: aioredis.Redis, ledger: Ledger, names: dict[str, str]) -> None:
    pipe = redis.pipeline(transaction=False)
    for fields in HOSTILE.values():
        pipe.xadd("email.send", fields)
    for name, entry in zip(HOSTILE, await pipe.execute(), strict=True):
        entry_id = entry.decode()
        ledger.accept(entry_id, entry_id)
        names[entry_id] = name


@pytest.mark.timeout(300)
async def test_hostile_entries_are_dead_lettered_and_the_worker_stays_up(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    rounds = size(60, 600)  # x 35 hostile entries: 2 100 short, 21 000 full
    ledger = Ledger("hostile-send")
    names: dict[str, str] = {}
    fleet = Fleet(redis_url, sink.url, ("--concurrency", "4"), tmp_path / "w.log")
    started = time.monotonic()
    name = fleet.start()
    pid = fleet.workers[name].pid
    try:
        # warm-up: one round of everything, so imports and pools are in the baseline RSS
        await _hostile_round(redis, ledger, names)
        valid = await enqueue_many(redis, ["ok0"])
        await wait_until(lambda: settled(redis), timeout=20)
        rss_before = rss_kib(pid)
        for n in range(1, rounds):
            await _hostile_round(redis, ledger, names)
            valid.update(await enqueue_many(redis, [f"ok{n}"]))
            if n % 20 == 0:  # keep the backlog short, so RSS measures leaks, not queueing
                await wait_until(lambda: settled(redis), timeout=30)
        await wait_until(lambda: settled(redis), timeout=60)
        rss_after = rss_kib(pid)
        assert fleet.workers[name].poll() is None, "the worker died"
    finally:
        fleet.close()
    for message_id, entry in valid.items():
        ledger.accept(message_id, entry)
    letters = await dead_letters(redis)
    await observe(ledger, redis, sink)
    # dead letters of entries without a message id are keyed by their entry id
    ledger.outcomes["dead"] = [row["source_id"] for row in letters]
    growth = rss_after - rss_before
    ledger.report(
        hostile=len(names),
        rss_before_kib=rss_before,
        rss_growth_kib=growth,
        seconds=round(time.monotonic() - started, 1),
    )
    ledger.check(max_duplicates=0)
    assert set(ledger.settled(["delivered"])) == set(valid)
    assert {row["source_id"] for row in letters} == set(names)
    unexplained = [
        (names[r["source_id"]], r)
        for r in letters
        if r["reason"] != "invalid" or not r.get("error")
    ]
    assert not unexplained
    assert all(b"victim" not in r.data for r in sink.received), "an injection was sent"
    assert all("victim" not in r.rcpt_tos for r in sink.received)
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth} KiB"


async def test_each_hostile_entry_has_its_own_reason(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    """One of each: the dead letter's ``error`` names what is wrong with that entry."""
    names: dict[str, str] = {}
    await _hostile_round(redis, Ledger("hostile-reasons"), names)
    fleet = Fleet(redis_url, sink.url, ("--concurrency", "4"), tmp_path / "w.log")
    fleet.start()
    try:
        await wait_until(lambda: settled(redis), timeout=20)
    finally:
        fleet.close()
    errors = {names[row["source_id"]]: row["error"] for row in await dead_letters(redis)}
    expected = {
        "empty": "empty",
        "not-msgpack": "top level must be a msgpack map",
        "truncated-half": "truncated",
        "deep-arrays": "nesting",
        "deep-in-schema": "nesting",
        "huge-str32": "truncated",
        "top-array": "map",
        "ext-type": "ext",
        "bad-utf8": "UTF-8",
        "to-int": "to",
        "inject-subject": "injection",
        "inject-name": "injection",
        "inject-encoded-word": "CR, LF or NUL",
        "inject-rcpt": "injection",
        "no-data-field": "empty",
    }
    print("\n".join(f"  {n}: {e}" for n, e in sorted(errors.items())))
    wrong = {n: errors.get(n) for n, word in expected.items() if word not in errors.get(n, "")}
    assert not wrong, wrong
    assert len(errors) == len(HOSTILE)
