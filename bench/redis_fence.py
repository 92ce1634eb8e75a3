"""What the redis-py reach-ins of workers/streams/redis_fence.py buy, measured.

Each variant swaps one fenced use for redis-py's public API and runs the delivery worker
(``bench/delivery.py``'s worker side: N pre-enqueued 2 KB sends into ``smtp-sink``) in
alternated rounds with the code as it is (ABBA order, so a drift of the machine's load falls
on both alike).  Printed: each round, then the median over rounds of variant/current for
msg/s (wall) and msg per CPU-second of this process.

Variants:

* ``pipeline``: settlements go through ``redis.pipeline(transaction=False)`` (``FCALL`` per
  settlement, ``execute(raise_on_error=False)``) on the pooled client, instead of hiredis
  packing them onto a connection checked out for the round trip (all public API);
* ``packer``: as now, but packed by redis-py's ``Connection.pack_commands`` instead of
  ``hiredis.pack_command`` directly (what importing hiredis buys);
* ``per-reply``: as now, but each reply read under its own ``socket_timeout`` timer, as
  redis-py's ``read_response`` arms it, instead of one for the batch
  (``redis_fence.read_replies``).  Its baseline, ``current-tx``, keeps the transactions of
  plain deliveries on (seven replies each), as the variant does.
* ``read-response``: as now, but each reply read with redis-py's ``read_response`` (one
  timer for the batch) instead of straight from the connection's hiredis reader
  (``redis_fence._parsed_replies``).  Baseline ``current-tx`` too.

Except for ``per-reply`` and ``read-response``, every side settles through the settle
function, the code as it is too (its transaction for a plain delivery's first run is pinned
off): only the way the commands are packed and sent differs.

    python bench/redis_fence.py                  # N=3000, 4 rounds of each
    python bench/redis_fence.py -n 2000 --rounds 6 --variant packer

The settlement once held one connection outside the pool across round trips; measured
against a checkout per round trip (the code of commit 941fd41 against that variant) it
bought 2% of CPU per message (0.99 and 0.98), too little for a reach-in, so it went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.exceptions import RedisError, ResponseError  # noqa: E402

from bench.delivery import Result, SmtpSink, make_messages, run_worker  # noqa: E402
from tests.harness import RedisServer  # noqa: E402
from workers.logs import configure_logging  # noqa: E402
from workers.streams import outcomes, redis_fence  # noqa: E402


async def settle_with_pipeline(
    self: outcomes.Outcomes,
    settlements: Sequence[outcomes.Settlement],
    now: float,
    *,
    first_run: bool = False,
) -> list[bool | RedisError]:
    """The public-API settlement round trip: one pipeline of FCALLs on the pooled client."""
    now_text = repr(now)
    pipe = self.redis.pipeline(transaction=False)
    for settlement in settlements:
        pipe.execute_command(*self.settle_command(settlement, now_text))
    replies = await pipe.execute(raise_on_error=False)
    return [r if isinstance(r, ResponseError) else bool(r) for r in replies]


async def settle_packed_by_redis_py(
    self: outcomes.Outcomes,
    settlements: Sequence[outcomes.Settlement],
    now: float,
    *,
    first_run: bool = False,
) -> list[bool | RedisError]:
    """As now, packed by the connection's own packer instead of hiredis directly."""
    now_text = repr(now)
    async with redis_fence.borrowed(self.redis.connection_pool) as connection:
        packed = connection.pack_commands([self.settle_command(s, now_text) for s in settlements])
        await connection.send_packed_command(packed)
        return await read_replies(connection, len(settlements))


async def read_replies(connection: Any, count: int) -> list[bool | RedisError]:
    results: list[bool | RedisError] = []
    for _ in range(count):
        try:
            results.append(bool(await connection.read_response()))
        except ResponseError as exc:
            results.append(exc)
    return results


ORIGINAL = outcomes.Outcomes.settle_batch


async def settle_as_now(
    self: outcomes.Outcomes,
    settlements: Sequence[outcomes.Settlement],
    now: float,
    *,
    first_run: bool = False,
) -> list[bool | RedisError]:
    """The code as it is, through the function only (as the variants)."""
    return await ORIGINAL(self, settlements, now)


