"""The ingest worker's glibc tuning (workers/ingest/memory.py, ``tune_allocator``).

* Receiving mail takes no new memory from the system once the worker is warm: asyncio
  reads every socket into a fresh 256 KiB buffer, which must come from a heap and go back
  to it.  At a fixed mmap threshold of 256 KiB each read was a mapping of its own: nine
  page faults and fifteen system calls per 2 KB message, a fifth of ingest's CPU.
* A buffer of a message's size is still a mapping of its own, given back on ``free``
  (checked in a fresh Python process: the allocator's settings are process-wide).
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ingest_util import IngestProcess, SMTPConn, message

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")

SESSIONS = 10
WARM_UP = 30  # messages per session before counting
COUNTED = 100  # messages per session counted


def minor_faults(pid: int) -> int:
    """Page faults served without I/O: each a page the process took from the system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[7])


async def _session(port: int, count: int) -> None:
    conn = await SMTPConn.open_session(port)
    try:
        for number in range(count):
            assert (await conn.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
            assert (await conn.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            assert (await conn.cmd("DATA"))[0] == 354
            body = f"message {number}\r\n" + "x" * 76 + "\r\n" * 25
            code, _ = await conn.cmd(message(body=body) + b".")
            assert code == 250
    finally:
        await conn.close()


async def test_receiving_mail_takes_no_new_memory_once_warm(
    redis_url: str, ingest_workers: Callable[..., IngestProcess]
) -> None:
    worker = ingest_workers(redis_url, "--no-verify")
    assert worker.process is not None
    await asyncio.gather(*(_session(worker.port, WARM_UP) for _ in range(SESSIONS)))
    before = minor_faults(worker.process.pid)
    await asyncio.gather(*(_session(worker.port, COUNTED) for _ in range(SESSIONS)))
    per_message = (minor_faults(worker.process.pid) - before) / (SESSIONS * COUNTED)
    # Before the fix: about 9 (a fault per socket read and more); now 0.03.  msgpack
    # 1.0.5 (the lowest version the project allows) maps a 1 MiB packing buffer for
    # every packb: one fault per message more.
    assert per_message < 2.0, f"{per_message:.2f} page faults per message"


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter after ``tune_allocator()``; its stdout."""
    program = "from workers.ingest.memory import tune_allocator\n"
    program += "assert tune_allocator(), 'not glibc'\n" + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=env,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_message_sized_buffers_are_mappings_of_their_own() -> None:
    """400 KB buffers (a message of that size as received) are not taken from a heap,
    where a later, longer-lived allocation would pin them, once the heap has no free block
    left that fits (glibc fills those first: a fresh interpreter that compiled its modules
    has some).  So they go back to the system on ``free``."""
    out = _run("""
        def heap_ranges():
            with open("/proc/self/maps") as maps:
                for line in maps:
                    if line.rstrip().endswith("[heap]"):
                        start, end = line.split()[0].split("-")
                        yield int(start, 16), int(end, 16)

        buffers = [b"x" * 400_000 for _ in range(64)]  # 25 MB: more than any heap's holes
        print(any(start <= id(buffers[-1]) < end for start, end in heap_ranges()))
    """)
    assert out.strip() == "False", "400 KB buffers are taken from the heap"
