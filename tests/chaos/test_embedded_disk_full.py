"""A full disk under the embedded Redis of ``mailpool run``: every 250 survives a kill -9 of
Redis, every message sent while the disk is full gets a 4xx (and is not stored), and once
there is room again the pool takes mail without a restart.

The pool runs in a mount namespace of its own (``unshare``; with a user namespace when not
root) where its Redis directory is a small tmpfs, mostly taken by a filler file; the test
fills the rest with mail, then deletes the filler through ``/proc/<pid>/root``.  With
``appendfsync always`` Redis exits on the write it cannot persist, before replying, and the
pool starts it again; with ``everysec`` (the former default) it acknowledged such a write
and lost it in a crash (3 of 202 in one run).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.chaos.ledger import Ledger
from tests.chaos.scenario import (
    FULL,
    Replies,
    ledger_message,
    send_with_ledger,
    size,
    stored_entries,
    stored_ledger_ids,
)
from tests.harness import ROOT, child_env, free_port, wait_for_port, wait_until

DISK = 8 * 1024 * 1024  # the tmpfs under the pool's Redis
ROOM = 512 * 1024  # what the filler leaves for the AOF, about 50 messages
BODY = ("x" * 76 + "\r\n") * 100  # ~8 KB a message
WHEN_FULL = size(20, 200)  # messages sent while the disk is full
MOUNT_AND_RUN = (
    'mount -t tmpfs -o size="$1" tmpfs "$2" && head -c "$3" /dev/zero > "$2/filler" '
    '&& shift 3 && exec "$@"'
)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``mailpool run`` on a small disk: (process, SMTP port, its Redis directory)."""
    data_dir, port = tmp_path / "pool", free_port()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True)
    namespace = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    args = [
        "unshare", *namespace, "sh", "-c", MOUNT_AND_RUN, "sh", str(DISK), str(redis_dir),
        str(DISK - ROOM), sys.executable, "-m", "workers", "run", "--data-dir", str(data_dir),
        "--listen", f"127.0.0.1:{port}",
    ]  # fmt: skip
    with (tmp_path / "pool.log").open("wb") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=log, stderr=log)
        try:
            try:
                wait_for_port(port, timeout=30)
            except TimeoutError:  # e.g. no mount namespace here: unshare says why
                log.flush()
                tail = (tmp_path / "pool.log").read_text(errors="replace")[-800:]
                raise AssertionError(f"the pool on a small disk did not start: {tail}") from None
            yield process, port, redis_dir
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def redis_pid(port: int) -> int | None:
    """The redis-server listening on ``port``, by its process title (or command line)."""
    titles = (f"127.0.0.1:{port}".encode(), f"--port\0{port}\0".encode())
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"redis-server" in command and any(title in command for title in titles):
            return int(entry.name)
    return None


async def kill_9_and_wait_for_restart(url: str) -> aioredis.Redis:
    """kill -9 the pool's Redis (once it runs: the pool may be restarting it); once the
    pool has started it again, a client to it."""
    port = int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    deadline = time.monotonic() + 30
    pids: list[int] = []

    def running() -> bool:
        pids[:] = [pid] if (pid := redis_pid(port)) is not None else []
        return bool(pids)

    await wait_until(running, f"a redis-server on port {port}", timeout=30, interval=0.1)
    os.kill(pids[0], signal.SIGKILL)
    client = aioredis.Redis.from_url(url, socket_timeout=2)
    await asyncio.sleep(0.2)  # not asking the killed server, in case it is not gone yet
    left = deadline + 30 - time.monotonic()
    restarted = "the pool restarted its Redis"
    await wait_until(lambda: _answers(client), restarted, timeout=left, interval=0.2)
    return client


async def _answers(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (aioredis.ConnectionError, aioredis.ResponseError, OSError, TimeoutError):
        return False  # refused until restarted, then LOADING while it reads its AOF


async def send(port: int, ledger: Ledger, ids: list[str], *, retry: bool) -> Replies:
    replies = Replies()
    await asyncio.wait_for(
        send_with_ledger(
            port, ledger, ids, replies, retry_4xx=retry, give_up_after=30,
            make_message=lambda ledger_id: ledger_message(ledger_id, BODY),
        ),
        timeout=300 if FULL else 90,
    )  # fmt: skip
    return replies


async def stored_ids(client: aioredis.Redis) -> list[str | None]:
    return stored_ledger_ids(await stored_entries(client))


@pytest.mark.timeout(600 if FULL else 120)
async def test_full_disk_every_250_survives_a_crash_and_the_rest_get_4xx(
    pool: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, redis_dir = pool
    url = (redis_dir.parent / "redis.url").read_text().strip()
    ledger = Ledger("embedded-redis-disk-full")

    # Fill: send until the first refusal, then WHEN_FULL more while the disk is full.
    filling = await send(port, ledger, [f"fill-{n}" for n in range(2 * ROOM // len(BODY))],
                         retry=False)  # fmt: skip
    assert ledger.accepted and ledger.rejected, "the disk never filled up"
    when_full = await send(port, ledger, [f"full-{n}" for n in range(WHEN_FULL)], retry=False)
    full_codes = sorted({code for _, code in when_full.codes})

    # kill -9 while full: what got a 250 is there after the restart, nothing refused is.
    client = await kill_9_and_wait_for_restart(url)
    after_crash = await stored_ids(client)
    await client.aclose()
    lost_in_crash = set(ledger.accepted) - set(after_crash)
    stored_refused = set(ledger.rejected) & set(after_crash)

    # Room again (the filler goes): the refused messages' retries are taken, no restart.
    (Path(f"/proc/{process.pid}/root") / str(redis_dir).lstrip("/") / "filler").unlink()
    freed_at = time.monotonic()
    refused = sorted(ledger.rejected)
    retried = await send(port, ledger, refused, retry=True)
    resumed_in = time.monotonic() - freed_at
    client = await kill_9_and_wait_for_restart(url)
    ledger.record_all("stored", await stored_ids(client))
    await client.aclose()

    ledger.report(
        ["stored"],
        accepted_before_full=filling.count(lambda c: c == 250),
        when_full=len(when_full.codes),
        when_full_codes="/".join(map(str, full_codes)),
        lost_in_crash=len(lost_in_crash),
        stored_refused=len(stored_refused),
        retried_ok=retried.count(lambda c: c == 250),
        resumed_in_s=resumed_in,
    )
    assert not lost_in_crash, f"250 but gone after kill -9: {sorted(lost_in_crash)[:5]}"
    assert len(when_full.codes) == WHEN_FULL and all(400 <= c < 500 for c in full_codes)
    assert not stored_refused, f"refused yet stored: {sorted(stored_refused)[:5]}"
    assert not ledger.rejected, f"still refused with room again: {len(ledger.rejected)}"
    ledger.check(["stored"])
    assert process.poll() is None, "the pool died"
