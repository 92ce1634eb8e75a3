"""Instructions per received message: ingest verifying (SPF, DKIM, DMARC, ARC) against
ingest not verifying, each a real ``mailpool ingest`` under valgrind's callgrind.

    python bench/instructions.py                  # 1000 messages each, about 2 minutes
    python bench/instructions.py --messages 3000

The CPU-time ratio of ``bench/ingest.py --verify`` moves by a tenth between runs on these
machines (single rounds from 0.7 to 1.2), so a cost of 10% is hard to tell from 15% there.
User-space instructions do not move: the same run repeated agrees to 0.1%.  Each ingest
takes ``smtp-source``'s 2 KB messages over 10 reused sessions from the sender the zones of
``bench/ingest.py --verify`` vouch for (unbound on loopback; SPF and DMARC pass); the count
starts after a warm-up (answers kept, caches filled) and covers the event loop, parsing,
packing, logging and the Redis client: everything the process does for the messages.
Printed: instructions per message of each, and not-verifying / verifying (issue 15's goal
on the CPU-time ratio: >= 0.85).  Instructions are not time (a cold cache costs time
without instructions), so this stands next to the CPU-time figure, not in its place.

Needs valgrind (``apt-get install valgrind``; ``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.ingest import (
    ROOT,
    SENDER_RECORDS,
    SENDER_ZONES,
    Case,
    Server,
    free_port,
    redis_server,
    smtp_source,
    wait_for_port,
)
from tests.dns_util import running_dns  # a test helper: only the benchmarks need it

WARM_UP = 300  # messages before the count starts: DNS answers kept, caches filled


def instructions_per_message(
    redis_url: str, dns_server: str | None, messages: int, workdir: Path
) -> float:
    """One ``mailpool ingest`` under callgrind (verifying against ``dns_server`` when given):
    its user-space instructions per message over ``messages`` messages after the warm-up."""
    name = "verifying" if dns_server else "plain"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPOOL_")}
    env["PYTHONPATH"] = str(ROOT)
    if dns_server is None:
        env["MAILPOOL_VERIFY"] = "false"
    else:
        env["MAILPOOL_DNS_SERVER"] = dns_server
    out = workdir / f"callgrind.{name}"
    port = free_port()
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
         sys.executable, "-m", "workers", "ingest", "--listen", f"127.0.0.1:{port}",
         "--redis-url", redis_url, "--hostname", "ingest.bench", "--log-format", "json",
         "--log-level", "info", "--max-connections", "2000"],
        cwd=ROOT, env=env, stdout=(workdir / f"{name}.log").open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = Server(name, process, port)
    try:
        wait_for_port(port, timeout=300)  # a Python start under valgrind: tens of seconds
        smtp_source(server, Case(2048, 10, True, WARM_UP))
        subprocess.run(["callgrind_control", "--zero", str(process.pid)], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        smtp_source(server, Case(2048, 10, True, messages))
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        dump = _wait_for_dump(out)
    finally:
        server.stop()
    return _summary(dump) / messages


def _wait_for_dump(out: Path) -> Path:
    """callgrind writes a requested dump as ``<file>.1`` once the process takes the request."""
    dump = out.with_name(out.name + ".1")
    deadline = time.monotonic() + 60
    while not (dump.exists() and "summary:" in dump.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no dump at {dump}")
        time.sleep(0.2)
    return dump


def _summary(dump: Path) -> int:
    """The dump's ``summary:`` line: instructions counted since the counters were zeroed."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {dump}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="counted per ingest")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("no valgrind: apt-get install valgrind (make bench installs it)")
        return 2
    with tempfile.TemporaryDirectory(prefix="mailpool-instructions-") as tmp:
        workdir = Path(tmp)
        with (
            redis_server(workdir) as url,
            running_dns(workdir / "dns", SENDER_ZONES, SENDER_RECORDS) as dns,
        ):
            plain = instructions_per_message(url, None, args.messages, workdir)
            verifying = instructions_per_message(url, dns.address, args.messages, workdir)
    print(f"instructions per message, 2 KB, 10 reused sessions ({args.messages} messages):")
    print(f"  ingest            {plain / 1000:8.1f}k")
    print(f"  ingest --verify   {verifying / 1000:8.1f}k")
    print(f"  not verifying / verifying: {plain / verifying:.3f} (goal on CPU time: >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
