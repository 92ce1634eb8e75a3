"""Redis CPU per message of mailpool's workers against the raw floor, on one redis-server.

Issue 14's yardstick: what Redis spends on a message mailpool handles, against what it
spends on the fewest commands that could do the same job, measured in the same run on the
same server (AOF fsynced every second, one partition), the sides alternated round by round
(a drift of the machine's load falls on both alike) and medians reported: single rounds
vary by half.

* **delivery**: the worker (``workers.delivery.serve``, ``--concurrency 10``, into
  ``smtp-sink``) against a raw consumer of the same entries: ``XREADGROUP COUNT 10``, then
  per entry one ``XACK`` and one ``XADD`` of an event as large as the worker's ``delivered``
  event (the worker's own, copied), pipelined per read.  Target: worker/raw <= 1.3.
* **ingest**: ``mailpool ingest`` fed by ``smtp-source`` (10 sessions, reused connections)
  against raw ``XADD``s of copies of ingest's own entries (same fields, same octets),
  pipelined 10 at a time (one per session).  Target: ingest/raw <= 1.1.
* **ingest, paced** (printed after the floor): the same raw pipelines, sent at the rate
  ``mailpool ingest`` reached in the round before (smtp-source's pace) instead of one
  after another.  Redis pays more per XADD when a few arrive at a time than in a tight
  loop (its caches go cold between wake-ups; the CPUs are shared), however few commands
  a client sends: ingest/paced is what ingest's own commands and batching cost over the
  fewest commands at the same pace, raw/paced what the pace alone costs.
* **delivery commands** (printed after the floor, beside the raw consumer's rounds): the
  raw consumer's reads and batches, each entry settled with the worker's own settlement
  (``Outcomes.settle_batch``: the idempotency record and its EXPIRE, XACK, the event,
  in one MULTI/EXEC per batch).  commands/raw is what the worker's commands cost by themselves, and
  worker/commands what its pacing adds.

Redis CPU is ``used_cpu_sys + used_cpu_user`` deltas less the benchmark's own INFO/XINFO
polls (bench/redis_cost.py) and less Redis's idle CPU over the round's length (its cron
and the AOF's fsync, measured once after the warm-up with no traffic, as bench/cluster.py
does): a side whose round lasts longer, as smtp-source and a worker do against a raw
pipeline, would otherwise be charged for time, not for its messages.  ``--profile`` adds
per-command figures of the last rounds (those are not net of the idle CPU).

    python bench/redis_floor.py            # 9 rounds of 3000 messages (rounds vary by half)
    python bench/redis_floor.py --quick    # 3 rounds of 1000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402

from bench.delivery import enqueue_all  # noqa: E402
from bench.redis_cost import (  # noqa: E402
    CONCURRENCY,
    SESSIONS,
    Deployment,
    Round,
    command_profile,
    delivery_round,
    ingest_round,
    median,
    sized_messages,
    smtp_sink,
    standalone,
    start_ingest,
)
from workers.codec.types import SendMessage  # noqa: E402
from workers.config import DeliveryConfig  # noqa: E402
from workers.logs import configure_logging  # noqa: E402
from workers.streams import outcomes as oc  # noqa: E402
from workers.streams.layout import StreamKeys  # noqa: E402

SIZE = 2048
DELIVERY_TARGET = 1.3
INGEST_TARGET = 1.1
RAW_GROUP = "raw-floor"
EVENTS_MAXLEN = 100_000  # the worker's default --events-maxlen


@dataclass
class Side:
    """One role's rounds: mailpool's and the raw floor's, alternated."""

    name: str
    ours: list[Round] = field(default_factory=list)
    raw: list[Round] = field(default_factory=list)
    idle: float = 0.0  # Redis's CPU-s per second with no traffic
    # Delivery only: the worker's settlement commands sent by the raw consumer.
    commands: list[Round] = field(default_factory=list)
    # Ingest only: the raw XADDs at the pace of ingest's round before.
    paced: list[Round] = field(default_factory=list)

    def per_message(self, round_: Round) -> float:
        return round_.redis_us_per_message(self.idle)

    def ratios(self) -> list[float]:
        return [
            self.per_message(o) / max(self.per_message(r), 1e-9)
            for o, r in zip(self.ours, self.raw, strict=True)
        ]

    def summary(self, target: float) -> str:
        ours = median([self.per_message(r) for r in self.ours])
        raw = median([self.per_message(r) for r in self.raw])
        ratio = ours / max(raw, 1e-9)
        rounds = ", ".join(f"{x:.2f}" for x in self.ratios())
        verdict = "meets" if ratio <= target else "misses"
        return (
            f"{self.name}: ours {ours:.1f} us/msg, raw {raw:.1f} us/msg, ratio "
            f"{ratio:.2f} (target <= {target}: {verdict}; per round {rounds})"
        )

    def commands_summary(self) -> str | None:
        """How much of the ratio the settlement's commands explain by themselves."""
        if not self.commands:
            return None
        commands = median([self.per_message(r) for r in self.commands])
        raw = median([self.per_message(r) for r in self.raw])
        ours = median([self.per_message(r) for r in self.ours])
        return (
            f"{self.name}: the worker's settlement commands from a bare client {commands:.1f} "
            f"us/msg, ratio {commands / max(raw, 1e-9):.2f} to raw; the worker "
            f"{ours / max(commands, 1e-9):.2f}x its commands"
        )

    def paced_summary(self, target: float) -> str | None:
        """Ours against the raw floor sent at our own pace, and what the pace costs Redis."""
        if not self.paced:
            return None
        ours = median([self.per_message(r) for r in self.ours])
        raw = median([self.per_message(r) for r in self.raw])
        paced = median([self.per_message(r) for r in self.paced])
        rate = median([r.messages / r.seconds for r in self.paced])
        ratio = ours / max(paced, 1e-9)
        rounds = ", ".join(
            f"{self.per_message(o) / max(self.per_message(p), 1e-9):.2f}"
            for o, p in zip(self.ours, self.paced, strict=True)
        )
        verdict = "meets" if ratio <= target else "misses"
        return (
            f"{self.name}: ours {ours:.1f} us/msg, raw at ours' pace ({rate:.0f} msg/s) "
            f"{paced:.1f} us/msg, ratio {ratio:.2f} (target <= {target}: {verdict}; per round "
            f"{rounds}); the pace alone {paced / max(raw, 1e-9):.2f}x the tight loop"
        )


