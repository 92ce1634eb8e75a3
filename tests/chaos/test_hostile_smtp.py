"""Hostile input at the SMTP port: smuggling variants, MIME bombs, header floods, over-long
lines and oversize messages, round after round over concurrent sessions.  Each is rejected
(5xx) or stored once with its defects, nothing smuggled becomes a message of its own, the
worker keeps running and its memory (RSS) stays bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from tests.chaos.ledger import HEADER, Ledger, subject_with
from tests.chaos.scenario import (
    FULL,
    receive_ledger_id,
    rss_kib,
    size,
    stored_entries,
    stored_ledger_ids,
)
from tests.harness import RedisServer
from tests.ingest_util import IngestProcess, SMTPConn

ROUNDS = size(8, 200)  # after one warm-up round
SESSIONS = 4
ROUND_TIMEOUT = 60.0  # seconds for one round of all cases
MAX_SIZE = 4_000_000
RSS_GROWTH_MIB = 40  # allowed growth after warm-up (allocator noise, not a leak)
RSS_PEAK_MIB = 400

SMUGGLE_ENDS = [
    b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r", b"\n.\r",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
]  # fmt: skip


@dataclass(frozen=True)
class Hostile:
    name: str
    body: Callable[[str], bytes]  # ledger id -> message after our own head lines
    stored_with_defects: bool = False  # when stored, the parser must say what was wrong


def head(ledger_id: str, *extra: bytes) -> bytes:
    return (
        f"{HEADER}: {ledger_id}\r\nFrom: chaos@example.org\r\nTo: sink@example.com\r\n".encode()
        + b"".join(extra)
    )


def smuggle(end: bytes) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        inner = subject_with(f"S{ledger_id}", "smuggled").encode()
        return (
            head(ledger_id, b"Subject: outer\r\n\r\nhello")
            + end
            + (
                b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                b"From: ceo@victim.example\r\nSubject: " + inner + b"\r\n\r\npay now"
            )
        )

    return build


def deep_multipart(levels: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        opening = b"".join(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n)
            for n in range(levels)
        )
        closing = b"".join(b"\r\n--b%d--" % n for n in reversed(range(levels)))
        return head(ledger_id, b"MIME-Version: 1.0\r\n") + opening + b"\r\ncore" + closing

    return build


def many_parts(count: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        parts = b"".join(b"--p\r\n\r\n%d\r\n" % n for n in range(count))
        return head(
            ledger_id, b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n'
        ) + parts + b"--p--"  # fmt: skip

    return build


def nested_rfc822(levels: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        layer = b"Content-Type: message/rfc822\r\n\r\n"
        return head(ledger_id, b"MIME-Version: 1.0\r\n") + layer * levels + b"\r\ninnermost"

    return build


def broken_base64(octets: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        line = b"!!not*base64~~" * 5 + b"\r\n"
        return (
            head(ledger_id, b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n")
            + b"Content-Transfer-Encoding: base64\r\n\r\n"
            + line * (octets // len(line))
        )

    return build


def header_flood(count: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        return head(ledger_id, *(b"X-Flood-%d: v\r\n" % n for n in range(count)), b"\r\nbody")

    return build


def folded_flood(count: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        return head(ledger_id, b"Subject: start\r\n", b" continued\r\n" * count, b"\r\nbody")

    return build


def encoded_word_flood(count: int) -> Callable[[str], bytes]:
    def build(ledger_id: str) -> bytes:
        good, bad = b" =?utf-8?b?w6TDtsO8?=\r\n", b" =?x?q?=FF?=\r\n"
        words = b"".join(good if n % 2 else bad for n in range(count))
        return head(ledger_id, b"Subject:", words[1:], b"\r\nbody")

    return build


def garbage_headers(ledger_id: str) -> bytes:
    junk = b"X-Nul: a\x00b\r\nX-8bit: \xff\xfe\xc3\x28\r\nno colon here\r\n: empty name\r\n"
    return head(ledger_id, junk, b"Content-Type: multipart/mixed\r\n\r\n--x\r\nnever closed")


def long_line(ledger_id: str) -> bytes:
    return head(ledger_id, b"Subject: long\r\n\r\n", b"a" * 2000)


def oversize(ledger_id: str) -> bytes:
    line = b"b" * 998 + b"\r\n"
    return head(ledger_id, b"Subject: big\r\n\r\n", line * (MAX_SIZE // len(line) + 100))


HOSTILE = [
    *(Hostile(f"smuggle-{repr(end)[2:-1]}", smuggle(end)) for end in SMUGGLE_ENDS),
    Hostile("multipart-2000-deep", deep_multipart(2000), stored_with_defects=True),
    Hostile("multipart-20000-parts", many_parts(20_000), stored_with_defects=True),
    Hostile("rfc822-500-deep", nested_rfc822(500)),
    Hostile("base64-garbage-1MB", broken_base64(1_000_000), stored_with_defects=True),
    Hostile("headers-20000", header_flood(20_000), stored_with_defects=True),
    Hostile("folded-20000-lines", folded_flood(20_000)),
    Hostile("encoded-words-5000", encoded_word_flood(5000), stored_with_defects=True),
    Hostile("garbage-headers", garbage_headers, stored_with_defects=True),
    Hostile("line-2000-octets", long_line),
    Hostile("over-max-size", oversize),
]


async def offer(port: int, payload: bytes) -> int:
    """One raw transaction (no dot-stuffing needed: no payload line starts with a dot);
    returns the final reply, after checking that nothing else was answered after it."""
    conn = await SMTPConn.open(port)
    try:
        await conn.ehlo()
        assert (await conn.cmd("MAIL FROM:<chaos@example.org>"))[0] == 250
        assert (await conn.cmd("RCPT TO:<sink@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        await conn.send(payload + b"\r\n.\r\n")
        code, text = await conn.reply(timeout=60)
        if code < 500 or code == 552:  # the session goes on: one reply per DATA, no more
            follow, follow_text = await conn.cmd("NOOP")
            assert follow == 250 and "queued" not in follow_text, (text, follow_text)
        return code
    finally:
        await conn.close()


class RssSampler:
    """Peak RSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cases(round_number: int) -> Iterator[tuple[str, Hostile]]:
    for case in HOSTILE:
        yield f"r{round_number}-{case.name}", case


