"""A private redis-server for ``mailpool run`` when no Redis URL is given.

It listens on a free loopback port, keeps its data (AOF, fsync every second) in the pool's
data directory and is stopped when the pool stops.  Its URL is written to
``<data dir>/redis.url`` so that ``mailpool send/listen/status`` started without
``--redis-url`` in the same directory talk to the same pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from workers.config import ConfigError
from workers.streams.connection import EMBEDDED_URL_FILE

log = structlog.get_logger("mailpool.embedded")

START_TIMEOUT = 10.0


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
