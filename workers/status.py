"""``mailpool status``: what operators watch — stream length, group lag and pending,
oldest pending age, dead letters, retries waiting.

:func:`collect_status` is also what the metrics gauges and housekeeping read, so the table,
the JSON and ``/metrics`` always agree.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from workers.config import CommonConfig, option
from workers.streams.connection import as_text, one_shot_client
from workers.streams.keys import StreamKeys

# When Redis cannot tell a group's lag, status counts the entries after the group's
# last-delivered id itself, reading at most this many (XRANGE returns whole entries, so the
# count stays bounded); beyond it the lag stays unknown.
LAG_COUNT_LIMIT = 100


@dataclass
class StatusConfig(CommonConfig):
    json: bool = option(False, "print one JSON document instead of a table")
    watch: bool = option(False, "refresh until interrupted")
    interval: float = option(2.0, "seconds between refreshes with --watch")


def entry_time(entry_id: str) -> float:
    """Epoch seconds at which Redis generated an auto id ("<ms>-<seq>")."""
    return int(entry_id.partition("-")[0]) / 1000


async def count_after(redis: aioredis.Redis, stream: str, last_id: str, limit: int) -> int | None:
    """Entries of the stream after ``last_id``: a group's lag, counted; None above ``limit``."""
    entries = await redis.xrange(stream, min=f"({last_id}", max="+", count=limit + 1) or []
    return len(entries) if len(entries) <= limit else None


async def group_lag(
    redis: aioredis.Redis, stream: str, info: dict[str, Any], limit: int
) -> int | None:
    """The group's lag: what Redis says, else counted by us; None (unknown), never a guess.

    Redis answers nil when its read counter for the group is lost or cannot be used: after
    deletions inside the group's unread range, and on Redis before 7.4 after every restart
    or failover (XREADGROUP reaches the AOF and replicas as XCLAIM ... LASTID, which moves
    the group's position but not its counter), until a consumer reads up to the end.
    """
    lag = info.get("lag")
    if lag is not None:
        return int(lag)
    last_id = as_text(info.get("last-delivered-id"))
    if not last_id or limit <= 0:
        return None
    return await count_after(redis, stream, last_id, limit)


async def _group_status(
    redis: aioredis.Redis, stream: str, info: dict[str, Any], lag_limit: int
) -> dict[str, Any]:
    group = as_text(info["name"]) or ""
    pending = int(info["pending"])
    oldest: float | None = None
    if pending:
        summary = await redis.xpending(stream, group)
        if summary.get("min"):
            oldest = round(max(0.0, time.time() - entry_time(as_text(summary["min"]) or "0")), 3)
    return {
        "consumers": int(info["consumers"]),
        "pending": pending,
        "lag": await group_lag(redis, stream, info, lag_limit),  # None: unknown, never 0
        "oldest_pending_seconds": oldest,
        "last_delivered_id": as_text(info.get("last-delivered-id")),
    }


async def stream_status(
    redis: aioredis.Redis, stream: str, *, lag_limit: int = 0
) -> dict[str, Any] | None:
    """Length and groups of one stream; None when the stream does not exist.

    ``lag_limit``: how many entries a lag Redis cannot tell may be counted (0: none, for
    callers such as housekeeping that do not read the lag).
    """
    if await redis.type(stream) != b"stream":
        return None
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        groups = []
    return {
        "length": int(await redis.xlen(stream)),
        "groups": {
            as_text(g["name"]): await _group_status(redis, stream, g, lag_limit) for g in groups
        },
    }


async def collect_status(
    redis: aioredis.Redis, keys: StreamKeys, *, lag_limit: int = LAG_COUNT_LIMIT
) -> dict[str, Any]:
    """The snapshot behind the table, ``--json`` and the gauges.  ``lag_limit``: see
    :func:`stream_status` (the periodic gauge refresh passes 0)."""
    streams: dict[str, Any] = {}
    for name in (keys.receive, keys.send, keys.events):
        found = await stream_status(redis, name, lag_limit=lag_limit)
        if found is not None:
            streams[name] = found
    retry_key = keys.internal("retry")
    next_due = await redis.zrange(retry_key, 0, 0, withscores=True)
    return {
        "streams": streams,
        "dead_letters": int(await redis.xlen(keys.dead)),
        "retries_waiting": int(await redis.zcard(retry_key)),
        "next_retry_at": float(next_due[0][1]) if next_due else None,
    }


def _cell(value: object) -> str:
    return "unknown" if value is None else str(value)


def render_table(status: dict[str, Any]) -> str:
    header = ("STREAM", "LENGTH", "GROUP", "CONSUMERS", "LAG", "PENDING", "OLDEST PENDING s")
    rows: list[tuple[str, ...]] = [header]
    for name, stream in status["streams"].items():
        groups = stream["groups"] or {"-": None}
        for group, info in groups.items():
            if info is None:
                rows.append((name, str(stream["length"]), "-", "", "", "", ""))
                continue
            oldest = info["oldest_pending_seconds"]
            rows.append((
                name, str(stream["length"]), group, str(info["consumers"]), _cell(info["lag"]),
                str(info["pending"]), "-" if oldest is None else f"{oldest:.1f}",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    next_retry = status["next_retry_at"]
    due = "-" if next_retry is None else f"in {max(0.0, next_retry - time.time()):.0f}s"
    lines.append("")
    lines.append(f"dead letters: {status['dead_letters']}   retries waiting: "
                 f"{status['retries_waiting']} (next due: {due})")  # fmt: skip
    return "\n".join(lines)


async def main(config: StatusConfig) -> int:
    keys = StreamKeys.from_config(config)
    async with one_shot_client(config.redis_url) as redis:
        while True:
            status = await collect_status(redis, keys)
            if config.json:
                print(json.dumps(status), flush=True)
            else:
                if config.watch:
                    sys.stdout.write("\x1b[2J\x1b[H")  # clear the terminal between refreshes
                print(render_table(status), flush=True)
            if not config.watch:
                return 0
            await asyncio.sleep(config.interval)
