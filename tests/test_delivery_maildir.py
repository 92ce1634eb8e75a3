"""``--relay maildir:PATH``: local delivery, one file per message, written tmp -> new."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    run_until_settled,
    running_worker,
    send_message,
    settled,
)
from tests.harness import wait_until


async def test_maildir_relay_writes_complete_files(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    maildir = tmp_path / "Maildir"
    for n in range(3):
        message = send_message(
            ["ann@example.com", "bob@example.com"],
            subject=f"Nachricht {n} – grün",
            message_id=f"md-{n}",
        )
        await enqueue(redis, message)
    await run_until_settled(redis, make_config(redis_url, f"maildir:{maildir}"))
    files = sorted((maildir / "new").iterdir())
    assert len(files) == 3
    assert list((maildir / "tmp").iterdir()) == []  # nothing half-written left behind
    subjects = set()
    for path in files:
        raw = path.read_bytes()
        assert b"\r\n" not in raw  # maildir files use the local line ending
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["return-path"] == "<app@example.com>"
        assert parsed["x-original-to"] == "ann@example.com, bob@example.com"
        subjects.add(str(parsed["subject"]))
    assert subjects == {f"Nachricht {n} – grün" for n in range(3)}
    delivered = [e for e in await events(redis) if e["event"] == "delivered"]
    assert sorted(e["id"] for e in delivered) == ["md-0", "md-1", "md-2"]


async def test_unwritable_maildir_defers(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    maildir = tmp_path / "Maildir"
    async with running_worker(make_config(redis_url, f"maildir:{maildir}")):
        await wait_until(lambda: _exists(maildir / "tmp"))
        (maildir / "tmp").rmdir()  # the directory vanished under the worker
        await enqueue(redis, send_message(["ann@example.com"]))
        await wait_until(lambda: _deferred(redis))
        (maildir / "tmp").mkdir()
        await wait_until(lambda: settled(redis))
    assert len(list((maildir / "new").iterdir())) == 1


async def _deferred(redis: aioredis.Redis) -> bool:
    return any(e["event"] == "deferred" for e in await events(redis))


async def _exists(path: Path) -> bool:
    return path.is_dir()
