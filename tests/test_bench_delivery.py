"""The delivery benchmarks run: each side of bench/delivery.py (raw ``sendmail``, the relay's
own transaction, the worker, the worker with its messages built before the clock, the worker
signing with DKIM, its Postfix anchor) and every
variant of bench/relay_fence.py and bench/redis_fence.py send a few messages into
smtp-sink, so a change of the relay's or the outcomes' API breaks the test suite, not the
next benchmark run; and bench/ingest.py's Haraka anchor takes mail."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.harness import ROOT, child_env


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(150)
def test_every_side_of_the_delivery_benchmark_runs() -> None:
    """With its anchors: the worker on an fsyncing Redis, and a private Postfix delivering
    from its own queue, and the worker signing with DKIM (`make bench` runs them)."""
    from bench.report import delivery_rows

    out = run_bench("delivery.py", "-n", "50", "--rounds", "1", "--postfix", "--dkim")
    assert "ratio worker/raw:" in out and "ratio worker/rawtx:" in out, out
    for side in ("worker", "worker-fsync"):
        assert f"ratio {side}/postfix:" in out, out
    assert [row.what for row in delivery_rows(out)] == [
        "delivery worker/raw",
        "delivery worker/rawtx",
        "delivery worker-prebuilt/raw",
        "delivery worker-ed25519/raw",
        "delivery worker-rsa/raw",
        "delivery worker/postfix",
        "delivery worker-fsync/postfix",
    ], out


@pytest.mark.timeout(150)
def test_every_variant_of_the_relay_fence_benchmark_runs() -> None:
    out = run_bench("relay_fence.py", "-n", "50", "--rounds", "1")
    for variant in ("copy", "data", "commands"):
        assert f"median {variant}/current" in out, out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("variant", ["pipeline", "packer", "per-reply"])
def test_every_variant_of_the_redis_fence_benchmark_runs(variant: str) -> None:
    out = run_bench("redis_fence.py", "-n", "50", "--rounds", "1", "--variant", variant)
    assert f"median {variant}/current" in out, out


def test_the_held_state_benchmark_runs() -> None:
    out = run_bench("held_state.py", "-n", "200", "--repeats", "1")
    assert out.startswith("state bookkeeping: ") and "us per entry" in out, out


@pytest.mark.timeout(120)
def test_the_haraka_anchor_of_the_ingest_benchmark_takes_mail(tmp_path: Path) -> None:
    """bench/ingest.py --haraka: Haraka from bench/haraka (npm, locked) with its discarding
    plugin takes smtp-source's messages, and bench/report.py reads its table."""
    from bench.ingest import Case, smtp_source, start_haraka
    from bench.report import ingest_rows

    haraka = start_haraka(tmp_path)
    try:
        result = smtp_source(haraka, Case(2048, 2, True, 20))
    finally:
        haraka.stop()
    assert result.rate > 0 and result.per_cpu > 0
    table = (
        "ingest / haraka (both at their default log level, info), median of 1 rounds:\n"
        " 2 KB  10 sessions  reuse      2500   3071   1.21     2400   3226   1.34\n"
        "ingest / haraka (both logging warnings only), median of 1 rounds:\n"
        " 2 KB  10 sessions  reuse      4516   3071   0.69     4286   3226   0.75\n"
    )
    assert [(row.what, row.value) for row in ingest_rows(table)] == [
        ("ingest/haraka 2 KB 10 sessions reuse", "1.21x"),
        ("ingest/haraka 2 KB 10 sessions reuse quiet", "0.69x"),
    ]


@pytest.mark.timeout(120)
def test_the_verifying_side_of_the_ingest_benchmark_verifies(
    tmp_path: Path, redis_url: str
) -> None:
    """bench/ingest.py --verify: its ingest finds SPF and DMARC pass for smtp-source's mail
    through unbound (the figures count only then), and bench/report.py reads its table."""
    from bench.ingest import (
        SENDER_RECORDS,
        SENDER_ZONES,
        Case,
        check_verified,
        free_port,
        smtp_source,
        start_ingest,
    )  # fmt: skip
    from bench.report import ingest_rows
    from tests.dns_util import running_dns

    with running_dns(tmp_path / "dns", SENDER_ZONES, SENDER_RECORDS) as dns:
        verifying = start_ingest(
            redis_url, tmp_path / "verify.log", free_port(), dns_server=dns.address
        )
        try:
            smtp_source(verifying, Case(2048, 2, True, 20))
        finally:
            verifying.stop()
    check_verified(tmp_path / "verify.log")
    (tmp_path / "verify.log").write_text('{"event": "message_accepted", "spf": "none"}\n')
    with pytest.raises(RuntimeError, match="did not pass for 1 messages"):
        check_verified(tmp_path / "verify.log")
    table = (
        "verifying / not, median of 3 alternating rounds:\n"
        " 2 KB  10 sessions  reuse            0.894           0.879   0.85 0.91 0.88\n"
        "  median p99: ingest --verify 5.20 ms, bare 1.29 ms (client-side)\n"
    )
    assert [(row.what, row.value) for row in ingest_rows(table)] == [
        ("ingest verify/off 2 KB 10 sessions reuse", "0.894x"),
        (
            "ingest --verify end-of-DATA->250 p99",
            "ingest --verify 5.20 ms, bare 1.29 ms (client-side)",
        ),
    ]


