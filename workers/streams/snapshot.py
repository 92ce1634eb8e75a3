"""Reading the status snapshot: stream lengths, group lag and pending, dead letters, retries.

``mailpool status`` renders it, the stream gauges export it and housekeeping reads the
groups' positions from it, so the table, the JSON and ``/metrics`` always agree.  The
snapshot's types are in :mod:`workers.streams.layout`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from workers.streams import layout
from workers.streams.connection import as_text, describe_failure
from workers.streams.layout import GroupStatus, Snapshot, StreamKeys, StreamStatus

# When Redis cannot tell a group's lag, status counts the entries after the group's
# last-delivered id itself, reading at most this many (XRANGE returns whole entries, so the
# count stays bounded); beyond it the lag stays unknown.
LAG_COUNT_LIMIT = 100


async def count_after(redis: aioredis.Redis, stream: str, last_id: str, limit: int) -> int | None:
    """Entries of the stream after ``last_id``: a group's lag, counted; None above ``limit``."""
    after = layout.exclusive(last_id)
    entries = await redis.xrange(stream, min=after, max="+", count=limit + 1) or []
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
) -> GroupStatus:
    group = as_text(info["name"]) or ""
    pending = int(info["pending"])
    oldest: float | None = None
    if pending:
        summary = await redis.xpending(stream, group)
        if summary.get("min"):
            age = time.time() - layout.id_time(as_text(summary["min"]) or layout.MIN_ID)
            oldest = round(max(0.0, age), 3)
    return GroupStatus(
        consumers=int(info["consumers"]),
        pending=pending,
        lag=await group_lag(redis, stream, info, lag_limit),
        oldest_pending_seconds=oldest,
        last_delivered_id=as_text(info.get("last-delivered-id")),
    )


async def stream_status(
    redis: aioredis.Redis, stream: str, *, lag_limit: int = 0
) -> StreamStatus | None:
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
    return StreamStatus(
        length=int(await redis.xlen(stream)),
        groups={
            as_text(g["name"]): await _group_status(redis, stream, g, lag_limit) for g in groups
        },
    )


async def collect_status(
    redis: aioredis.Redis, keys: StreamKeys, *, lag_limit: int = LAG_COUNT_LIMIT
) -> Snapshot:
    """The snapshot behind the table, ``--json`` and the gauges.  ``lag_limit``: see
    :func:`stream_status` (the periodic gauge refresh passes 0)."""
    streams: dict[str, StreamStatus] = {}
    for name in (keys.receive, keys.send, keys.events):
        found = await stream_status(redis, name, lag_limit=lag_limit)
        if found is not None:
            streams[name] = found
    next_due = await redis.zrange(keys.retry_schedule, 0, 0, withscores=True)
    return Snapshot(
        streams=streams,
        dead_letters=int(await redis.xlen(keys.dead)),
        retries_waiting=int(await redis.zcard(keys.retry_schedule)),
        next_retry_at=float(next_due[0][1]) if next_due else None,
    )


async def collect_partitions(
    clients: Sequence[aioredis.Redis],
    partitions: Sequence[StreamKeys],
    *,
    lag_limit: int = LAG_COUNT_LIMIT,
) -> Snapshot:
    """One snapshot of every partition: each partition's streams under their own names
    (receive streams first, partition by partition, then send, then events), dead letters
    and retries waiting summed, the soonest retry."""
    parts = [
        await collect_status(client, keys, lag_limit=lag_limit)
        for client, keys in zip(clients, partitions, strict=True)
    ]
    if len(parts) == 1:
        return parts[0]
    names = [name for kind in STREAM_KINDS for name in (getattr(k, kind) for k in partitions)]
    found = {name: s for p in parts for name, s in p.streams.items()}
    due = [p.next_retry_at for p in parts if p.next_retry_at is not None]
    return Snapshot(
        streams={name: found[name] for name in names if name in found},
        dead_letters=sum(p.dead_letters for p in parts),
        retries_waiting=sum(p.retries_waiting for p in parts),
        next_retry_at=min(due) if due else None,
    )


# --- totals across partitions ----------------------------------------------------------------
# The StreamKeys fields of the streams a snapshot shows, in the order it shows them.
STREAM_KINDS = ("receive", "send", "events")


@dataclass(frozen=True)
class GroupTotal:
    """One group over every partition where it exists."""

    partitions: int  # how many partitions' streams have the group
    pending: int
    # Summed; None (unknown) when any partition's lag is unknown: the sum of the others
    # would understate it, and a low lag reads as "nearly caught up".
    lag: int | None
    oldest_pending_seconds: float | None  # the oldest of all partitions


@dataclass(frozen=True)
class StreamTotal:
    """One stream base name (``email.send``) over every partition whose stream exists."""

    partitions: int
    length: int
    groups: dict[str, GroupTotal]


def partition_totals(
    snapshot: Snapshot, base: StreamKeys, partitions: Sequence[StreamKeys]
) -> dict[str, StreamTotal]:
    """Each stream base name's partitions summed, for the streams that exist somewhere."""
    totals: dict[str, StreamTotal] = {}
    for kind in STREAM_KINDS:
        names = (getattr(keys, kind) for keys in partitions)
        found = [snapshot.streams[name] for name in names if name in snapshot.streams]
        if found:
            totals[getattr(base, kind)] = _stream_total(found)
    return totals


def _stream_total(streams: Sequence[StreamStatus]) -> StreamTotal:
    by_group: dict[str, list[GroupStatus]] = {}
    for stream in streams:
        for group, info in stream.groups.items():
            by_group.setdefault(group, []).append(info)
    return StreamTotal(
        partitions=len(streams),
        length=sum(s.length for s in streams),
        groups={group: _group_total(infos) for group, infos in by_group.items()},
    )


def _group_total(infos: Sequence[GroupStatus]) -> GroupTotal:
    lags = [g.lag for g in infos]
    ages = [g.oldest_pending_seconds for g in infos if g.oldest_pending_seconds is not None]
    return GroupTotal(
        partitions=len(infos),
        pending=sum(g.pending for g in infos),
        lag=None if None in lags else sum(lag for lag in lags if lag is not None),
        oldest_pending_seconds=max(ages) if ages else None,
    )


async def collect_or_why(
    clients: Sequence[aioredis.Redis], partitions: Sequence[StreamKeys]
) -> Snapshot | str:
    """:func:`collect_partitions`, or why Redis could not be used, in words (a refresh of
    ``status --watch`` rides out a Redis away)."""
    try:
        return await collect_partitions(clients, partitions)
    except (RedisError, OSError) as exc:
        return describe_failure(exc)
