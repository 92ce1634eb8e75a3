"""The delivery benchmarks run: each side of bench/delivery.py (raw ``sendmail``, the relay's
own transaction, the worker) and every variant of bench/relay_fence.py and
bench/redis_fence.py send a few messages into smtp-sink, so a change of the relay's or the
outcomes' API breaks the test suite, not the next benchmark run."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    from its own queue (`make bench` runs them)."""
    from bench.report import delivery_rows

    out = run_bench("delivery.py", "-n", "50", "--rounds", "1", "--postfix")
    assert "ratio worker/raw:" in out and "ratio worker/rawtx:" in out, out
    for side in ("worker", "worker-fsync"):
        assert f"ratio {side}/postfix:" in out, out
    assert [row.what for row in delivery_rows(out)] == [
        "delivery worker/raw",
        "delivery worker/rawtx",
        "delivery worker/postfix",
        "delivery worker-fsync/postfix",
    ], out


@pytest.mark.timeout(150)
def test_every_variant_of_the_relay_fence_benchmark_runs() -> None:
    out = run_bench("relay_fence.py", "-n", "50", "--rounds", "1")
    for variant in ("copy", "data", "commands"):
        assert f"median {variant}/current:" in out, out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("variant", ["pipeline", "packer"])
def test_every_variant_of_the_redis_fence_benchmark_runs(variant: str) -> None:
    out = run_bench("redis_fence.py", "-n", "50", "--rounds", "1", "--variant", variant)
    assert f"median {variant}/current:" in out, out


def test_the_held_state_benchmark_runs() -> None:
    out = run_bench("held_state.py", "-n", "200", "--repeats", "1")
    assert out.startswith("state bookkeeping: ") and "us per entry" in out, out