def test_the_prebuilt_side_hands_the_worker_the_messages_it_would_build() -> None:
    """bench/delivery.py's worker-prebuilt side: while it runs, the worker's build returns
    the message built before the clock for that entry (the same octets but for the Date the
    clock writes), a miss stops the benchmark, and afterwards the worker builds again."""
    from bench.delivery import built_before_the_clock, make_messages
    from workers.codec.build import build_message
    from workers.config import DeliveryConfig
    from workers.delivery import attempt

    messages = make_messages(3, "prebuilt")
    ids = ["1-0", "1-1", "1-2"]
    config = DeliveryConfig(hostname="bench.invalid")
    with built_before_the_clock(messages, ids, config):
        handed = [
            attempt.build_message(m, default_id=i, hostname=config.hostname)
            for m, i in zip(messages, ids, strict=True)
        ]
        assert handed[1] is attempt.build_message(messages[1], default_id="1-1")
        with pytest.raises(SystemExit, match="1-9 was not built"):
            attempt.build_message(messages[0], default_id="1-9")
    assert attempt.build_message is build_message
    for message, entry_id, got in zip(messages, ids, handed, strict=True):
        own = build_message(message, default_id=entry_id, hostname=config.hostname, now=0)
        assert _undated(got.data) == _undated(own.data)
        assert (got.mail_from, got.recipients, got.message_id) == (
            own.mail_from,
            own.recipients,
            own.message_id,
        )


def _undated(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if not line.startswith(b"Date:")]


def test_a_negative_building_share_is_still_reported() -> None:
    """A short run's noise can make the prebuilt side the slower one (the CI's 50 messages
    measured -3%): the report keeps the row and its sign rather than dropping it."""
    from bench.report import delivery_rows

    out = (
        "ratio worker/raw: 0.76 (msg/s)  0.88 (msg per CPU-s)\n"
        "ratio worker-prebuilt/raw: 0.79 (msg/s)  0.86 (msg per CPU-s); "
        "building's share of the worker's CPU time: -3%\n"
    )
    [prebuilt] = [row for row in delivery_rows(out) if row.what == "delivery worker-prebuilt/raw"]
    assert prebuilt.value == "0.79x" and "building is -3% of" in prebuilt.note


async def test_watching_for_the_drain_looks_seldom(
    redis: aioredis.Redis,
) -> None:
    """bench/delivery.py's wait for a worker round's end: a stand-in worker settles 200
    entries over about 0.8 s; the watcher sees the end within 0.2 s of it, looks at most 30
    times (every 10 ms, as it did, was 80 looks, each ~170 us of this process's CPU counted
    against the worker side)."""
    from bench.delivery import until_drained

    total = 200
    await redis.xgroup_create("send", "g", id="0", mkstream=True)
    for n in range(total):
        await redis.xadd("send", {"n": n})
    finished: list[float] = []

    async def stand_in() -> None:
        for n in range(20):
            read = await redis.xreadgroup("g", "c", {"send": ">"}, count=total // 20)
            ids = [entry_id for _, entries in read for entry_id, _ in entries]
            await asyncio.sleep(0.04)
            if n == 19:
                # Before the last XACK: the watcher may see it done (and stop this task)
                # before this task runs again (a fresh-clone run once had nothing here).
                finished.append(time.monotonic())
            await redis.xack("send", "g", *ids)
        await asyncio.sleep(60)  # a worker runs until it is stopped

    worker = asyncio.create_task(stand_in())
    try:
        looks = await asyncio.wait_for(until_drained(redis, "send", "g", total, worker), 10)
        seen = time.monotonic()
    finally:
        worker.cancel()
    assert finished and seen - finished[0] < 0.2
    assert 1 < looks <= 30, looks