async def run_round(
    port: int, round_number: int, ledger: Ledger, codes: dict[str, set[int]]
) -> None:
    queue = list(cases(round_number))

    async def session(share: list[tuple[str, Hostile]]) -> None:
        for ledger_id, case in share:
            ledger.send(ledger_id)
            code = await offer(port, case.body(ledger_id))
            codes.setdefault(case.name, set()).add(code)
            if code == 250:
                ledger.accept(ledger_id)
            else:
                ledger.reject(ledger_id, code)

    sessions = (session(queue[n::SESSIONS]) for n in range(SESSIONS))
    # a bound of our own: a hung round fails the test instead of hanging it
    await asyncio.wait_for(asyncio.gather(*sessions), timeout=ROUND_TIMEOUT)


@pytest.mark.timeout(600 if FULL else 60)
async def test_hostile_input_is_rejected_or_stored_with_defects_and_memory_stays_flat(
    make_redis: Callable[..., RedisServer], ingest_workers: Callable[..., IngestProcess]
) -> None:
    server = make_redis()
    worker = ingest_workers(server.url, "--max-size", str(MAX_SIZE))
    assert worker.process is not None
    pid = worker.process.pid
    ledger = Ledger("hostile-smtp")
    codes: dict[str, set[int]] = {}
    started = time.monotonic()
    with RssSampler(pid) as sampler:
        await run_round(worker.port, 0, ledger, codes)
        after_warmup = rss_kib(pid)
        for round_number in range(1, ROUNDS + 1):
            await run_round(worker.port, round_number, ledger, codes)
        after_rounds = rss_kib(pid)
    elapsed = time.monotonic() - started

    client = aioredis.Redis.from_url(server.url)
    try:
        entries = await stored_entries(client)
    finally:
        await client.aclose()
    defects = {receive_ledger_id(m): m.get("defects", []) for _, m in entries}
    ledger.record_all("stored", stored_ledger_ids(entries))
    ledger.report(
        ["stored"],
        rounds=ROUNDS + 1,
        cases=len(HOSTILE),
        rss_warm_mib=after_warmup / 1024,
        rss_end_mib=after_rounds / 1024,
        rss_peak_mib=sampler.peak_kib / 1024,
        seconds=elapsed,
    )
    print("hostile-smtp replies:", {name: sorted(c) for name, c in codes.items()})

    ledger.check(["stored"])  # every 250 stored once; nothing smuggled stored on its own
    assert codes.pop("line-2000-octets") == {500}
    assert codes.pop("over-max-size") == {552}
    for name, seen in codes.items():
        assert seen == {250}, f"{name}: {seen}"
    for ledger_id, case in ((i, c) for r in range(ROUNDS + 1) for i, c in cases(r)):
        if case.stored_with_defects:
            assert defects[ledger_id], f"{case.name} stored without a defect"
    assert worker.process.poll() is None
    assert (after_rounds - after_warmup) / 1024 < RSS_GROWTH_MIB
    assert sampler.peak_kib / 1024 < RSS_PEAK_MIB


def over_wire_limit(ledger_id: str) -> bytes:
    """Under the default --max-size (25 MiB) but, parsed, over the readers' 50 MiB entry
    limit: 10 000 long header fields (kept twice: ``headers`` and ``header_list``) and a
    broken base64 body (a defect, so the raw bytes are kept too)."""
    fields = b"".join(b"X-Big-%d: " % n + b"v" * 980 + b"\r\n" for n in range(9990))
    body = (b"QUFB" * 19 + b"!\r\n") * 190_000
    return (
        head(ledger_id, b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n")
        + b"Content-Transfer-Encoding: base64\r\n"
        + fields
        + b"\r\n"
        + body
    )


@pytest.mark.timeout(120)
async def test_a_250_entry_is_always_readable_by_consumers(
    make_redis: Callable[..., RedisServer], ingest_workers: Callable[..., IngestProcess]
) -> None:
    """250 means stored *usefully*: an entry no consumer can unpack is a message lost for
    the application.  (Found by this suite: such entries used to be stored as is.)"""
    from workers.codec import unpack

    server = make_redis()
    worker = ingest_workers(server.url)  # default --max-size, --keep-raw defects
    code = await asyncio.wait_for(offer(worker.port, over_wire_limit("big")), timeout=60)
    assert code in {250, 552}, code
    client = aioredis.Redis.from_url(server.url)
    try:
        rows = await client.xrange("email.receive")
    finally:
        await client.aclose()
    if code == 552:
        assert rows == []
        return
    [(_, fields)] = rows
    message = unpack(fields[b"data"])  # the consumers' limits (Listener, mailpool listen)
    assert receive_ledger_id(message) == "big"
    assert "raw" not in message
    assert any("raw" in defect for defect in message.get("defects", []))
    assert worker.process is not None and worker.process.poll() is None
