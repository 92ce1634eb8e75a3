"""Capacity figures from measurements: what one message costs Redis (CPU and memory) and
the workers (CPU), for 2 KB and 100 KB messages, on a standalone redis-server with one
partition (AOF fsynced every second).  bench/redis_cost.py says how a round runs.

Printed per message size, medians of alternating rounds:

* Redis CPU per message for ingest (SMTP in -> ``email.receive``) and for delivery
  (``email.send`` -> relay, with its settlement, events and idempotency record), and
  the messages per second one Redis core carries when each message goes in and out
  (1e6 us / (ingest + delivery us));
* Redis memory per retained ``email.receive`` entry (``MEMORY USAGE`` of every key after
  an ingest round less before it, over the entries: the data, not the clients'
  buffers), and
  what a delivered message leaves behind (its ``email.send`` entry, its event, its sent
  record; trimmed by housekeeping);
* each worker's messages per CPU-second (the ingest process's CPU; delivery's is this
  process's, which runs the worker).

README's capacity planning takes its arithmetic from these figures.

    python bench/capacity.py            # 5 rounds; 3000 / 400 messages (2 KB / 100 KB)
    python bench/capacity.py --quick    # 3 rounds; 1000 / 150
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.redis_cost import (  # noqa: E402
    Round,
    built_size,
    delivery_round,
    ingest_round,
    median,
    sized_messages,
    smtp_sink,
    standalone,
    start_ingest,
)
from workers.logs import configure_logging  # noqa: E402

SIZES = (2048, 102_400)


@dataclass
class Figures:
    """One message size's rounds."""

    size: int
    messages: int
    ingest: list[Round] = field(default_factory=list)
    delivery: list[Round] = field(default_factory=list)

    def redis_us(self, role: str) -> float:
        return median([r.redis_us_per_message() for r in getattr(self, role)])

    def retained(self, role: str) -> float:
        return median([r.retained / r.messages for r in getattr(self, role)])

    def worker(self, role: str) -> float:
        return median([r.worker_per_cpu_second for r in getattr(self, role)])

    @property
    def per_core(self) -> float:
        return 1e6 / (self.redis_us("ingest") + self.redis_us("delivery"))


def counts(args: argparse.Namespace) -> dict[int, int]:
    small, large = (1000, 150) if args.quick else (3000, 400)
    return {2048: args.messages or small, 102_400: max((args.messages or large * 20) // 20, 5)}


async def run(args: argparse.Namespace, workdir: Path) -> list[Figures]:
    found = [Figures(size, n) for size, n in counts(args).items()]
    with standalone(workdir, aof=args.aof) as deployment, smtp_sink(workdir) as sink:
        server = start_ingest(deployment, workdir / "ingest.log")
        try:
            for each in found:  # warm-up
                warm = min(each.messages, 100)
                ingest_round(deployment, server, each.size, warm)
                await delivery_round(deployment, sink, sized_messages(warm, each.size, "warm"))
            for number in range(args.rounds):
                order = found if number % 2 == 0 else found[::-1]
                for each in order:
                    deployment.flush()
                    each.ingest.append(ingest_round(deployment, server, each.size, each.messages))
                    messages = sized_messages(each.messages, each.size, f"r{number}")
                    each.delivery.append(await delivery_round(deployment, sink, messages))
                    print_round(number, each)
        finally:
            server.stop()
    return found


def print_round(number: int, each: Figures) -> None:
    ingest, delivery = each.ingest[-1], each.delivery[-1]
    print(
        f"  round {number + 1} {each.size // 1024:>3} KB: ingest "
        f"{ingest.redis_us_per_message():6.1f} us/msg "
        f"{ingest.retained / ingest.messages:8.0f} B/entry; delivery "
        f"{delivery.redis_us_per_message():6.1f} us/msg",
        flush=True,
    )


def report(found: list[Figures], aof: bool) -> None:
    rounds = len(found[0].ingest)
    persistence = "AOF everysec" if aof else "no AOF"
    print(f"\nstandalone redis-server, 1 partition, {persistence}; medians of {rounds} rounds")
    print(
        f"{'size':>7} {'built':>7} {'msgs':>5} | {'Redis us/msg':^21} | {'msg/s per':>9} | "
        f"{'Redis B retained/msg':^20} | {'worker msg/CPU-s':^17}"
    )
    print(
        f"{'':>7} {'':>7} {'':>5} | {'ingest':>6} {'deliver':>7} {'sum':>6} | "
        f"{'Redis core':>9} | {'receive':>9} {'delivered':>10} | {'ingest':>8} {'deliver':>8}"
    )
    for f in found:
        ingest, delivery = f.redis_us("ingest"), f.redis_us("delivery")
        built = built_size(sized_messages(1, f.size, "size"))
        print(
            f"{f.size:>7} {built:>7} {f.messages:>5} | {ingest:>6.1f} {delivery:>7.1f} "
            f"{ingest + delivery:>6.1f} | {f.per_core:>9.0f} | {f.retained('ingest'):>9.0f} "
            f"{f.retained('delivery'):>10.0f} | {f.worker('ingest'):>8.0f} "
            f"{f.worker('delivery'):>8.0f}"
        )
    for f in found:
        print(
            f"CAPACITY {f.size} B: ingest {f.redis_us('ingest'):.1f} us, delivery "
            f"{f.redis_us('delivery'):.1f} us, {f.per_core:.0f} msg/s per Redis core, "
            f"{f.retained('ingest'):.0f} B per receive entry"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer messages")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5, quick 3)")
    parser.add_argument(
        "--messages", type=int, help="2 KB messages per round (100 KB: a twentieth)"
    )
    parser.add_argument("--no-aof", dest="aof", action="store_false", help="Redis without AOF")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="mailpool-bench-") as workdir:
        found = asyncio.run(run(args, Path(workdir)))
    report(found, args.aof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
