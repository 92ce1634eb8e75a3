"""The Redis-cost benchmarks run: bench/cluster.py (Redis CPU per message on the shared
cluster with its partitions against a standalone redis-server) and bench/capacity.py
(Redis CPU and memory per message, 2 KB and 100 KB) and bench/redis_floor.py (Redis CPU
per message against the raw commands' floor) each send a few messages through the
real ingest and delivery workers, so a change of the workers' options or of the Redis
layout breaks the test suite, not the next benchmark run."""

from __future__ import annotations

import re

import pytest

from tests.cluster_util import PARTITIONS, ClusterSet
from tests.test_bench_delivery import run_bench


@pytest.mark.timeout(150)
def test_the_cluster_benchmark_compares_redis_cpu_per_message_with_standalone(
    cluster: ClusterSet,
) -> None:
    out = run_bench(
        "cluster.py", "--cluster-url", cluster.url(), "--partitions", str(PARTITIONS),
        "--rounds", "1", "--ingest-messages", "40", "--delivery-messages", "40",
        "--warmup", "10", "--idle-seconds", "0.1", "--no-replica",
    )  # fmt: skip
    for role in ("ingest", "delivery"):
        ratio = re.search(rf"RATIO cluster/standalone {role}: ([\d.]+)", out)
        assert ratio and float(ratio.group(1)) > 0, out
    assert f"cluster 3x{PARTITIONS}p" in out and "socket reads" in out, out


@pytest.mark.timeout(150)
def test_the_capacity_benchmark_prints_redis_cost_and_memory_per_message() -> None:
    out = run_bench("capacity.py", "--rounds", "1", "--messages", "60", "--no-aof")
    for size in (2048, 102400):
        line = re.search(rf"CAPACITY {size} B: ingest ([\d.]+) us.* (\d+) B per receive", out)
        # The bytes retained per entry of 60 messages carry tens of KB of allocator and
        # client-buffer noise under load (1621 B for 2 KB once in CI): half is the floor.
        assert line and float(line.group(1)) > 0 and int(line.group(2)) > size // 2, out


@pytest.mark.timeout(150)
def test_the_floor_benchmark_prints_redis_cost_against_raw_commands() -> None:
    """bench/redis_floor.py runs both sides of both roles, and the worker's settlement
    commands from a bare client beside the raw consumer, and `make bench` can read it."""
    from bench.report import floor_rows

    out = run_bench("redis_floor.py", "--rounds", "1", "--messages", "60")
    for role in ("delivery", "ingest"):
        line = re.search(rf"FLOOR {role}: ours ([\d.]+) us/msg, raw ([\d.]+) us/msg", out)
        assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, out
    commands = re.search(r"COMMANDS delivery: .* ([\d.]+) us/msg, ratio ([\d.]+) to raw", out)
    assert commands and float(commands.group(1)) > 0, out
    assert [row.what for row in floor_rows(out)] == [
        "Redis CPU/msg delivery ours/raw",
        "Redis CPU/msg ingest ours/raw",
        "Redis CPU/msg delivery commands/raw",
    ], out
