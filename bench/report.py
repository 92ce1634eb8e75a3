"""One benchmark report: the codec, ingest and delivery benchmarks, worker memory, and
end-to-end latency, printed as ONE table.

    python bench/report.py           # quick: each benchmark's --quick, 10 000 messages per RSS run
    python bench/report.py --full    # full benchmarks, 100 000 messages per RSS run (`make bench`)

Rows:
* ratios: each benchmark (bench/codec.py, bench/ingest.py, bench/delivery.py with its
  Postfix anchor) run as it is, its ratios against the baseline it measured in the same run
  (higher is better for us);
  their whole output is kept in the log directory printed at the end;
* Redis CPU per message against the raw floor (bench/redis_floor.py): delivery's against
  XREADGROUP + XACK + one event XADD, ingest's against pipelined XADDs of its own entries,
  on the same redis-server, alternated rounds (targets <= 1.3 and <= 1.1), and ingest's
  against the same XADDs sent at ingest's own pace;
* Redis cost (``--full`` only): bench/capacity.py's Redis CPU and memory per message (2 KB
  and 100 KB) and bench/cluster.py's Redis CPU per message on a 3-primary cluster with 6
  partitions over a standalone server's (lower is better; the issue's target is <= 1.10);
* memory: RSS of one ``mailpool deliver`` and one ``mailpool ingest`` process (real
  processes, real redis-server, Postfix's smtp-sink / smtp-source) at idle, after the first
  tenth of the messages (warm: pools and caches filled) and after all of them; "flat" means
  the growth from warm to the end stays under 10 MiB;
* latency: from the producer's ``XADD`` on ``email.send`` to the sink's ``250`` (an
  aiosmtpd sink in this process stamps the time it answers), p50 and p99, paced at a low
  rate and at half of the maximum rate measured first against the same sink.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402

from tests.harness import RedisServer, free_port, wait_for_port, wait_until  # noqa: E402
from workers.codec.wire import pack  # noqa: E402
from workers.producer import make_send_message  # noqa: E402
from workers.streams import layout  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
FLAT_KIB = 10 * 1024
ID_HEADER = re.compile(rb"^X-Bench-Id: *(\d+)\r?$", re.M)


@dataclass
class Row:
    what: str
    value: str
    note: str = ""


# --- the three benchmarks, run as they are ---------------------------------------------


# More than each benchmark's defaults: bench/delivery.py's anchors (Postfix from its queue,
# the worker on an fsyncing Redis) and its DKIM-signing sides, in 7 rounds (its 3 left
# single rounds from 0.73 to 1.37 deciding the median), and bench/ingest.py's anchor
# (Haraka, from bench/haraka) and its verifying side (7 rounds of that: --verify-rounds).
OPTIONS = {
    "delivery.py": ["--postfix", "--dkim", "--rounds", "7"],
    "ingest.py": ["--haraka", "--verify"],
}


def run_benchmark(script: str, quick: bool, logs: Path) -> str:
    args = [sys.executable, str(ROOT / "bench" / script), *(["--quick"] if quick else [])]
    args += OPTIONS.get(script, [])
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    output = done.stdout + done.stderr
    (logs / script.replace(".py", ".out")).write_text(output)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}); see {logs}")
    return output


def codec_rows(output: str) -> list[Row]:
    rows, section = [], ""
    for line in output.splitlines():
        if re.match(r"^(parse|build)\s+ours/s", line):
            section = line.split()[0]
        match = re.match(r"^\s+\((\w)\) (.+?)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x$", line)
        if section and match:
            label, ours, theirs, ratio = match.group(2, 3, 4, 5)
            rows.append(
                Row(f"codec {section} {label}", f"{ratio}x", f"{ours} vs stdlib {theirs} msg/s")
            )
    return rows


def ingest_rows(output: str) -> list[Row]:
    """bench/ingest.py's tables: against bare aiosmtpd, then (``--haraka``) against Haraka;
    both have a case, then msg/s a, msg/s b, ratio, msg/CPU-s a, msg/CPU-s b, ratio."""
    rows = []
    against = "bare"
    case = re.compile(r"^\s*(\d+ KB\s+\d+ sessions\s+\w+)" + r"\s+([\d.]+)" * 6 + r"\s*$")
    verifying = re.compile(r"^\s*(\d+ KB\s+\d+ sessions\s+\w+)\s+([\d.]+)\s+([\d.]+)\s")
    for line in output.splitlines():
        if line.startswith("ingest / haraka"):
            against = "haraka quiet" if "warnings only" in line else "haraka"
        if line.startswith("verifying / not"):
            against = "verification"
        found = verifying.match(line) if against == "verification" else None
        if found:
            label = " ".join(found.group(1).split())
            note = f"verifying / not verifying, per CPU-s {found.group(3)}x (goal >= 0.85)"
            rows.append(Row(f"ingest verify/off {label}", f"{found.group(2)}x", note))
            continue
        match = case.match(line)
        if match:
            label = " ".join(match.group(1).split())
            theirs, ours, ratio, _, _, cpu_ratio = match.group(2, 3, 4, 5, 6, 7)
            if against == "bare":
                note = f"{ours} vs bare aiosmtpd {theirs} msg/s; per CPU-s {cpu_ratio}x"
                rows.append(Row(f"ingest {label}", f"{ratio}x", note))
            else:
                goal = "1.0" if "reuse" in label else "1.5"
                note = f"{ours} vs Haraka {theirs} msg/s; per CPU-s {cpu_ratio}x (goal >= {goal})"
                if against.endswith("quiet"):
                    note += "; both logging warnings only"
                    label += " quiet"
                rows.append(Row(f"ingest/haraka {label}", f"{ratio}x", note))
        if line.strip().startswith("median p99:"):
            what = "ingest --verify" if against == "verification" else "ingest"
            rows.append(Row(f"{what} end-of-DATA->250 p99", line.split(":", 1)[1].strip()))
    return rows


def instruction_rows(output: str) -> list[Row]:
    """bench/instructions.py: ingest's instructions per message, not verifying / verifying."""
    found = re.search(r"not verifying / verifying: ([\d.]+)", output)
    counts = re.findall(r"^\s+(ingest(?: --verify)?)\s+([\d.]+k)$", output, re.M)
    if found is None:
        return []
    note = ", ".join(f"{what} {count}" for what, count in counts) + " per message (callgrind)"
    return [Row("ingest verify/off, instructions", f"{found.group(1)}x", note)]