async def read_replies_one_timer_each(connection: Any, count: int) -> list[Any]:
    """Each reply under its own ``socket_timeout``, as ``read_response`` arms it."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def settle_timer_per_reply(
    self: outcomes.Outcomes,
    settlements: Sequence[outcomes.Settlement],
    now: float,
    *,
    first_run: bool = False,
) -> list[bool | RedisError]:
    """As now, but every reply read under a timer of its own."""
    one_timer = redis_fence.read_replies
    redis_fence.read_replies = read_replies_one_timer_each  # type: ignore[assignment]
    try:
        return await ORIGINAL(self, settlements, now, first_run=first_run)
    finally:
        redis_fence.read_replies = one_timer  # type: ignore[assignment]


async def settle_read_response(
    self: outcomes.Outcomes,
    settlements: Sequence[outcomes.Settlement],
    now: float,
    *,
    first_run: bool = False,
) -> list[bool | RedisError]:
    """As now, but the replies read by redis-py's read_response, not the hiredis reader."""
    direct = redis_fence.hiredis_parser
    redis_fence.hiredis_parser = lambda connection: None  # type: ignore[assignment]
    try:
        return await ORIGINAL(self, settlements, now, first_run=first_run)
    finally:
        redis_fence.hiredis_parser = direct  # type: ignore[assignment]


# The side each variant is compared with (default "current").
BASELINES = {"per-reply": "current-tx", "read-response": "current-tx"}
VARIANTS = {
    "current": settle_as_now,
    "current-tx": ORIGINAL,  # with its transactions: per-reply's baseline
    "per-reply": settle_timer_per_reply,
    "read-response": settle_read_response,
    "pipeline": settle_with_pipeline,
    "packer": settle_packed_by_redis_py,
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The worker's settlements sent by variant ``name`` (Outcomes.settle_batch is the
    documented seam for that; the worker builds its own Outcomes, so the class's is swapped)."""
    outcomes.Outcomes.settle_batch = VARIANTS[name]  # type: ignore[method-assign]
    try:
        yield
    finally:
        outcomes.Outcomes.settle_batch = ORIGINAL  # type: ignore[method-assign]


async def one_round(
    name: str, sink: SmtpSink, server: RedisServer, n: int, tag: str, concurrency: int
) -> Result:
    with variant(name):
        result = await run_worker(sink, server, make_messages(n, tag), concurrency)
    print(
        f"  {name:<10} {result.rate:8.0f} msg/s {result.per_cpu_second:8.0f} msg/CPU-s "
        f"(+ redis-server {result.redis_cpu_seconds:.2f} CPU-s)",
        flush=True,
    )
    return result


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    sink = SmtpSink(workdir)
    server = RedisServer(workdir / "redis")
    sink.start()
    server.start()
    base = BASELINES.get(args.variant, "current")
    try:
        for name in (base, args.variant):  # warm-up, not reported
            await one_round(name, sink, server, min(args.n, 1000), f"warm-{name}", 10)
        ratios: list[tuple[float, float]] = []
        for round_number in range(args.rounds):
            order = [base, args.variant]
            if round_number % 2:
                order.reverse()
            results = {
                name: await one_round(name, sink, server, args.n, f"{name}{round_number}", 10)
                for name in order
            }
            current, other = results[base], results[args.variant]
            ratios.append(
                (other.rate / current.rate, other.per_cpu_second / current.per_cpu_second)
            )
        wall = statistics.median(r[0] for r in ratios)
        cpu = statistics.median(r[1] for r in ratios)
        print(f"median {args.variant}/{base}: {wall:.3f} msg/s, {cpu:.3f} msg/CPU-s")
    finally:
        server.stop(kill=True)
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=3000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each variant")
    parser.add_argument(
        "--variant", default="pipeline", choices=sorted(set(VARIANTS) - {"current", "current-tx"})
    )
    args = parser.parse_args()
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="mailpool-fence-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
