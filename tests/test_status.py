"""`mailpool status`: length, groups, lag (counted when Redis cannot tell; unknown stays
unknown), pending, oldest pending age, dead letters, retries waiting — as a table and as the
contract's JSON."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import redis as syncredis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.harness import ROOT, RedisServer
from workers.health import refresh_stream_gauges
from workers.metrics import STREAM_LAG
from workers.status import render_table
from workers.streams.layout import StreamKeys
from workers.streams.snapshot import LAG_COUNT_LIMIT, collect_status

KEYS = StreamKeys()


async def test_counts_lag_pending_and_oldest_pending_age(redis: aioredis.Redis) -> None:
    for n in range(5):
        await redis.xadd(KEYS.send, {"data": f"m{n}"})
    await redis.xgroup_create(KEYS.send, "delivery", id="0")
    await redis.xreadgroup("delivery", "w1", {KEYS.send: ">"}, count=2)
    await redis.xadd(KEYS.dead, {"data": "x", "reason": "invalid"})
    await redis.zadd(KEYS.retry_schedule, {"a": time.time() + 30, "b": time.time() + 60})

    status = await collect_status(redis, KEYS)

    group = status.streams[KEYS.send].groups["delivery"]
    assert status.streams[KEYS.send].length == 5
    assert (group.consumers, group.pending, group.lag) == (1, 2, 3)
    assert group.oldest_pending_seconds is not None
    assert 0 <= group.oldest_pending_seconds < 30
    assert status.dead_letters == 1
    assert status.retries_waiting == 2
    assert status.next_retry_at is not None
    assert status.next_retry_at > time.time()


async def raw_lag(redis: aioredis.Redis, stream: str, group: str) -> int | None:
    """The lag Redis itself reports (XINFO GROUPS), None for its nil."""
    (info,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == group.encode()]
    lag: int | None = info["lag"]
    return lag


async def add(redis: aioredis.Redis, stream: str, count: int) -> list[bytes]:
    pipe = redis.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(stream, {"data": f"m{n}"})
    return list(await pipe.execute())


async def test_lag_after_a_deletion_is_counted(redis: aioredis.Redis) -> None:
    ids = await add(redis, KEYS.receive, 4)
    await redis.xgroup_create(KEYS.receive, "app", id="0")
    await redis.xreadgroup("app", "c", {KEYS.receive: ">"}, count=1)
    await redis.xdel(KEYS.receive, ids[2])  # a deletion inside the group's unread range
    assert await raw_lag(redis, KEYS.receive, "app") is None  # Redis cannot tell
    status = await collect_status(redis, KEYS)
    assert status.streams[KEYS.receive].groups["app"].lag == 2  # ids[1], ids[3]


async def test_the_gauge_refresh_does_not_read_messages_to_count_a_lag(
    redis: aioredis.Redis,
) -> None:
    """/metrics refreshes all the time and XRANGE returns whole messages: the gauges leave
    a lag Redis cannot tell unknown (no series) instead of reading entries to count it."""
    ids = await add(redis, KEYS.receive, 4)
    await redis.xgroup_create(KEYS.receive, "app", id="0")
    await redis.xreadgroup("app", "c", {KEYS.receive: ">"}, count=1)
    await redis.xdel(KEYS.receive, ids[2])
    STREAM_LAG.labels(KEYS.receive, "app").set(99)  # a stale value the refresh must drop
    stop = asyncio.Event()
    refresh = asyncio.create_task(refresh_stream_gauges(redis, KEYS, stop))
    await asyncio.sleep(0.3)
    stop.set()
    await refresh
    lag = REGISTRY.get_sample_value("mailpool_stream_lag", {"stream": KEYS.receive, "group": "app"})
    assert lag is None
    assert REGISTRY.get_sample_value("mailpool_stream_pending", {
        "stream": KEYS.receive, "group": "app"
    }) == 1  # fmt: skip  # the refresh did run


async def test_lag_beyond_what_status_counts_is_null_not_zero(redis: aioredis.Redis) -> None:
    ids = await add(redis, KEYS.receive, LAG_COUNT_LIMIT + 3)
    await redis.xgroup_create(KEYS.receive, "app", id="0")
    await redis.xreadgroup("app", "c", {KEYS.receive: ">"}, count=1)
    await redis.xdel(KEYS.receive, ids[1])  # LAG_COUNT_LIMIT + 1 entries wait
    status = await collect_status(redis, KEYS)
    assert status.streams[KEYS.receive].groups["app"].lag is None
    assert "unknown" in render_table(status)


async def restarted_after_reads(
    make_redis: Callable[..., RedisServer], entries: int, read: int
) -> aioredis.Redis:
    """A stream of ``entries`` sends whose ``delivery`` group read ``read`` of them, on a
    Redis (AOF on, nothing deleted) stopped and started since; a client of the new one."""
    server = make_redis(appendonly=True)
    redis = aioredis.Redis.from_url(server.url)
    await add(redis, KEYS.send, entries)
    await redis.xgroup_create(KEYS.send, "delivery", id="0")
    await redis.xreadgroup("delivery", "w", {KEYS.send: ">"}, count=read)
    await redis.aclose()
    server.stop()
    server.start()
    return aioredis.Redis.from_url(server.url)


async def delivery_lag(redis: aioredis.Redis) -> int | None:
    return (await collect_status(redis, KEYS)).streams[KEYS.send].groups["delivery"].lag


async def test_lag_is_known_after_a_plain_redis_restart(
    make_redis: Callable[..., RedisServer],
) -> None:
    """No deletion at all: Redis before 7.4 reloads XREADGROUP from the AOF as XCLAIM ...
    LASTID, which restores the group's position but not its read counter, so XINFO GROUPS
    answers nil.  Status counts the entries after the position instead."""
    redis = await restarted_after_reads(make_redis, entries=5, read=2)
    try:
        assert await raw_lag(redis, KEYS.send, "delivery") in (None, 3)  # None before 7.4
        assert await delivery_lag(redis) == 3
    finally:
        await redis.aclose()


async def test_new_sends_after_a_restart_count_as_lag_for_an_idle_group(
    make_redis: Callable[..., RedisServer],
) -> None:
    """The case that matters for scaling to zero: the group had read everything, Redis
    restarted, then a send arrives.  Redis before 7.4 says nil (KEDA reads it as no lag)."""
    redis = await restarted_after_reads(make_redis, entries=3, read=3)
    try:
        assert await delivery_lag(redis) == 0
        await redis.xadd(KEYS.send, {"data": "new"})
        assert await raw_lag(redis, KEYS.send, "delivery") in (None, 1)  # None before 7.4
        assert await delivery_lag(redis) == 1
    finally:
        await redis.aclose()


def test_status_json_command_prints_the_contract_shape(redis_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--json", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["streams"] == {}
    assert (status["dead_letters"], status["retries_waiting"]) == (0, 0)


def test_table_command_shows_a_counted_lag(redis_url: str) -> None:
    """The CLI path: a lag Redis cannot tell is shown as counted, not "unknown"."""
    client = syncredis.Redis.from_url(redis_url)
    ids = [client.xadd(KEYS.receive, {"data": f"m{n}"}) for n in range(4)]
    client.xgroup_create(KEYS.receive, "app", id="0")
    client.xdel(KEYS.receive, ids[1])
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    (row,) = [line.split() for line in out.stdout.splitlines() if line.startswith(KEYS.receive)]
    assert row[:5] == [KEYS.receive, "3", "app", "0", "3"]


def test_bad_redis_url_stops_with_one_line_and_status_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--redis-url", "http://nope"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "--redis-url" in out.stderr


def test_watch_rides_out_a_redis_outage(make_redis: Callable[..., RedisServer]) -> None:
    """``--watch`` refreshes until interrupted: a Redis away for a moment (a failover, a
    restart) is said on stderr and looked at again (before, the first failed refresh ended
    the command with status 1)."""
    server = make_redis()
    watch = subprocess.Popen(
        [sys.executable, "-m", "workers", "status", "--watch", "--json", "--interval", "0.2",
         "--redis-url", server.url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        server.stop()
        time.sleep(1.0)
        assert watch.poll() is None, watch.communicate()
        server.start()
        syncredis.Redis(port=server.port).xadd(KEYS.send, {"data": "after"})
        time.sleep(1.5)
        assert watch.poll() is None, watch.communicate()
    finally:
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    assert "cannot use Redis" in err and "Traceback" not in err
    last = json.loads(out.splitlines()[-1])  # refreshed again once Redis was back
    assert last["streams"][KEYS.send]["length"] == 1, last