def delivery_rows(output: str) -> list[Row]:
    rates = dict(re.findall(r"^\s+(raw|rawtx|worker)\s+([\d.]+) msg/s", output, re.M))
    match = re.search(r"ratio worker/raw: ([\d.]+) \(msg/s\)\s+([\d.]+)", output)
    if not match:
        return [Row("delivery worker/raw", "?", "no ratio in bench/delivery.py output")]
    note = f"{rates.get('worker', '?')} vs raw aiosmtplib sendmail {rates.get('raw', '?')} msg/s"
    rounds = re.search(r"worker/raw per round: (.*)", output)
    if rounds:
        note += f"; per round {rounds.group(1)}"
    rows = [
        Row("delivery worker/raw", f"{match.group(1)}x", f"{note}; per CPU-s {match.group(2)}x")
    ]
    own = re.search(r"ratio worker/rawtx: ([\d.]+) \(msg/s\)\s+([\d.]+)", output)
    if own:
        note = f"vs the worker's own SMTP code without Redis {rates.get('rawtx', '?')} msg/s"
        rows.append(
            Row("delivery worker/rawtx", f"{own.group(1)}x", f"{note}; per CPU-s {own.group(2)}x")
        )
    prebuilt = re.search(
        r"ratio worker-prebuilt/raw: ([\d.]+) \(msg/s\)\s+([\d.]+) \(msg per CPU-s\); "
        r"building's share of the worker's CPU time: (-?\d+%)",
        output,
    )
    if prebuilt:
        rows.append(Row(
            "delivery worker-prebuilt/raw", f"{prebuilt.group(1)}x",
            f"the worker with its messages built before the clock; per CPU-s "
            f"{prebuilt.group(2)}x; building is {prebuilt.group(3)} of the worker's CPU time",
        ))  # fmt: skip
    signing = (
        r"ratio (worker-ed25519|worker-rsa)/raw: ([\d.]+) \(msg/s\)\s+([\d.]+) "
        r"\(msg per CPU-s\); \S+/worker: ([\d.]+)"
    )
    for side, wall, cpu, of_worker in re.findall(signing, output):
        algorithm = "ed25519" if side == "worker-ed25519" else "RSA-2048"
        rows.append(Row(
            f"delivery {side}/raw", f"{wall}x",
            f"DKIM-signed with {algorithm}; per CPU-s {cpu}x; {of_worker}x the unsigned worker",
        ))  # fmt: skip
    anchor = (
        r"ratio (worker|worker-fsync)/postfix: ([\d.]+) \(msg/s\)\s+([\d.]+) \(msg per CPU-s\)"
        r"\s+([\d.]+)"
    )
    postfix = re.search(r"^\s+postfix\s+([\d.]+) msg/s\s+([\d.]+) msg/CPU-s", output, re.M)
    for side, wall, cpu, with_redis in re.findall(anchor, output):
        durability = "Redis appendfsync always" if side == "worker-fsync" else "Redis without AOF"
        rows.append(Row(
            f"delivery {side}/postfix", f"{wall}x",
            f"{durability}; Postfix from its queue {postfix.group(1) if postfix else '?'} msg/s; "
            f"per CPU-s {cpu}x ({with_redis}x with redis-server's CPU)",
        ))  # fmt: skip
    return rows


