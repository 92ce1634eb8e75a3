"""What the delivery worker's explicit entry state costs per entry, measured.

Each entry a worker holds is one ``HeldEntry`` (workers/delivery/held.py) that takes the
steps read -> prepared -> queued -> sending -> settling -> settled, each step checked
against the transition table and the worker's invariants.  This takes N entries through
those steps with the real ``HeldEntries`` (no Redis, no SMTP), subtracts the cost of making
the same inputs alone, and prints the best of several repeats in microseconds per entry
(CPU time of this process; compare it with the worker's ~250 us per delivered message in
bench/delivery.py).

    python bench/held_state.py            # 20 000 entries, best of 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.codec.build import BuiltMessage  # noqa: E402
from workers.delivery.attempt import Job, Prepared  # noqa: E402
from workers.delivery.held import HeldEntries  # noqa: E402
from workers.streams.consumer import StreamEntry  # noqa: E402
from workers.streams.layout import MessageRef  # noqa: E402
from workers.streams.outcomes import Settlement  # noqa: E402
from workers.streams.retry import RetryPolicy  # noqa: E402

POLICY = RetryPolicy(base=60.0, cap=3600.0, max_attempts=60, max_age=172_800.0)
RECIPIENTS = ["ann@example.com"]


def inputs(n: int) -> tuple[StreamEntry, Prepared, Settlement]:
    entry_id = f"{n}-0"
    job = Job(entry_id, b"", 1, entry_id, None, 0, None, None)
    built = BuiltMessage(b"", "sender@example.com", RECIPIENTS, entry_id, False, False)
    prepared = Prepared(job, MessageRef(entry_id, entry_id, b""), built, RECIPIENTS, POLICY)
    settlement = Settlement(entry_id=entry_id, message_id=entry_id)
    return StreamEntry(entry_id, {}, 1), prepared, settlement


def inputs_only(count: int) -> float:
    start = time.process_time()
    for n in range(count):
        inputs(n)
    return time.process_time() - start


def through_every_step(count: int) -> float:
    held = HeldEntries(concurrency=10**9, stopped=lambda: False)
    start = time.process_time()
    for n in range(count):
        entry, prepared, settlement = inputs(n)
        one = held.take(entry)
        assert one is not None
        one.mark_prepared(prepared)
        one.queue(RECIPIENTS)
        one.start_sending(RECIPIENTS)
        one.settle()
        one.settled(settlement)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="entries per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    steps = min(through_every_step(args.n) for _ in range(args.repeats))
    alone = min(inputs_only(args.n) for _ in range(args.repeats))
    print(f"state bookkeeping: {(steps - alone) / args.n * 1e6:.2f} us per entry "
          f"(best of {args.repeats} x {args.n} entries)")  # fmt: skip


if __name__ == "__main__":
    main()
