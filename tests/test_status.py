"""`mailpool status`: length, groups, lag (unknown stays unknown), pending, oldest pending
age, dead letters, retries waiting — as a table and as the contract's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import redis.asyncio as aioredis

from workers.status import collect_status, render_table
from workers.streams.keys import StreamKeys

KEYS = StreamKeys()


async def test_counts_lag_pending_and_oldest_pending_age(redis: aioredis.Redis) -> None:
    for n in range(5):
        await redis.xadd(KEYS.send, {"data": f"m{n}"})
    await redis.xgroup_create(KEYS.send, "delivery", id="0")
    await redis.xreadgroup("delivery", "w1", {KEYS.send: ">"}, count=2)
    await redis.xadd(KEYS.dead, {"data": "x", "reason": "invalid"})
    await redis.zadd(KEYS.internal("retry"), {"a": time.time() + 30, "b": time.time() + 60})

    status = await collect_status(redis, KEYS)

    group = status["streams"][KEYS.send]["groups"]["delivery"]
    assert status["streams"][KEYS.send]["length"] == 5
    assert (group["consumers"], group["pending"], group["lag"]) == (1, 2, 3)
    assert 0 <= group["oldest_pending_seconds"] < 30
    assert status["dead_letters"] == 1
    assert status["retries_waiting"] == 2
    assert status["next_retry_at"] > time.time()


async def test_unknown_lag_after_deletion_is_null_not_zero(redis: aioredis.Redis) -> None:
    ids = [await redis.xadd(KEYS.receive, {"data": f"m{n}"}) for n in range(4)]
    await redis.xgroup_create(KEYS.receive, "app", id="0")
    await redis.xreadgroup("app", "c", {KEYS.receive: ">"}, count=1)
    await redis.xdel(KEYS.receive, ids[2])  # a deletion inside the group's unread range
    status = await collect_status(redis, KEYS)
    group = status["streams"][KEYS.receive]["groups"]["app"]
    assert group["lag"] is None
    assert "unknown" in render_table(status)


def test_status_json_command_prints_the_contract_shape(redis_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--json", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["streams"] == {}
    assert (status["dead_letters"], status["retries_waiting"]) == (0, 0)


def test_bad_redis_url_stops_with_one_line_and_status_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--redis-url", "http://nope"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "--redis-url" in out.stderr