def floor_rows(output: str) -> list[Row]:
    pattern = (
        r"^FLOOR (\w+): ours ([\d.]+) us/msg, raw ([\d.]+) us/msg, ratio ([\d.]+) "
        r"\(target <= ([\d.]+): \w+; per round (.*)\)$"
    )
    rows = [
        Row(
            f"Redis CPU/msg {role} ours/raw",
            f"{ratio}x",
            f"{ours} vs {raw} us (target <= {target}); rounds {rounds}",
        )
        for role, ours, raw, ratio, target, rounds in re.findall(pattern, output, re.M)
    ]
    parts = re.search(
        r"^COMMANDS delivery: .* ([\d.]+) us/msg, ratio ([\d.]+) to raw; the worker ([\d.]+)x",
        output,
        re.M,
    )
    if rows and parts:
        rows.append(Row(
            "Redis CPU/msg delivery commands/raw", f"{parts.group(2)}x",
            f"the worker's settlement commands from a bare client, {parts.group(1)} us; "
            f"the worker {parts.group(3)}x its commands",
        ))  # fmt: skip
    paced = re.search(
        r"^PACED ingest: ours [\d.]+ us/msg, raw at ours' pace \((\d+) msg/s\) ([\d.]+) us/msg, "
        r"ratio ([\d.]+) \(target <= [\d.]+: \w+; per round (.*)\); the pace alone ([\d.]+)x",
        output,
        re.M,
    )
    if rows and paced:
        rate, us, ratio, rounds, pace = paced.groups()
        rows.append(Row(
            "Redis CPU/msg ingest ours/raw at ours' pace", f"{ratio}x",
            f"the raw XADDs at {rate} msg/s, {us} us; rounds {rounds}; the pace alone "
            f"{pace}x the tight loop",
        ))  # fmt: skip
    return rows or [Row("Redis CPU/msg ours/raw", "?", "no FLOOR line in bench/redis_floor.py")]


