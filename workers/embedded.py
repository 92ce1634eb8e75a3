"""A private redis-server for ``mailpool run`` when no Redis URL is given.

It listens on a free loopback port, keeps its data in the pool's data directory and is
stopped when the pool stops.  Its URL is written to ``<data dir>/redis.url`` so that
``mailpool send/listen/status`` started without ``--redis-url`` in the same directory talk
to the same pool.

Persistence is the AOF with ``appendfsync always``: Redis writes and fsyncs a command before
it replies, so every ``250`` of ingest survives a crash of Redis or of the machine.  With
``everysec`` a reply may go out before its write (up to two seconds under fsync pressure), and
on a full disk Redis acknowledges the write it then fails to persist; with ``always`` it
exits instead (it cannot take back a command it applied), before any reply of that round
goes out.  The pool then starts it again, after a growing pause: while the disk stays full
each restart ends at the next write, ingest answers ``451`` meanwhile, and once there is room
Redis carries on.  ``always`` costs throughput; README's Guarantees has the measured ratio.

The server runs in a session (and process group) of its own: Ctrl-C in a terminal signals the
whole foreground group, and the pool needs its Redis until ingest and delivery have drained,
so only the pool stops it, last.  On Linux it also gets SIGTERM (and so flushes its AOF and
exits) when the pool dies without stopping it, e.g. after ``kill -9``: the parent-death
signal of ``prctl(2)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from workers.config import ConfigError
from workers.streams.connection import EMBEDDED_URL_FILE

log = structlog.get_logger("mailpool.embedded")

START_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
APPENDFSYNC = "always"  # see the module docstring
RESTART_DELAY = 0.5  # seconds before starting a redis-server that exited, doubling ...
RESTART_DELAY_CAP = 10.0  # ... up to this; back to RESTART_DELAY after a run this long


def _terminate_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when its parent dies.

    The libc function is looked up here, before the fork: the child between fork and exec
    should do as little as possible.  If the parent died before the request was made, the
    child has been re-parented already and exits instead of serving an orphaned pool.  Linux
    ties the signal to the forking thread: here the event loop's, which lives as long as the
    pool does.
    """
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the server outlives a pool killed with SIGKILL
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def request_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return request_parent_death_signal


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _ping(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


async def _refuse_second_pool(url_file: Path) -> None:
    """Two pools on one data directory would share (and fight over) one AOF file."""
    if url_file.is_file():
        recorded = url_file.read_text().strip()
        if await _ping(recorded):
            raise ConfigError(
                f"another mailpool run already uses {url_file.parent} (redis at {recorded}); "
                "stop it, or pass --data-dir or --redis-url"
            )
        url_file.unlink()


def redis_arguments(binary: str, port: int, redis_dir: Path, appendfsync: str) -> list[str]:
    """The command line of the embedded redis-server (the bench starts the same)."""
    directory = redis_dir.resolve()
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "",
        "--maxmemory-policy", "noeviction", "--daemonize", "no",
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip


def redis_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        raise ConfigError(
            "no --redis-url given and redis-server is not installed "
            "(run `make run`, which installs it, or apt-get install redis-server)"
        )
    return binary


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path, *, appendfsync: str = APPENDFSYNC) -> AsyncIterator[str]:
    """Start redis-server with persistence in ``data_dir``; yield its URL; stop it on exit.

    Meanwhile a redis-server that exits on its own (a full disk, a crash) is started again.
    """
    binary = redis_binary()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    url_file = data_dir / EMBEDDED_URL_FILE
    await _refuse_second_pool(url_file)
    port = _free_loopback_port()
    server = _Server(redis_arguments(binary, port, redis_dir, appendfsync), port, redis_dir)
    await server.start()
    keeper = asyncio.create_task(server.keep_running(), name="embedded-redis-keeper")
    try:
        url_file.write_text(server.url + "\n")
        log.info("embedded_redis_started", url=server.url, data_dir=str(redis_dir),
                 pid=server.pid, appendfsync=appendfsync)  # fmt: skip
        yield server.url
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        with contextlib.suppress(FileNotFoundError):
            url_file.unlink()
        await server.stop()
        log.info("embedded_redis_stopped", url=server.url)


class _Server:
    """The redis-server child process, started again whenever it exits on its own."""

    def __init__(self, arguments: list[str], port: int, redis_dir: Path) -> None:
        self.arguments = arguments
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log_file = redis_dir / "redis.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.arguments, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_terminate_with_parent(),
        )  # fmt: skip
        await _wait_until_up(self.url, self.process)

    async def keep_running(self) -> None:
        delay = RESTART_DELAY
        loop = asyncio.get_running_loop()
        while self.process is not None:
            started = loop.time()
            status = await self.process.wait()
            if loop.time() - started > RESTART_DELAY_CAP:
                delay = RESTART_DELAY
            log.error("embedded_redis_exited", status=status, reason=_last_warning(self.log_file),
                      restart_in=delay, log_file=str(self.log_file))  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_CAP)
            try:
                await self.start()
            except ConfigError as exc:  # it exited again at start: the loop waits, retries
                log.error("embedded_redis_restart_failed", error=str(exc))
                continue
            log.info("embedded_redis_restarted", url=self.url, pid=self.pid)

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()  # SIGTERM: redis-server flushes the AOF and exits
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _last_warning(log_file: Path) -> str:
    """The last warning redis-server logged (e.g. why it exited), or ""."""
    try:
        with open(log_file, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - 4096, 0))
            tail = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    warnings = [line.split(" # ", 1)[1] for line in tail if " # " in line]
    return warnings[-1] if warnings else ""


async def _wait_until_up(url: str, process: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while loop.time() < deadline:
        if process.returncode is not None:
            raise ConfigError(f"redis-server exited at start (status {process.returncode})")
        if await _ping(url):
            return
        await asyncio.sleep(0.05)
    raise ConfigError(f"redis-server did not answer within {START_TIMEOUT:.0f}s")
