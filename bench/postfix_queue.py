"""Postfix delivering from its own queue: bench/delivery.py's second anchor (``--postfix``).

A private Postfix instance (tests/postfix_util.py: its own configuration, queue and log under
/tmp; the system's Postfix is never touched) relays everything to the same ``smtp-sink``
as the other sides, over at most the same number of connections
(``smtp_destination_concurrency_limit``, reused: ``smtp_connection_cache_on_demand``).

A round, untimed first: ``smtp-source`` hands the messages to Postfix's smtpd, which puts
them on hold (``check_client_access static:HOLD``); Postfix stops.  Timed: its master
runs in the foreground as this process's child, ``postsuper -H ALL`` and ``postqueue -f``
release the held messages, and the clock stops when smtp-sink has counted them all.

CPU: everything Postfix ran for the round (master, qmgr, smtp, trivial-rewrite, the
release commands and ``postfix stop``), from ``getrusage(RUSAGE_CHILDREN)`` once they are
all reaped.  This process becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``) so
that the daemons the master leaves behind at its stop are ours to reap, and reaps the
filling's daemons before the round starts; the master's start-up before the clock starts
is counted too (a few hundredths of a second).  Postfix's processes are kept alive for the
whole round (``max_use``, ``max_idle``), as its delivery agents would be under steady load.

Not alike on both sides: Postfix logs as it does by default (a line or more per message,
through postlogd to its ``maillog_file``), and that CPU counts; the worker of
bench/delivery.py logs warnings only (``--log-level``), and its Redis's CPU is printed
apart (one ratio without it, one with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.postfix_util import POSTFIX, PrivatePostfix

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
DAEMONS = "/usr/lib/postfix/sbin/"
PR_SET_CHILD_SUBREAPER = 36
REAP_TIMEOUT = 30.0


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _daemon_names() -> frozenset[str]:
    """The process names (``comm``, at most 15 characters) of Postfix's daemons."""
    return frozenset(name[:15] for name in os.listdir(DAEMONS))


def _postfix_children(names: frozenset[str]) -> list[int]:
    """Our child processes that are Postfix daemons, running or exited and not yet reaped
    (orphans the subreaper took in).  Told by ``comm``, which a zombie keeps."""
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if parent == me and name in names:
            found.append(int(pid))
    return found


def reap_postfix() -> None:
    """Wait for every Postfix daemon that became our child to end, and reap it: its CPU then
    counts in ``RUSAGE_CHILDREN``.  Only those: the benchmark's other children (smtp-sink,
    redis-server) keep their exit status for their own ``Popen``."""
    names = _daemon_names()
    deadline = time.monotonic() + REAP_TIMEOUT
    while time.monotonic() < deadline:
        left = _postfix_children(names)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    raise SystemExit(f"Postfix daemons still running {REAP_TIMEOUT:.0f} s after its stop")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class PostfixQueue:
    """A private Postfix that queues messages on hold, then delivers them to ``sink_port``."""

    def __init__(self, sink_port: int, concurrency: int) -> None:
        become_subreaper()
        limit = str(concurrency)
        self.postfix = PrivatePostfix(
            sink_port,
            smtpd_data_restrictions="check_client_access static:HOLD",
            smtp_destination_concurrency_limit=limit,
            initial_destination_concurrency=limit,
            smtp_connection_cache_on_demand="yes",
            max_use="1000000",
            max_idle="3600",
        )
        self.conf = str(self.postfix.conf)

    def _run(self, *command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _running(self) -> bool:
        return subprocess.run([POSTFIX, "-c", self.conf, "status"], capture_output=True,
                              check=False).returncode == 0  # fmt: skip

    def _held(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.postfix.root / "queue" / "hold"))

    def fill(self, count: int, size: int, sessions: int) -> None:
        """``count`` messages of ``size`` octets on hold, Postfix stopped and reaped."""
        self.postfix.start()
        self._run(SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size), "-d",
                  "-f", "bench@example.org", "-t", "sink@example.com", "-N", "-M",
                  "client.bench", f"127.0.0.1:{self.postfix.port}")  # fmt: skip
        deadline = time.monotonic() + 60
        while self._held() < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postfix held {self._held()} of {count} messages after 60 s")
            time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        self._run(POSTFIX, "-c", self.conf, "stop")
        while self._running():
            time.sleep(0.02)
        reap_postfix()

    def deliver(self, arrived: Callable[[], bool], timeout: float) -> tuple[float, float]:
        """Release the held messages to a master of our own; (wall seconds until
        ``arrived()``, CPU seconds of everything Postfix ran)."""
        master = subprocess.Popen([DAEMONS + "master", "-d", "-c", self.conf],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while not self._running():
            if master.poll() is not None:
                raise SystemExit(f"Postfix's master exited ({master.returncode}) at start")
            time.sleep(0.01)
        cpu_before = children_cpu()  # the status checks above were children too
        started = time.perf_counter()
        self._run(POSTSUPER, "-c", self.conf, "-H", "ALL")
        self._run(POSTQUEUE, "-c", self.conf, "-f")
        while not arrived():
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"Postfix did not deliver its queue in {timeout:.0f} s")
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        self._run(POSTFIX, "-c", self.conf, "stop")
        master.wait(timeout=60)
        reap_postfix()
        return seconds, children_cpu() - cpu_before

    def close(self) -> None:
        if self._running():
            subprocess.run([POSTFIX, "-c", self.conf, "abort"], capture_output=True, check=False)
            reap_postfix()
        shutil.rmtree(self.postfix.root, ignore_errors=True)
