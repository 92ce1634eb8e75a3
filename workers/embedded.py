"""A private redis-server for ``mailpool run`` when no Redis URL is given.

It listens on a free loopback port, keeps its data (AOF, fsync every second) in the pool's
data directory and is stopped when the pool stops.  Its URL is written to
``<data dir>/redis.url`` so that ``mailpool send/listen/status`` started without
``--redis-url`` in the same directory talk to the same pool.

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


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path) -> AsyncIterator[str]:
    """Start redis-server with persistence in ``data_dir``; yield its URL; stop it on exit."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        raise ConfigError(
            "no --redis-url given and redis-server is not installed "
            "(run `make run`, which installs it, or apt-get install redis-server)"
        )
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    url_file = data_dir / EMBEDDED_URL_FILE
    await _refuse_second_pool(url_file)
    port = _free_loopback_port()
    url = f"redis://127.0.0.1:{port}/0"
    process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir.resolve()),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--maxmemory-policy", "noeviction", "--daemonize", "no",
        "--logfile", str((redis_dir / "redis.log").resolve()),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True, preexec_fn=_terminate_with_parent(),
    )  # fmt: skip
    try:
        await _wait_until_up(url, process)
        url_file.write_text(url + "\n")
        log.info("embedded_redis_started", url=url, data_dir=str(redis_dir), pid=process.pid)
        yield url
    finally:
        with contextlib.suppress(FileNotFoundError):
            url_file.unlink()
        if process.returncode is None:
            process.terminate()  # SIGTERM: redis-server flushes the AOF and exits
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.info("embedded_redis_stopped", url=url)


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