def capacity_rows(output: str) -> list[Row]:
    pattern = (
        r"^CAPACITY (\d+) B: ingest ([\d.]+) us, delivery ([\d.]+) us, (\d+) msg/s .*?(\d+) B per"
    )
    rows = []
    for size, ingest, delivery, per_core, entry in re.findall(pattern, output, re.M):
        rows.append(
            Row(
                f"Redis per {int(size) // 1024} KB msg",
                f"{ingest} + {delivery} us CPU",
                f"ingest + delivery; {per_core} msg/s per Redis core; "
                f"{entry} B per email.receive entry",
            )
        )
    return rows or [Row("Redis per msg", "?", "no CAPACITY line in bench/capacity.py output")]


def cluster_rows(output: str) -> list[Row]:
    pattern = r"RATIO cluster/(standalone\S*) (\w+): ([\d.]+) \(net ([\d.]+)\); per round (.*)"
    rows = [
        Row(
            f"Redis CPU/msg {role} cluster/{base}",
            f"{ratio}x",
            f"net of idle {net}x; rounds {each}",
        )
        for base, role, ratio, net, each in re.findall(pattern, output)
    ]
    return rows or [Row("Redis CPU/msg cluster", "?", "no RATIO line in bench/cluster.py output")]


# --- real parts: redis-server, smtp-sink, worker processes ------------------------------


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@contextmanager
def postfix_sink() -> Iterator[int]:
    """smtp-sink answering 250 to everything, keeping nothing."""
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [SMTP_SINK, *user, f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def worker(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPOOL_")}
    env["MAILPOOL_VERIFY"] = "false"  # no DNS: bench/ingest.py --verify measures verification
    env["PYTHONPATH"] = str(ROOT)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", *args, "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def wait_for(check: Callable[[], Any], limit: float, what: str) -> None:
    """The tests' ``wait_until``, ending the report with one line instead of a traceback."""
    try:
        await wait_until(check, what, timeout=limit)
    except AssertionError as late:
        raise SystemExit(f"timed out: {late}") from None


# --- memory per worker -------------------------------------------------------------------


@dataclass
class Memory:
    idle: int
    samples: list[tuple[int, int]] = field(default_factory=list)  # (messages so far, KiB)

    def rows(self, role: str) -> list[Row]:
        warm, end = self.samples[0][1], self.samples[-1][1]
        growth = end - warm
        verdict = "flat" if growth < FLAT_KIB else "GROWING"
        step = max(len(self.samples) // 3, 1)
        shown = self.samples[:1] + self.samples[step::step] + self.samples[-1:]
        trail = ", ".join(f"{n:,}: {kib / 1024:.1f}" for n, kib in dict(shown).items())
        return [
            Row(f"RSS {role} idle", f"{self.idle / 1024:.1f} MiB"),
            Row(
                f"RSS {role} after {self.samples[-1][0]:,} msgs",
                f"{end / 1024:.1f} MiB",
                f"{verdict}: {growth / 1024:+.1f} MiB since warm; MiB at {trail}",
            ),
        ]


def filler_message(n: int) -> bytes:
    text = ("The quick brown fox jumps over the lazy dog. " * 2 + "\n") * 19
    message = make_send_message(
        from_="bench@example.com", to=[f"rcpt{n % 50}@example.net"], subject=f"bench {n}", text=text
    )
    message["headers"]["x-bench-id"] = str(n)
    return pack(message)


async def settled_send(redis: aioredis.Redis) -> bool:
    groups = await redis.xinfo_groups(layout.DEFAULT_SEND)
    info = await redis.xinfo_stream(layout.DEFAULT_SEND)
    if not groups:
        return False
    group = groups[0]
    return int(group["pending"]) == 0 and group["last-delivered-id"] == info["last-generated-id"]


async def delivery_memory(total: int, workdir: Path) -> Memory:
    chunk = max(total // 10, 1)
    data = filler_message(0)
    with redis_server(workdir) as server, postfix_sink() as port:
        redis = aioredis.Redis.from_url(server.url)
        args = (
            "deliver",
            "--relay",
            f"smtp://127.0.0.1:{port}",
            "--redis-url",
            server.url,
            "--concurrency",
            "10",
            "--consumer",
            "rss",
        )
        with worker(*args, log=workdir / "deliver.log") as process:
            await wait_for(lambda: redis.exists(layout.DEFAULT_SEND), 30, "the delivery group")
            await asyncio.sleep(1.0)
            memory = Memory(rss_kib(process.pid))
            for done in range(chunk, total + 1, chunk):
                pipe = redis.pipeline(transaction=False)
                for _ in range(chunk):
                    pipe.xadd(layout.DEFAULT_SEND, layout.data_entry(data))
                await pipe.execute()
                await wait_for(lambda: settled_send(redis), 600, "the delivery worker")
                await redis.xtrim(layout.DEFAULT_SEND, maxlen=0)  # all acked: keep Redis small
                memory.samples.append((done, rss_kib(process.pid)))
        await redis.aclose()
    return memory


async def ingest_memory(total: int, workdir: Path) -> Memory:
    chunk = max(total // 10, 1)
    with redis_server(workdir) as server:
        redis = aioredis.Redis.from_url(server.url)
        port = free_port()
        args = (
            "ingest",
            "--listen",
            f"127.0.0.1:{port}",
            "--redis-url",
            server.url,
            "--hostname",
            "ingest.bench",
            "--max-connections",
            "2000",
        )
        with worker(*args, log=workdir / "ingest.log") as process:
            wait_for_port(port)
            await asyncio.sleep(1.0)
            memory = Memory(rss_kib(process.pid))
            for done in range(chunk, total + 1, chunk):
                source = [
                    SMTP_SOURCE,
                    "-s",
                    "10",
                    "-m",
                    str(chunk),
                    "-l",
                    "2048",
                    "-d",
                    "-f",
                    "bench@example.org",
                    "-t",
                    "sink@example.com",
                    "-N",
                    f"127.0.0.1:{port}",
                ]
                await asyncio.to_thread(
                    subprocess.run, source, check=True, timeout=900, capture_output=True
                )
                await redis.xtrim(
                    layout.DEFAULT_RECEIVE, maxlen=0
                )  # no readers here: keep it small
                memory.samples.append((done, rss_kib(process.pid)))
        await redis.aclose()
    return memory


# --- end-to-end latency: XADD on email.send -> the sink's 250 ------------------------------


class StampingSink:
    """aiosmtpd sink (own thread) that stamps each message's bench id when it answers 250."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stamps: dict[int, float] = {}
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        match = ID_HEADER.search(envelope.original_content or b"")
        if match:
            with self._lock:
                self.stamps[int(match.group(1))] = time.time()
        return "250 2.0.0 queued"

    def count(self, ids: range) -> int:
        with self._lock:
            return sum(1 for n in ids if n in self.stamps)

    def __enter__(self) -> StampingSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


async def paced(redis: aioredis.Redis, ids: range, rate: float) -> dict[int, float]:
    """XADD one message per id at ``rate`` per second (payloads made beforehand, so the
    producer's pace is XADD's); returns id -> the time just before each XADD."""
    payloads = {n: filler_message(n) for n in ids}
    sent: dict[int, float] = {}
    started = time.monotonic()
    for k, n in enumerate(ids):
        ahead = started + k / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
        sent[n] = time.time()
        await redis.xadd(layout.DEFAULT_SEND, layout.data_entry(payloads[n]))
    return sent


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def max_rate(redis: aioredis.Redis, sink: StampingSink, ids: range) -> float:
    """The most the worker sustains with this producer and sink running beside it: XADDs
    one by one as fast as they go; rate = messages / (last 250 - first XADD)."""
    sent = await paced(redis, ids, float("inf"))
    await wait_for(lambda: _all_stamped(sink, ids), 300, "the burst")
    return len(ids) / (max(sink.stamps[n] for n in ids) - min(sent.values()))


async def _all_stamped(sink: StampingSink, ids: range) -> bool:
    return sink.count(ids) == len(ids)


async def latency_rows(quick: bool, workdir: Path) -> list[Row]:
    low_rate, low_n = 20.0, 200 if quick else 600
    burst = 2000 if quick else 10_000
    with redis_server(workdir) as server, StampingSink() as sink:
        redis = aioredis.Redis.from_url(server.url)
        args = (
            "deliver",
            "--relay",
            f"smtp://127.0.0.1:{sink.port}",
            "--redis-url",
            server.url,
            "--concurrency",
            "10",
            "--consumer",
            "latency",
        )
        with worker(*args, log=workdir / "latency.log"):
            await wait_for(lambda: redis.exists(layout.DEFAULT_SEND), 30, "the delivery group")
            await paced(redis, range(0, 50), 50)  # warm-up: connections opened
            await wait_for(lambda: _all_stamped(sink, range(0, 50)), 60, "warm-up")
            peak = await max_rate(redis, sink, range(1000, 1000 + burst))
            rows = [
                Row(
                    "delivery max rate",
                    f"{peak:.0f} msg/s",
                    f"{burst:,} msgs XADDed one by one; aiosmtpd sink; 1 worker x 10 sends",
                )
            ]
            half_n = int(peak / 2 * (5 if quick else 20))
            for label, rate, ids in (
                ("low load", low_rate, range(100_000, 100_000 + low_n)),
                ("half max", peak / 2, range(200_000, 200_000 + half_n)),
            ):
                sent = await paced(redis, ids, rate)
                await wait_for(lambda ids=ids: _all_stamped(sink, ids), 300, label)
                p50, p99 = percentiles([sink.stamps[n] - sent[n] for n in ids])
                rows.append(
                    Row(
                        f"XADD->250 at {label} ({rate:.0f} msg/s)",
                        f"p50 {p50:.1f} ms  p99 {p99:.1f} ms",
                        f"{len(ids):,} msgs",
                    )
                )
        await redis.aclose()
    return rows


# --- the table -------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    width = max(len(r.what) for r in rows)
    value_width = max(len(r.value) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':<{value_width}}  note")
    print(f"{'-' * width}  {'-' * value_width}  {'-' * 4}")
    for r in rows:
        print(f"{r.what:<{width}}  {r.value:<{value_width}}  {r.note}")


async def report(quick: bool, messages: int, logs: Path) -> list[Row]:
    rows: list[Row] = []
    for script, parse in (
        ("codec.py", codec_rows),
        ("ingest.py", ingest_rows),
        ("delivery.py", delivery_rows),
        ("redis_floor.py", floor_rows),
        ("instructions.py", instruction_rows),
    ):
        print(f"running bench/{script}{' --quick' if quick else ''} ...", flush=True)
        rows.extend(parse(run_benchmark(script, quick, logs)))
    if not quick:  # a cluster of six nodes and 100 KB messages: the full report's
        for script, parse in (("capacity.py", capacity_rows), ("cluster.py", cluster_rows)):
            print(f"running bench/{script} ...", flush=True)
            rows.extend(parse(run_benchmark(script, quick, logs)))
    print(f"memory: {messages:,} messages through a delivery and an ingest worker ...", flush=True)
    rows.extend((await delivery_memory(messages, logs)).rows("deliver"))
    rows.extend((await ingest_memory(messages, logs)).rows("ingest"))
    print("latency: XADD -> sink 250 ...", flush=True)
    rows.extend(await latency_rows(quick, logs))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full benchmarks, 100 000 messages")
    parser.add_argument("--messages", type=int, help="messages per RSS run")
    args = parser.parse_args()
    quick = not args.full
    messages = args.messages or (10_000 if quick else 100_000)
    logs = Path(tempfile.mkdtemp(prefix="mailpool-bench-"))
    started = time.monotonic()
    rows = asyncio.run(report(quick, messages, logs))
    print_table(rows)
    print(
        f"\n{'quick' if quick else 'full'} run, {time.monotonic() - started:.0f} s; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; outputs in {logs}"
    )
    flat = all("GROWING" not in r.note for r in rows)
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
