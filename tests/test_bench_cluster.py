"""The Redis-cost benchmarks run: bench/cluster.py (Redis CPU per message on the shared
cluster with its partitions against a standalone redis-server) and bench/capacity.py
(Redis CPU and memory per message, 2 KB and 100 KB) and bench/redis_floor.py (Redis CPU
per message against the raw commands' floor) each send a few messages through the
real ingest and delivery workers, so a change of the workers' options or of the Redis
layout breaks the test suite, not the next benchmark run."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable

import pytest
import redis

from tests.cluster_util import PARTITIONS, ClusterSet
from tests.harness import RedisServer
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
        # An entry takes more than its message (MEMORY USAGE of the stream, not used_memory).
        assert line and float(line.group(1)) > 0 and int(line.group(2)) > size, out


@pytest.mark.timeout(150)
def test_the_floor_benchmark_prints_redis_cost_against_raw_commands() -> None:
    """bench/redis_floor.py runs both sides of both roles, the worker's settlement
    commands from a bare client beside the raw consumer and the raw XADDs at ingest's pace,
    and `make bench` can read it."""
    from bench.report import floor_rows

    out = run_bench("redis_floor.py", "--rounds", "1", "--messages", "60")
    for role in ("delivery", "ingest"):
        line = re.search(rf"FLOOR {role}: ours ([\d.]+) us/msg, raw ([\d.]+) us/msg", out)
        assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, out
    commands = re.search(r"COMMANDS delivery: .* ([\d.]+) us/msg, ratio ([\d.]+) to raw", out)
    assert commands and float(commands.group(1)) > 0, out
    paced = re.search(r"PACED ingest: .* at ours' pace \((\d+) msg/s\) ([\d.]+) us/msg", out)
    assert paced and int(paced.group(1)) > 0 and float(paced.group(2)) > 0, out
    assert [row.what for row in floor_rows(out)] == [
        "Redis CPU/msg delivery ours/raw",
        "Redis CPU/msg ingest ours/raw",
        "Redis CPU/msg delivery commands/raw",
        "Redis CPU/msg ingest ours/raw at ours' pace",
    ], out


def test_redis_memory_per_message_counts_the_data_not_the_clients_buffers(
    make_redis: Callable[..., RedisServer],
) -> None:
    """The capacity figure "B per receive entry" once read 326 B for 2 KB messages: a
    client's buffer that came and went was counted as the messages' memory."""
    from bench.redis_cost import Deployment

    redis_server = make_redis()
    deployment = Deployment("test", redis_server.url, 1, [redis_server.port])
    empty = deployment.data_memory()
    with socket.create_connection(("127.0.0.1", redis_server.port)) as client:
        # A SET whose value is still arriving: 512 KB waits in the client's query buffer.
        client.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n" + b"x" * (512 << 10))
        time.sleep(0.3)
        assert deployment.data_memory() == empty
    with redis.Redis(port=redis_server.port) as writer:
        for _ in range(10):
            writer.xadd("mailpool:test:memory", {"data": b"x" * 2048})
    assert 10 * 2048 < deployment.data_memory() - empty < 10 * 4096
