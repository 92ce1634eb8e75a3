"""Real servers for the tests (a private redis-server per test session on a free port), the
environment of the ``python -m workers`` children they start, and the one bounded wait."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
ROOT = Path(__file__).resolve().parent.parent


def child_env(*, json_logs: bool = True, **variables: str) -> dict[str, str]:
    """The environment of a ``python -m workers`` child: this one without any ``MAILPOOL_``
    setting (the runner's own must not leak into what a test configures), the repository
    importable, logs as JSON lines unless ``json_logs`` is false, verification off, then
    ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if json_logs:
        env["MAILPOOL_LOG_FORMAT"] = "json"
    # No DNS query leaves the machine from a test: verification (on by default) is off unless
    # the test turns it on with its own DNS server.
    env["MAILPOOL_VERIFY"] = "false"
    env.update(variables)
    return env


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    what: str = "the condition",
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` (a plain or an async function) until it is true; AssertionError naming
    ``what`` when it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = check()
        if await outcome if inspect.isawaitable(outcome) else outcome:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"not within {timeout}s: {what}")


def wait_until_blocking(
    check: Callable[[], bool], what: str = "the condition", *, timeout: float = 15.0
) -> None:
    """``wait_until`` for a test that has no event loop of its own (one driving subprocesses)."""
    asyncio.run(wait_until(check, what, timeout=timeout))


def _ports_below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range, where no connection a parallel test opens
    takes one as its own address between free_port's choice and the server's bind (on CI
    a Redis Cluster node lost its port so, and 24 tests with it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12_000), low)


_PORTS = _ports_below_ephemeral()
_handed_out: set[int] = set()  # by this process: never the same port twice
_choice = random.Random().choice  # its own generator: a test seeding random changes nothing


def free_port() -> int:
    """A loopback port nobody listens on right now, not handed out before by this process,
    from under the ephemeral range (never Redis's default 6379)."""
    if len(_handed_out) > len(_PORTS) // 2:
        _handed_out.clear()  # a long run: the earliest are long released
    while True:
        port = _choice(_PORTS) if len(_PORTS) > 1000 else 0
        if port in _handed_out or port == 6379:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        if port != 6379:
            _handed_out.add(port)
            return port


@contextlib.asynccontextmanager
async def silent_redis() -> AsyncIterator[str]:
    """A TCP peer that takes connections and never answers: a stalled (or cut-off) Redis primary."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in held:
            writer.close()
        server.close()


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class RedisServer:
    """A redis-server child process on 127.0.0.1 with its own data directory.

    ``stop()``/``start()`` keep the port and directory, so tests can take Redis away and
    bring it back (with AOF on, what it acknowledged survives the restart).
    """

    def __init__(self, data_dir: Path, *, appendonly: bool = False, extra: list[str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.appendonly = appendonly
        self.extra = list(extra or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--logfile", str(self.data_dir / "redis.log"), *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def cli(self, *args: str) -> str:
        """Run redis-cli against this server (for set-up steps such as CONFIG SET)."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, check=True, timeout=10
        )
        return out.stdout.decode().strip()


@contextlib.contextmanager
def running_redis(data_dir: Path, **kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(data_dir, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


T = TypeVar("T")


async def longest_stall(awaitable: Awaitable[T]) -> tuple[T, float]:
    """``awaitable``'s result, and the longest the event loop went without running a timer
    due every 10 ms meanwhile (seconds): how long it held up every other session."""
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    ticker = loop.call_soon(lambda: None)

    def tick() -> None:
        nonlocal ticker
        ticks.append(time.monotonic())
        ticker = loop.call_later(0.01, tick)

    tick()
    try:
        result = await awaitable
    finally:
        ticker.cancel()
    ticks.append(time.monotonic())
    return result, max(later - earlier for earlier, later in itertools.pairwise(ticks))


def verification_threads_idle() -> bool:
    """Whether no work holds or waits for verification's threads (a test that fills them
    first waits for earlier tests' work to end)."""
    from workers.verify import dkim

    taken = [dkim._admitted.acquire(blocking=False) for _ in range(dkim.AT_ONCE)]
    for acquired in taken:
        if acquired:
            dkim._admitted.release()
    return all(taken)
