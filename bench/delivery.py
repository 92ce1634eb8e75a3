"""Delivery benchmark: one delivery worker against a raw aiosmtplib loop, same run.

Both sides send the same N 2 KB messages into Postfix's ``smtp-sink`` (started here on a
free loopback port; the Postfix daemon is never started) over the same number of
persistent SMTP connections (``--concurrency``, default 10):

* raw: the messages are built into RFC 5322 bytes before the clock starts, then sent with
  ``aiosmtplib``'s ``sendmail`` by one coroutine per connection.  This is the baseline the
  target is set against (worker >= 0.7x raw).
* rawtx: the same, but each message goes through the worker's own SMTP transaction
  (``workers.relay.transaction``: commands with pre-checked addresses, one-pass
  dot-stuffing) instead of ``sendmail``.  worker/rawtx is the cost of the bookkeeping alone
  (Redis, build, records, events), without the worker's cheaper use of aiosmtplib.
* worker: the messages are pre-enqueued on ``email.send`` of a private redis-server, then
  ``workers.delivery.serve`` drains them with all its bookkeeping (build, idempotency
  record, ack, events).  The clock runs from the worker's start to the moment the group has
  nothing pending and nothing left to read.
* worker-prebuilt: the worker again, with every message built before the clock (as the
  worker builds it: its entry id, the worker's hostname) and the worker's build replaced by
  a look-up of the result.  worker/worker-prebuilt is what building costs the worker (the
  raw sides' bytes are built before their clock too); worker-prebuilt/raw is everything
  else: decoding, Redis, records, events, state and the transaction.

With ``--postfix`` (as ``make bench`` runs it), two anchors join the rounds:

* worker-fsync: the worker on a second redis-server with ``appendonly yes`` and
  ``appendfsync always`` (every write on disk before Redis answers);
* postfix: a private Postfix delivering the same number of 2 KB messages from its own queue
  to the same smtp-sink over at most as many connections (bench/postfix_queue.py, which
  says how its CPU is counted: every Postfix process of the round).  Printed: worker/postfix
  and worker-fsync/postfix for msg/s and msg per CPU-s (the worker's process alone, then
  with its redis-server's CPU added).

With ``--dkim`` (as ``make bench`` runs it), the worker also runs with DKIM signing on, every
message signed by its From domain's key (bench/example.com):

* worker-ed25519: an ed25519 key (the issue's target: >= 0.6x raw in the same run);
* worker-rsa: an RSA-2048 key.

Rounds alternate (raw, rawtx, worker, raw, ...) so all see the same machine state, after
one unreported warm-up round of each side (the first round of a fresh process pays for
first use of its memory and caches, which would count against whichever side it is).  All
run in this process on the default asyncio loop; CPU seconds are this process's (the
redis-server and smtp-sink processes are not counted on either side; the redis-server's CPU
during worker rounds is printed beside them; the worker sides' include the benchmark's own
few looks at the group's progress, :func:`until_drained`).  smtp-sink's own
message counter checks that every message of a round arrived.

    python bench/delivery.py            # N=5000, 3 rounds each (medians)
    python bench/delivery.py --quick    # N=1000
    python bench/delivery.py --postfix  # with the anchors
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench.postfix_queue import PostfixQueue  # noqa: E402
from tests.harness import RedisServer, free_port, wait_for_port  # noqa: E402
from workers.codec.build import BuiltMessage, build_message  # noqa: E402
from workers.codec.types import SendMessage  # noqa: E402
from workers.codec.wire import pack  # noqa: E402
from workers.config import DeliveryConfig  # noqa: E402
from workers.logs import configure_logging  # noqa: E402
from workers.producer import make_send_message  # noqa: E402
from workers.relay import greet, transaction  # noqa: E402
from workers.streams.layout import data_entry  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
TARGET_SIZE = 2048
DRAIN_TIMEOUT = 600.0
POLL_SHORTEST, POLL_LONGEST = 0.005, 0.2  # seconds between looks at the worker's progress
SEND_TIMEOUT = 60.0  # rawtx: the transaction's budgets (never reached against smtp-sink)


@dataclass
class Result:
    side: str
    messages: int
    seconds: float
    cpu_seconds: float
    redis_cpu_seconds: float = 0.0  # the redis-server's work for the worker (0 for raw)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.messages / self.cpu_seconds if self.cpu_seconds else float("inf")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SmtpSink:
    """``smtp-sink -c``: counts sessions and messages on its stdout ("mesg=N")."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "smtp-sink.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # As root smtp-sink insists on dropping privileges to a named user.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [SMTP_SINK, "-c", *user, f"127.0.0.1:{self.port}", "256"], stdout=out
            )
        wait_for_port(self.port)

    def messages(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", self.log.read_bytes())
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def make_messages(count: int, tag: str) -> list[SendMessage]:
    """Distinct 2 KB messages (about TARGET_SIZE octets once built)."""
    filler = ("The quick brown fox jumps over the lazy dog. " * 2 + "\n") * 19
    return [
        make_send_message(
            from_="bench@example.com",
            to=[f"rcpt{n % 50}@example.net"],
            subject=f"bench {tag} message {n}",
            text=filler,
        )
        for n in range(count)
    ]


async def wait_for_sink(sink: SmtpSink, expected: int) -> None:
    for _ in range(250):  # smtp-sink updates its counter as each message ends; wait <= 5 s
        if sink.messages() >= expected:
            return
        await asyncio.sleep(0.02)
    if sink.messages() < expected:
        raise SystemExit(f"smtp-sink counted {sink.messages()} messages, expected {expected}")


SendOne = Callable[[aiosmtplib.SMTP, BuiltMessage], Awaitable[None]]


async def with_sendmail(smtp: aiosmtplib.SMTP, message: BuiltMessage) -> None:
    await smtp.sendmail(message.mail_from, message.recipients, message.data)


async def with_own_transaction(smtp: aiosmtplib.SMTP, message: BuiltMessage) -> None:
    await greet(smtp)  # once per connection: a no-op after the first message
    deadline = asyncio.get_running_loop().time() + SEND_TIMEOUT
    done = await transaction(smtp, message, message.recipients, deadline, SEND_TIMEOUT)
    if not done.result.accepted:
        raise SystemExit(f"rawtx: not accepted: {done.result}")


async def run_baseline(
    side: str, send_one: SendOne, sink: SmtpSink, messages: list[SendMessage], concurrency: int
) -> Result:
    """Pre-built messages over ``concurrency`` persistent connections, no Redis."""
    built = [build_message(m, default_id=f"{side}-{n}") for n, m in enumerate(messages)]
    before = sink.messages()
    queue = list(reversed(built))

    async def connection() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await smtp.connect()
        while queue:
            await send_one(smtp, queue.pop())
        await smtp.quit()

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu
    await wait_for_sink(sink, before + len(messages))
    return Result(side, len(messages), elapsed, cpu_used)


async def progress(redis: aioredis.Redis, stream: str, group: str) -> tuple[int, int] | None:
    """(entries the group has read, entries pending in it); None while it does not exist."""
    try:
        groups = await redis.xinfo_groups(stream)
    except aioredis.ResponseError:
        return None
    for info in groups:
        if info["name"] == group.encode():
            read = info.get("entries-read")
            return (0 if read is None else int(read)), int(info["pending"])
    return None


def _all_settled(seen: tuple[int, int] | None, total: int) -> bool:
    return seen is not None and seen[1] == 0 and seen[0] >= total


async def until_drained(
    redis: aioredis.Redis, stream: str, group: str, total: int, worker: asyncio.Task[None]
) -> int:
    """Wait until the group has read all ``total`` entries and has none pending; the number
    of looks it took.

    Each look is an XINFO GROUPS that costs this process about 170 us of CPU (redis-py's
    call and parse): looking every 10 ms, as this did, charged the worker side 1.7% of a
    CPU that the raw sides never pay.  (Its CPU cannot be taken off: the worker's tasks run
    while a look waits for its reply.)  The next look comes after half the time the entries
    not yet settled should take at the rate so far (5 ms to 0.2 s apart), so a round looks
    a few dozen times at most and its end is still seen within 5 ms.
    """
    looks = 0
    started = time.monotonic()
    deadline = started + DRAIN_TIMEOUT
    while True:
        seen = await progress(redis, stream, group)
        looks += 1
        if _all_settled(seen, total):
            return looks
        if worker.done():
            worker.result()  # raises what killed it
            raise SystemExit("the delivery worker returned before draining the stream")
        now = time.monotonic()
        if now > deadline:
            raise SystemExit("the delivery worker did not drain the stream in time")
        settled = 0 if seen is None else seen[0] - seen[1]
        rate = settled / (now - started) if settled > 0 else 0.0
        left = (total - settled) / rate if rate else 0.0  # none settled yet: look again soon
        await asyncio.sleep(min(max(left / 2, POLL_SHORTEST), POLL_LONGEST))


async def enqueue_all(redis: aioredis.Redis, stream: str, messages: list[SendMessage]) -> list[str]:
    """XADD every message (500 per pipeline); their entry ids, in order."""
    ids: list[str] = []
    for start in range(0, len(messages), 500):
        pipe = redis.pipeline(transaction=False)
        for message in messages[start : start + 500]:
            pipe.xadd(stream, data_entry(pack(message)))
        ids += [i.decode() if isinstance(i, bytes) else str(i) for i in await pipe.execute()]
    return ids


@contextlib.contextmanager
def built_before_the_clock(
    messages: list[SendMessage], entry_ids: list[str], config: DeliveryConfig
) -> Iterator[None]:
    """The worker-prebuilt side: every message built now, as the worker would build it (its
    entry id as ``default_id``, the worker's hostname), and the worker's build replaced by a
    look-up of the result.  What the worker does apart from building (decoding, Redis,
    records, events, the transaction) is then measured alone.  A look-up that misses (the
    worker asked for a message not built here) stops the benchmark: the side would not
    measure what it says."""
    from workers.codec.build import build_message as build
    from workers.delivery import attempt

    built = {
        entry_id: build(message, default_id=entry_id, hostname=config.hostname)
        for message, entry_id in zip(messages, entry_ids, strict=True)
    }

    def look_up(message: SendMessage, *, default_id: str, **options: Any) -> BuiltMessage:
        found = built.get(default_id)
        if found is None:
            raise SystemExit(f"worker-prebuilt: entry {default_id} was not built before the clock")
        return found

    with mock.patch.object(attempt, "build_message", look_up):
        yield


async def run_worker(
    sink: SmtpSink,
    server: RedisServer,
    messages: list[SendMessage],
    concurrency: int,
    side: str = "worker",
    dkim_keys: str | None = None,
    *,
    prebuilt: bool = False,
) -> Result:
    from workers.delivery import serve

    assert server.process is not None
    redis_url = server.url
    config = DeliveryConfig(
        redis_url=redis_url,
        relay=f"smtp://127.0.0.1:{sink.port}",
        starttls="off",
        concurrency=concurrency,
        consumer="bench-worker",
        hostname="bench.invalid",
        dkim_keys=dkim_keys,
    )
    config.validate()
    redis = aioredis.Redis.from_url(redis_url)
    await redis.flushall()
    entry_ids = await enqueue_all(redis, config.send_stream, messages)
    before = sink.messages()
    stop = asyncio.Event()
    # Every other worker side builds each message in the worker.
    building = (
        built_before_the_clock(messages, entry_ids, config)
        if prebuilt
        else contextlib.nullcontext()
    )
    with building:
        redis_cpu = process_cpu_seconds(server.process.pid)
        started, cpu = time.perf_counter(), time.process_time()
        worker = asyncio.create_task(serve(config, stop))
        await until_drained(redis, config.send_stream, config.group, len(messages), worker)
        elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu
        redis_used = process_cpu_seconds(server.process.pid) - redis_cpu
        stop.set()
        await asyncio.wait_for(worker, 60)
    await check_nothing_failed(redis, config)
    await redis.aclose()
    await wait_for_sink(sink, before + len(messages))
    return Result(side, len(messages), elapsed, cpu_used, redis_used)


def run_postfix(queue: PostfixQueue, sink: SmtpSink, count: int, sessions: int) -> Result:
    """Postfix delivers ``count`` messages from its own queue (bench/postfix_queue.py)."""
    queue.fill(count, TARGET_SIZE, sessions)
    before = sink.messages()
    seconds, cpu = queue.deliver(lambda: sink.messages() >= before + count, DRAIN_TIMEOUT)
    return Result("postfix", count, seconds, cpu)


async def check_nothing_failed(redis: aioredis.Redis, config: DeliveryConfig) -> None:
    dead = await redis.xlen(config.dead_stream)
    retries = await redis.zcard(config.stream_keys().retry_schedule)
    if dead or retries:
        raise SystemExit(f"worker round had {dead} dead letters and {retries} retries waiting")


def report(result: Result) -> None:
    redis_part = ""
    if result.side.startswith("worker"):
        redis_part = f"  (+ redis-server {result.redis_cpu_seconds:.2f} CPU-s)"
    print(
        f"  {result.side:<15} {result.messages:>6} msgs {result.seconds:7.2f} s "
        f"{result.rate:8.0f} msg/s {result.per_cpu_second:8.0f} msg/CPU-s{redis_part}",
        flush=True,
    )


def median_rates(results: list[Result], side: str) -> tuple[float, float] | None:
    rows = [r for r in results if r.side == side]
    if not rows:
        return None
    return (
        statistics.median(r.rate for r in rows),
        statistics.median(r.per_cpu_second for r in rows),
    )


def summary(results: list[Result]) -> None:
    sides = (
        "raw", "rawtx", "worker", "worker-prebuilt", "worker-ed25519", "worker-rsa",
        "worker-fsync", "postfix",
    )  # fmt: skip
    medians = {side: median_rates(results, side) for side in sides}
    print("median:")
    for side, rates in medians.items():
        if rates is not None:
            print(f"  {side:<15} {rates[0]:8.0f} msg/s {rates[1]:8.0f} msg/CPU-s")
    worker = medians["worker"]
    for base in ("raw", "rawtx"):
        rates = medians[base]
        if worker is not None and rates is not None:
            print(
                f"ratio worker/{base}: {worker[0] / rates[0]:.2f} (msg/s)  "
                f"{worker[1] / rates[1]:.2f} (msg per CPU-s)"
            )
    prebuilt, raw_medians = medians["worker-prebuilt"], medians["raw"]
    if prebuilt is not None and raw_medians is not None and worker is not None:
        print(
            f"ratio worker-prebuilt/raw: {prebuilt[0] / raw_medians[0]:.2f} (msg/s)  "
            f"{prebuilt[1] / raw_medians[1]:.2f} (msg per CPU-s); building's share of the "
            f"worker's CPU time: {1 - worker[1] / prebuilt[1]:.0%}"
        )
    for signed in ("worker-ed25519", "worker-rsa"):
        ours, raw_rates = medians[signed], medians["raw"]
        if ours is not None and raw_rates is not None and worker is not None:
            print(
                f"ratio {signed}/raw: {ours[0] / raw_rates[0]:.2f} (msg/s)  "
                f"{ours[1] / raw_rates[1]:.2f} (msg per CPU-s); {signed}/worker: "
                f"{ours[0] / worker[0]:.2f} (msg/s)  {ours[1] / worker[1]:.2f} (msg per CPU-s)"
            )
    anchor = medians["postfix"]
    for side in ("worker", "worker-fsync"):
        ours = medians[side]
        if ours is not None and anchor is not None:
            with_redis = statistics.median(
                r.messages / (r.cpu_seconds + r.redis_cpu_seconds)
                for r in results if r.side == side
            )  # fmt: skip
            print(
                f"ratio {side}/postfix: {ours[0] / anchor[0]:.2f} (msg/s)  "
                f"{ours[1] / anchor[1]:.2f} (msg per CPU-s)  "
                f"{with_redis / anchor[1]:.2f} (msg per CPU-s, redis-server's counted)"
            )
    # Each round's sides run back to back: their ratio is immune to the machine's drift
    # between rounds, which the ratio of medians is not.
    raw = [r for r in results if r.side == "raw"]
    worker_rounds = [r for r in results if r.side == "worker"]
    paired = [w.rate / r.rate for r, w in zip(raw, worker_rounds, strict=False)]
    if paired:
        rounds = " ".join(f"{ratio:.2f}" for ratio in paired)
        print(f"worker/raw per round: {rounds} (median {statistics.median(paired):.2f})")


@contextlib.contextmanager
def sink_and_redis(workdir: Path) -> Iterator[tuple[SmtpSink, RedisServer]]:
    """smtp-sink and a private redis-server in ``workdir``, stopped on the way out."""
    sink = SmtpSink(workdir)
    server = RedisServer(workdir / "redis")
    sink.start()
    server.start()
    try:
        yield sink, server
    finally:
        server.stop(kill=True)
        sink.stop()


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    with sink_and_redis(workdir) as (sink, server), anchors(args, workdir, sink) as (fsync, queue):
        sample = make_messages(1, "size")[0]
        size = len(build_message(sample, default_id="size").data)
        print(
            f"N={args.n} messages of {size} octets, {args.concurrency} connections, "
            f"python {sys.version.split()[0]}, smtp-sink on :{sink.port}",
            flush=True,
        )
        sides: dict[str, Callable[[list[SendMessage]], Awaitable[Result]]] = {
            "raw": lambda m: run_baseline("raw", with_sendmail, sink, m, args.concurrency),
            "rawtx": lambda m: run_baseline(
                "rawtx", with_own_transaction, sink, m, args.concurrency
            ),
            "worker": lambda m: run_worker(sink, server, m, args.concurrency),
            "worker-prebuilt": lambda m: run_worker(
                sink, server, m, args.concurrency, "worker-prebuilt", prebuilt=True
            ),
        }
        if args.dkim:
            for algorithm in ("ed25519", "rsa"):
                table = write_key_table(workdir / f"dkim-{algorithm}", algorithm)
                check_signed(sample, table)
                sides[f"worker-{algorithm}"] = lambda m, table=table, a=algorithm: run_worker(
                    sink, server, m, args.concurrency, f"worker-{a}", str(table)
                )
        if fsync is not None and queue is not None:
            sides["worker-fsync"] = lambda m: run_worker(
                sink, fsync, m, args.concurrency, "worker-fsync"
            )
            sides["postfix"] = lambda m: asyncio.to_thread(
                run_postfix, queue, sink, len(m), args.concurrency
            )
        order = ["raw", "rawtx"] if args.raw_only else list(sides)  # in the order added
        results = []
        for side in order:  # warm-up, not reported
            await sides[side](make_messages(min(args.n, 1000), f"warm-{side}"))
        for round_number in range(args.rounds):
            for side in order:
                messages = make_messages(args.n, f"{side}{round_number}")
                result = await sides[side](messages)
                report(result)
                results.append(result)
        summary(results)


def check_signed(message: SendMessage, table: Path) -> None:
    """The signing sides must sign: the bench's messages are built signed with ``table``."""
    from workers.config import load_key_table

    built = build_message(message, default_id="check", keys=load_key_table(str(table)))
    if not built.data.startswith(b"DKIM-Signature: "):
        raise SystemExit(f"the messages would go unsigned with {table}")


def write_key_table(directory: Path, algorithm: str) -> Path:
    """A key table with one new key (ed25519, or RSA-2048) for the messages' domain."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory.mkdir()
    (directory / "key.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    table = directory / "keys.txt"
    table.write_text("example.com bench key.pem\n", encoding="utf-8")
    return table


@contextlib.contextmanager
def anchors(
    args: argparse.Namespace, workdir: Path, sink: SmtpSink
) -> Iterator[tuple[RedisServer | None, PostfixQueue | None]]:
    """With ``--postfix``: a redis-server fsyncing every write (appendfsync always) for a
    worker with durability on, and Postfix delivering from its own queue."""
    if not args.postfix:
        yield None, None
        return
    fsync = RedisServer(workdir / "redis-fsync", appendonly=True)  # appendfsync always
    queue = PostfixQueue(sink.port, args.concurrency)
    fsync.start()
    try:
        yield fsync, queue
    finally:
        queue.close()
        fsync.stop(kill=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=5000, help="messages per round")
    parser.add_argument("--quick", action="store_true", help="N=1000")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side")
    parser.add_argument("--concurrency", type=int, default=10, help="SMTP connections")
    parser.add_argument("--raw-only", action="store_true", help="only the baselines")
    parser.add_argument(
        "--postfix", action="store_true",
        help="also Postfix delivering from its own queue, and the worker on an fsyncing Redis",
    )  # fmt: skip
    parser.add_argument(
        "--dkim", action="store_true", help="also the worker signing with ed25519 and RSA-2048"
    )
    parser.add_argument("--log-level", default="warning", help="worker log level")
    args = parser.parse_args()
    if args.quick:
        args.n = 1000
    configure_logging("json", args.log_level)
    with tempfile.TemporaryDirectory(prefix="mailpool-bench-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
