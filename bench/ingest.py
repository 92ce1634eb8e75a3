"""Ingest benchmark: ``mailpool ingest`` (with a real redis-server) against a bare aiosmtpd
server whose handler only answers 250, measured alternately in the same run.

    python bench/ingest.py            # full matrix, ~2 minutes
    python bench/ingest.py --quick    # 2 KB at 10 sessions only
    python bench/ingest.py --haraka   # and against Haraka (cd bench/haraka && npm ci)
    python bench/ingest.py --verify   # and verifying (SPF/DKIM/DMARC/ARC) against not
    python bench/ingest.py --quick --against /tmp/other-checkout --rounds 7

With ``--against`` a second ``mailpool ingest`` runs from another checkout of this
repository (a ``git worktree`` of an earlier commit, or of a variant to compare), next to
this tree's, and the rounds alternate between the two (the order flips every round, so a
drift of the machine's load falls on both alike).  Printed then, per case: the median over
the rounds of this tree's rate divided by the other's, wall and per CPU-second; the latency
part is left out.

With ``--verify`` (as ``make bench`` runs it) a second ingest verifies received mail against
unbound on loopback answering for smtp-source's sender (SPF and DMARC pass; answers kept
after the warm-up, as a busy worker has them), and the rounds (``--verify-rounds``, 7)
alternate between it and the one that does not verify; then its end-of-DATA latency at half
its rate (issue 15's goal: ratio >= 0.85, p99 < 20 ms).

With ``--haraka`` (as ``make bench`` runs it) Haraka 3.3.4 from npm joins (bench/haraka,
locked), one process (``nodes=0``), whose only plugin accepts every recipient and discards
the message.  Two more tables give ingest/haraka per case, rounds alternating (issue 14's
goal: >= 1.0 with reused connections, >= 1.5 with new ones, msg/s and per CPU-second): both
at their default log level (info: ingest writes one JSON line per message, Haraka several
per transaction), then both logging warnings only (a second ingest and a second Haraka).
Haraka discards each message where ingest parses it and stores it in Redis; Redis's CPU is
not counted on ingest's side.  Every ingest here runs with verification off (Haraka's side
checks nothing either), but the one ``--verify`` adds.

Load: Postfix's ``smtp-source`` (test tool only; the Postfix daemon is never started) sends
2 KB and 20 KB messages over 10 and 50 parallel sessions, with connection reuse (``-d``: all
of a session's messages over one connection) and without (one connection per message).
Each server runs as its own process; its CPU time comes from /proc/PID/stat (utime+stime).

Printed per case: messages/second (wall), messages per CPU-second of the server process,
and the ratio ingest/bare of both (target: >= 0.70 on msg/s for 2 KB at 10 sessions, with
and without reuse).  Then the end-of-DATA -> 250 latency of ingest at half its measured
2 KB/10-session rate, from a paced asyncio client (client-side, so it includes the client's
own scheduling delay: a conservative figure; target p99 < 10 ms), next to the bare server's
at the same rate, and the server-side figure from ingest's own transaction histogram.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


# --- the bare baseline server (run as `python bench/ingest.py --bare-server PORT`) -------


def run_bare_server(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    class OnlyOk:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handler = OnlyOk()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bare.bench"), "127.0.0.1", port, backlog=1024
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())


# --- servers under test ---------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def start_bare() -> Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", str(port)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port)
    return Server("bare", process, port)


HARAKA_DIR = ROOT / "bench" / "haraka"
HARAKA_BIN = HARAKA_DIR / "node_modules" / ".bin" / "haraka"


def start_haraka(workdir: Path, log_level: str = "info") -> Server:
    """Haraka (npm, pinned in bench/haraka/package-lock.json) as one process (``nodes=0``)
    whose only plugin accepts every recipient and discards the message; ``info`` is its
    default log level (several lines per transaction)."""
    if not HARAKA_BIN.exists():
        raise SystemExit(
            "no Haraka: cd bench/haraka && npm ci (make bench does it for bench/report.py)"
        )
    port = free_port()
    instance = workdir / f"haraka-{log_level}"
    # Haraka's own installer writes its default configuration; three files are ours.
    subprocess.run([str(HARAKA_BIN), "-i", str(instance)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    (instance / "config" / "smtp.ini").write_text(f"listen=127.0.0.1:{port}\nnodes=0\n")
    (instance / "config" / "log.ini").write_text(f"[main]\nlevel={log_level}\n")
    (instance / "config" / "plugins").write_text("bench_discard\n")
    shutil.copy(HARAKA_DIR / "bench_discard.js", instance / "plugins" / "bench_discard.js")
    process = subprocess.Popen(
        [str(HARAKA_BIN), "-c", str(instance)], cwd=instance,
        stdout=(workdir / f"haraka-{log_level}.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(port, timeout=30)
    return Server(f"haraka ({log_level})", process, port)


def start_ingest(
    redis_url: str,
    log_path: Path,
    http_port: int,
    *,
    root: Path = ROOT,
    name: str = "ingest",
    log_level: str = "info",
    dns_server: str | None = None,
) -> Server:
    """``mailpool ingest`` of the checkout at ``root`` (its ``workers`` package comes first
    on the path, ahead of the one the venv has installed); verifying received mail against
    ``dns_server`` when given, else not (set by environment: an older checkout ignores it)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    if dns_server is None:
        env["MAILPOOL_VERIFY"] = "false"
    else:
        env["MAILPOOL_DNS_SERVER"] = dns_server
    # The real thing: one JSON log line per message, written to a file.
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "ingest", "--listen", f"127.0.0.1:{port}",
         "--redis-url", redis_url, "--hostname", "ingest.bench", "--log-format", "json",
         "--log-level", log_level, "--max-connections", "2000",
         "--http", f"127.0.0.1:{http_port}"],
        cwd=root, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(port)
    return Server(name, process, port)


