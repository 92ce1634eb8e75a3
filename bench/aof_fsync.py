"""Embedded Redis persistence: ingest throughput with ``appendfsync always`` against
``everysec``, alternately in the same run, on the disk of the data directory.

    python bench/aof_fsync.py                 # 3 rounds of 3000 messages per mode
    python bench/aof_fsync.py --rounds 1 --messages 1000

Each round starts redis-server exactly as ``mailpool run`` does (``workers.embedded``, the
AOF in a fresh directory under ``--dir``) and one ``mailpool ingest`` against it, then
Postfix's ``smtp-source`` sends 2 KB messages over 1, 10 and 50 reused sessions.  Printed:
messages/second per mode (median of the rounds) and the ratio always/everysec.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import Case, free_port, smtp_source, start_ingest, wait_for_port

from workers.embedded import redis_arguments, redis_binary

MODES = ("everysec", "always")


@contextlib.contextmanager
def embedded_like_redis(directory: Path, appendfsync: str) -> Iterator[str]:
    port = free_port()
    directory.mkdir(parents=True)
    arguments = redis_arguments(redis_binary(), port, directory, appendfsync)
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(base: Path, mode: str, cases: list[Case], round_number: int) -> list[float]:
    directory = base / f"{mode}-{round_number}"
    with embedded_like_redis(directory / "redis", mode) as url:
        ingest = start_ingest(url, directory / "ingest.log", free_port())
        try:
            smtp_source(ingest, Case(2048, 10, True, 200))  # warm-up
            return [smtp_source(ingest, case).rate for case in cases]
        finally:
            ingest.stop()
            shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--dir", default=".", help="where the AOFs go (the data disk)")
    args = parser.parse_args()
    cases = [Case(2048, sessions, True, args.messages) for sessions in (1, 10, 50)]
    rates: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="mailpool-aof-bench-", dir=args.dir) as tmp:
        for round_number in range(args.rounds):
            for mode in MODES if round_number % 2 == 0 else reversed(MODES):
                rates[mode].append(measure(Path(tmp), mode, cases, round_number))
    print(f"{'case':<30} {'everysec msg/s':>14} {'always msg/s':>12} {'ratio':>6}")
    for index, case in enumerate(cases):
        every = statistics.median(r[index] for r in rates["everysec"])
        always = statistics.median(r[index] for r in rates["always"])
        print(f"{case.label:<30} {every:>14.0f} {always:>12.0f} {always / every:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