def _first_key(deployment: Deployment) -> StreamKeys:
    return deployment.keys()[0]


# What a consumer does with one read's entry ids (bytes, as XREADGROUP gives them).
Settle = Callable[[list[bytes]], Awaitable[None]]


async def _consume(
    deployment: Deployment, client: aioredis.Redis, messages: list[SendMessage], settle: Settle
) -> Round:
    """``messages`` enqueued afresh, then read ``XREADGROUP COUNT 10`` at a time, each read
    settled by ``settle`` before the next: the raw consumer's pacing."""
    keys = _first_key(deployment)
    deployment.flush()
    await enqueue_all(client, keys.send, messages)
    await client.xgroup_create(keys.send, RAW_GROUP, id="0")
    before = deployment.counters()
    started, cpu = time.perf_counter(), time.process_time()
    while reply := await client.xreadgroup(RAW_GROUP, "raw", {keys.send: ">"}, count=CONCURRENCY):
        await settle([entry_id for entry_id, _ in reply[0][1]])
    seconds, worker_cpu = time.perf_counter() - started, time.process_time() - cpu
    return Round(len(messages), seconds, worker_cpu, deployment.counters() - before)


async def raw_delivery_round(
    deployment: Deployment, messages: list[SendMessage], event: dict[bytes, bytes]
) -> Round:
    """XREADGROUP COUNT 10 + per entry XACK and an event XADD, one pipeline per read."""
    keys = _first_key(deployment)
    client = aioredis.from_url(deployment.url)

    async def settle(ids: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xack(keys.send, RAW_GROUP, entry_id)
            pipe.xadd(keys.events, event, maxlen=EVENTS_MAXLEN, approximate=True)
        await pipe.execute()

    try:
        return await _consume(deployment, client, messages, settle)
    finally:
        await client.aclose()


async def commands_delivery_round(
    deployment: Deployment, messages: list[SendMessage], event: dict[bytes, bytes]
) -> Round:
    """The raw consumer's reads and batching, but each entry settled with the worker's own
    settlement (``Outcomes.settle_batch`` of plain deliveries: the idempotency record and
    its EXPIRE, XACK, the event, in one MULTI/EXEC per batch): what the worker's commands
    cost Redis without the worker's pacing."""
    client = aioredis.from_url(deployment.url)
    config = DeliveryConfig()
    outcomes = oc.Outcomes(
        client, _first_key(deployment), group=RAW_GROUP, sent_ttl=config.sent_ttl,
        events_maxlen=EVENTS_MAXLEN,
    )  # fmt: skip
    fields = {name.decode(): value.decode() for name, value in event.items()}

    async def settle(ids: list[bytes]) -> None:
        settlements = [
            oc.Settlement(entry_id=i, message_id=i, accepted=["rcpt@example.net"], events=[fields])
            for i in (entry_id.decode() for entry_id in ids)
        ]
        results = await outcomes.settle_batch(settlements, time.time(), first_run=True)
        if not all(result is True for result in results):
            raise SystemExit(f"a settlement failed: {results}")

    try:
        return await _consume(deployment, client, messages, settle)
    finally:
        await outcomes.aclose()
        await client.aclose()


async def newest_entry(deployment: Deployment, stream: str, what: str) -> dict[bytes, bytes]:
    """The fields of the last entry of ``stream``: what a worker wrote, to copy."""
    client = aioredis.from_url(deployment.url)
    try:
        newest = await client.xrevrange(stream, count=1)
    finally:
        await client.aclose()
    if not newest:
        raise SystemExit(f"no {what} to copy in {stream}")
    return dict(newest[0][1])


async def raw_ingest_round(
    deployment: Deployment, entry: dict[bytes, bytes], count: int, rate: float | None = None
) -> Round:
    """``count`` XADDs of ``entry``, SESSIONS per pipeline, one pipeline after another or,
    with ``rate``, each pipeline sent when that many messages per second have had time."""
    stream = _first_key(deployment).receive
    client = aioredis.from_url(deployment.url)
    loop = asyncio.get_running_loop()
    try:
        before = deployment.counters()
        started, cpu = time.perf_counter(), time.process_time()
        begun = loop.time()
        for start in range(0, count, SESSIONS):
            if rate is not None and (ahead := begun + start / rate - loop.time()) > 0:
                await asyncio.sleep(ahead)
            pipe = client.pipeline(transaction=False)
            for _ in range(min(SESSIONS, count - start)):
                pipe.xadd(stream, entry)
            await pipe.execute()
        seconds, worker_cpu = time.perf_counter() - started, time.process_time() - cpu
        spent = deployment.counters() - before
    finally:
        await client.aclose()
    return Round(count, seconds, worker_cpu, spent)


async def run(args: argparse.Namespace, workdir: Path) -> tuple[Side, Side]:
    delivery, ingest = Side("delivery"), Side("ingest")
    with standalone(workdir) as deployment, smtp_sink(workdir) as sink:
        server = start_ingest(deployment, workdir / "ingest.log")
        try:
            deployment.flush()
            warm_up = ingest_round(deployment, server, SIZE, 200)  # and an entry to copy
            ingest_rate = warm_up.messages / warm_up.seconds  # the paced floor's, until a round
            keys = _first_key(deployment)
            entry = await newest_entry(deployment, keys.receive, "ingest entry")
            await delivery_round(deployment, sink, sized_messages(200, SIZE, "warm"))
            event = await newest_entry(deployment, keys.events, "delivered event")
            delivery.idle = ingest.idle = deployment.idle_cpu_per_second()
            print(
                f"copied: ingest entry {sum(map(len, entry.values()))} B of fields, "
                f"event {sum(map(len, event.values()))} B; Redis idle "
                f"{delivery.idle * 1e3:.2f} ms CPU/s",
                flush=True,
            )
            for number in range(args.rounds):
                messages = sized_messages(args.messages, SIZE, f"r{number}")
                ours_first = number % 2 == 0
                for ours in (ours_first, not ours_first):
                    deployment.flush()
                    if ours:
                        ingest.ours.append(ingest_round(deployment, server, SIZE, args.messages))
                        ingest_rate = args.messages / ingest.ours[-1].seconds
                        delivery.ours.append(await delivery_round(deployment, sink, messages))
                    else:
                        ingest.raw.append(await raw_ingest_round(deployment, entry, args.messages))
                        deployment.flush()
                        ingest.paced.append(
                            await raw_ingest_round(deployment, entry, args.messages, ingest_rate)
                        )
                        delivery.raw.append(await raw_delivery_round(deployment, messages, event))
                        delivery.commands.append(
                            await commands_delivery_round(deployment, messages, event)
                        )
                paced = ingest.per_message(ingest.paced[-1])
                print(f"  round {number + 1}: " + "; ".join(
                    f"{side.name} {side.per_message(side.ours[-1]):.1f} vs "
                    f"{side.per_message(side.raw[-1]):.1f} us/msg"
                    for side in (ingest, delivery)
                ) + f"; ingest's pace {paced:.1f} us/msg", flush=True)  # fmt: skip
        finally:
            server.stop()
    return delivery, ingest


def report(delivery: Side, ingest: Side, messages: int, profile: bool) -> None:
    print(f"\nRedis CPU per 2 KB message, medians of {len(delivery.ours)} alternated rounds")
    print("FLOOR " + delivery.summary(DELIVERY_TARGET))
    print("FLOOR " + ingest.summary(INGEST_TARGET))
    if (parts := delivery.commands_summary()) is not None:
        print("COMMANDS " + parts)
    if (paced := ingest.paced_summary(INGEST_TARGET)) is not None:
        print("PACED " + paced)
    if profile:
        for side in (delivery, ingest):
            for label, rounds in (("ours", side.ours), ("raw", side.raw), ("paced", side.paced)):
                if not rounds:
                    continue
                print(f"  {side.name} {label}, last round:")
                print("\n".join(command_profile(rounds[-1].redis, messages)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1000 messages")
    parser.add_argument("--rounds", type=int, help="alternated rounds (default 9)")
    parser.add_argument("--messages", type=int, help="messages per round (default 3000)")
    parser.add_argument("--profile", action="store_true", help="per-command figures")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.messages = args.messages or (1000 if args.quick else 3000)
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="mailpool-floor-") as tmp:
        delivery, ingest = asyncio.run(run(args, Path(tmp)))
    report(delivery, ingest, args.messages, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