# --- load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    size: int
    sessions: int
    reuse: bool
    messages: int

    @property
    def label(self) -> str:
        reuse = "reuse" if self.reuse else "new"
        return f"{self.size // 1024:>2} KB  {self.sessions:>2} sessions  {reuse}"


@dataclass
class Result:
    rate: float  # messages per second, wall clock
    per_cpu: float  # messages per CPU-second of the server process


def smtp_source(server: Server, case: Case) -> Result:
    args = [
        SMTP_SOURCE, "-s", str(case.sessions), "-m", str(case.messages), "-l", str(case.size),
        "-f", "bench@example.org", "-t", "sink@example.com", "-N", "-M", "client.bench",
    ]  # fmt: skip
    if case.reuse:
        args.append("-d")
    args.append(f"127.0.0.1:{server.port}")
    cpu_before = cpu_seconds(server.process.pid)
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    wall = time.perf_counter() - started
    cpu = cpu_seconds(server.process.pid) - cpu_before
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stdout} {done.stderr}")
    return Result(case.messages / wall, case.messages / max(cpu, 1e-9))


# --- latency at half load ---------------------------------------------------------------


async def _paced_session(
    port: int, interval: float, offset: float, count: int, body: bytes, latencies: list[float]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO latency.bench\r\n")
    await reply()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(offset)  # sessions spread over the interval: a steady arrival rate
    next_at = loop.time()
    for _ in range(count):
        writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(3):
            await reply()
        writer.write(body)
        writer.write(b".\r\n")
        sent = time.perf_counter()
        line = await reply()
        latencies.append(time.perf_counter() - sent)
        assert line.startswith(b"250"), line
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    writer.write(b"QUIT\r\n")
    writer.close()


async def measure_latency(port: int, rate: float, sessions: int, seconds: float) -> list[float]:
    # From the sender the --verify zones vouch for (SPF and DMARC pass when verifying).
    head = b"From: <a@example.org>\r\nSubject: latency\r\n\r\n"
    body = (head + (b"x" * 76 + b"\r\n") * 26)[:2048]
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    per_session = rate / sessions
    count = max(1, int(per_session * seconds))
    latencies: list[float] = []
    interval = 1 / per_session
    await asyncio.gather(
        *(
            _paced_session(port, interval, interval * n / sessions, count, body, latencies)
            for n in range(sessions)
        )
    )
    return latencies


def transaction_histogram(http_port: int) -> dict[float, float]:
    """Cumulative bucket counts of mailpool_ingest_transaction_seconds from /metrics."""
    with socket.create_connection(("127.0.0.1", http_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    buckets: dict[float, float] = {}
    for line in raw.decode().splitlines():
        if line.startswith("mailpool_ingest_transaction_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_percentile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """Upper bound of the histogram bucket holding the q-quantile of the new observations."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts[float("inf")]
    for bound, cumulative in counts.items():
        if cumulative >= q * total:
            return f"<= {bound * 1e3:g} ms"
    return "?"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report_latency(ingest: Server, bare: Server, http_port: int, rate: float, rounds: int) -> None:
    """p50/p99 of each server over alternating rounds; the median round is the figure."""
    p99s: dict[str, list[float]] = {ingest.name: [], bare.name: []}
    before = transaction_histogram(http_port)
    print(f"\nend-of-DATA -> 250 at {rate:.0f} msg/s (half of ingest's 2 KB/10-session rate):")
    for _ in range(rounds):
        for server in (ingest, bare):
            values = asyncio.run(measure_latency(server.port, rate, 10, 3.0))
            p50, p99 = percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3
            p99s[server.name].append(p99)
            print(
                f"  {server.name:<7} {len(values)} messages  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
            )
    after = transaction_histogram(http_port)
    print(
        f"  median p99: {ingest.name} {statistics.median(p99s[ingest.name]):.2f} ms, "
        f"bare {statistics.median(p99s[bare.name]):.2f} ms (client-side)"
    )
    print(
        "  ingest server-side (its histogram: parse + pack + XADD acknowledged): "
        f"p50 {bucket_percentile(before, after, 0.5)}, p99 {bucket_percentile(before, after, 0.99)}"
    )


# --- main -----------------------------------------------------------------------------


def cases(quick: bool) -> list[Case]:
    sizes = [2048] if quick else [2048, 20480]
    session_counts = [10] if quick else [10, 50]
    found = []
    for size in sizes:
        for sessions in session_counts:
            for reuse in (False, True):
                messages = (3000 if reuse else 1500) if size == 2048 else (1500 if reuse else 1000)
                found.append(Case(size, sessions, reuse, messages))
    return found


def against_bare(bare: Server, ingest: Server, quick: bool, rounds: int) -> float:
    """The table of ingest against the bare server; returns half of ingest's 2 KB/10-session
    rate with connection reuse (the rate the latency is measured at)."""
    print(f"{'case':<30} {'bare msg/s':>10} {'ingest msg/s':>12} {'ratio':>6}   "
          f"{'bare msg/cpu-s':>14} {'ingest msg/cpu-s':>16} {'ratio':>6}")  # fmt: skip
    half_rate = 0.0
    for case in cases(quick):
        bare_runs, ingest_runs = [], []
        for _ in range(rounds):
            bare_runs.append(smtp_source(bare, case))
            ingest_runs.append(smtp_source(ingest, case))
        a = statistics.median(r.rate for r in bare_runs)
        b = statistics.median(r.rate for r in ingest_runs)
        a_cpu = statistics.median(r.per_cpu for r in bare_runs)
        b_cpu = statistics.median(r.per_cpu for r in ingest_runs)
        print(
            f"{case.label:<30} {a:>10.0f} {b:>12.0f} {b / a:>6.2f}   "
            f"{a_cpu:>14.0f} {b_cpu:>16.0f} {b_cpu / a_cpu:>6.2f}",
            flush=True,
        )
        if case.size == 2048 and case.sessions == 10 and case.reuse:
            half_rate = b / 2
    return half_rate


def against_haraka(haraka: Server, ingest: Server, quick: bool, rounds: int, logging: str) -> None:
    """Ingest against Haraka, rounds alternating in order; the median of per-round ratios.
    Goal (issue 14): >= 1.0 with reused connections, >= 1.5 with new ones, msg/s and per
    CPU-second."""
    print(f"\ningest / haraka ({logging}), median of {rounds} alternating rounds:")
    print(f"{'case':<30} {'haraka msg/s':>12} {'ingest msg/s':>12} {'ratio':>6}   "
          f"{'haraka msg/cpu-s':>16} {'ingest msg/cpu-s':>16} {'ratio':>6}")  # fmt: skip
    for case in cases(quick):
        runs: dict[str, list[Result]] = {"haraka": [], "ingest": []}
        for round_number in range(rounds):
            pair = (haraka, ingest) if round_number % 2 == 0 else (ingest, haraka)
            for server in pair:
                side = "haraka" if server is haraka else "ingest"
                runs[side].append(smtp_source(server, case))
        rate = [statistics.median(r.rate for r in runs[n]) for n in ("haraka", "ingest")]
        cpu = [statistics.median(r.per_cpu for r in runs[n]) for n in ("haraka", "ingest")]
        rate_ratio = statistics.median(
            i.rate / h.rate for h, i in zip(runs["haraka"], runs["ingest"], strict=True)
        )
        cpu_ratio = statistics.median(
            i.per_cpu / h.per_cpu for h, i in zip(runs["haraka"], runs["ingest"], strict=True)
        )
        print(
            f"{case.label:<30} {rate[0]:>12.0f} {rate[1]:>12.0f} {rate_ratio:>6.2f}   "
            f"{cpu[0]:>16.0f} {cpu[1]:>16.0f} {cpu_ratio:>6.2f}",
            flush=True,
        )


def against_other_tree(
    ingest: Server, other: Server, quick: bool, rounds: int, *, title: str = ""
) -> None:
    """This tree's ingest against the other checkout's (or another configuration), rounds
    alternating in order; the figure is the median of the per-round ratios."""
    print(f"\n{title or 'this tree / ' + other.name}, median of {rounds} alternating rounds:")
    print(f"{'case':<30} {'msg/s ratio':>11} {'msg/cpu-s ratio':>15}   per-round msg/cpu-s ratios")
    for case in cases(quick):
        rate_ratios, cpu_ratios = [], []
        for round_number in range(rounds):
            pair = (ingest, other) if round_number % 2 == 0 else (other, ingest)
            result = {server.name: smtp_source(server, case) for server in pair}
            ours, theirs = result[ingest.name], result[other.name]
            rate_ratios.append(ours.rate / theirs.rate)
            cpu_ratios.append(ours.per_cpu / theirs.per_cpu)
        each = " ".join(f"{ratio:.2f}" for ratio in cpu_ratios)
        print(
            f"{case.label:<30} {statistics.median(rate_ratios):>11.3f} "
            f"{statistics.median(cpu_ratios):>15.3f}   {each}",
            flush=True,
        )


# What verification finds for smtp-source's mail (MAIL FROM and From bench@example.org,
# HELO client.bench, from 127.0.0.1): SPF pass for both identities, DMARC pass by SPF.
SENDER_ZONES = ["example.org", "client.bench"]
SENDER_RECORDS = {
    "example.org": [("TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')],
    "_dmarc.example.org": [("TXT", '"v=DMARC1; p=reject"')],
    "client.bench": [("TXT", '"v=spf1 a -all"'), ("A", "127.0.0.1")],
}


def against_verification(
    bare: Server, plain: Server, redis_url: str, workdir: Path, quick: bool, rounds: int
) -> None:
    """Ingest verifying (unbound on loopback answering for the sender) against ingest not
    verifying, alternating rounds; then the end-of-DATA latency with verification at half
    the verifying ingest's 2 KB/10-session rate.  Goal (issue 15): ratio >= 0.85, p99 under
    20 ms."""
    sys.path.insert(0, str(ROOT))
    from tests.dns_util import running_dns  # a test helper: only this bench needs it

    with running_dns(workdir / "dns", SENDER_ZONES, SENDER_RECORDS) as dns:
        http_port = free_port()
        verifying = start_ingest(
            redis_url, workdir / "verify.log", http_port, name="ingest --verify",
            dns_server=dns.address,
        )  # fmt: skip
        try:
            smtp_source(verifying, Case(2048, 10, True, 300))  # warm-up: DNS answers kept
            against_other_tree(verifying, plain, quick, rounds, title="verifying / not")
            rate = smtp_source(verifying, Case(2048, 10, True, 3000)).rate
            report_latency(verifying, bare, http_port, rate / 2, rounds + 1)
            check_verified(workdir / "verify.log")
        finally:
            verifying.stop()


def check_verified(log: Path) -> None:
    """The figures count only if ingest really verified: its log lines say what it found."""
    lines = [line for line in log.read_text().splitlines() if '"message_accepted"' in line]
    passed = [line for line in lines if '"spf": "pass"' in line and '"dmarc": "pass"' in line]
    if not lines or len(passed) != len(lines):
        raise RuntimeError(f"verification did not pass for {len(lines) - len(passed)} messages")
    print(f"  verified: {len(passed)} messages, SPF and DMARC pass for each")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per case")
    parser.add_argument(
        "--verify-rounds", type=int, default=7,
        help="alternating rounds of verifying / not (single rounds vary by half: 2 are noise)",
    )  # fmt: skip
    parser.add_argument("--against", type=Path, help="another checkout to compare ingest with")
    parser.add_argument("--haraka", action="store_true", help="also against Haraka (npm)")
    parser.add_argument(
        "--verify", action="store_true", help="also verifying (SPF/DKIM/DMARC/ARC) against not"
    )
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        run_bare_server(args.bare_server)
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="mailpool-bench-") as tmp,
        redis_server(Path(tmp)) as url,
    ):
        bare = start_bare()
        http_port = free_port()
        ingest = start_ingest(url, Path(tmp) / "ingest.log", http_port)
        servers = [bare, ingest]
        try:
            if args.against:
                other = start_ingest(
                    url, Path(tmp) / "other.log", free_port(), root=args.against.resolve(),
                    name=f"ingest of {args.against}",
                )  # fmt: skip
                servers.append(other)
            if args.haraka:
                # Each at its default log level (ingest: one line per message; Haraka:
                # several per transaction), and each quiet (warnings only).
                haraka = start_haraka(Path(tmp))
                haraka_quiet = start_haraka(Path(tmp), "warn")
                ingest_quiet = start_ingest(
                    url, Path(tmp) / "ingest-quiet.log", free_port(), name="ingest (warning)",
                    log_level="warning",
                )  # fmt: skip
                servers += [haraka, haraka_quiet, ingest_quiet]
            for server in servers:  # warm-up
                smtp_source(server, Case(2048, 10, True, 300))
            half_rate = against_bare(bare, ingest, args.quick, args.rounds)
            if args.haraka:
                against_haraka(haraka, ingest, args.quick, args.rounds,
                               "both at their default log level, info")  # fmt: skip
                against_haraka(haraka_quiet, ingest_quiet, args.quick, args.rounds,
                               "both logging warnings only")  # fmt: skip
            if args.against:
                against_other_tree(ingest, other, args.quick, args.rounds)
            else:
                report_latency(ingest, bare, http_port, half_rate, args.rounds + 1)
            if args.verify:
                against_verification(bare, ingest, url, Path(tmp), args.quick, args.verify_rounds)
        finally:
            for server in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
