"""``mailpool housekeep``: retention of ``email.receive`` and ``email.send``.

Streams are trimmed by age or length, but never past an entry some consumer group still
needs: the trim point is capped at the oldest entry that is pending in any group or not
yet delivered to it (``XADD MAXLEN``/``XTRIM`` would otherwise delete pending entries).
Consumers that vanished with nothing pending are removed.  Dead letters are never trimmed.
Suppression list entries whose time is up are removed (they already count as absent).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from workers.config import (
    CommonConfig,
    check_suppress_ttl,
    option,
    parse_host_port,
    positive,
)
from workers.health import serving_health
from workers.lifecycle import serve_until_signalled
from workers.streams import functions, layout
from workers.streams.bounces import BounceReader, forget_group
from workers.streams.connection import (
    as_text,
    close_all,
    connect,
    partition_clients,
    resolve_redis_url,
)
from workers.streams.layout import StreamKeys
from workers.streams.outcomes import promote_due, require_functions
from workers.streams.snapshot import stream_status
from workers.streams.suppression import DEFAULT_TTL, SuppressionList

log = structlog.get_logger("mailpool.housekeeping")


@dataclass
class HousekeepConfig(CommonConfig):
    receive_max_age: float = option(604_800.0, "keep email.receive entries this long, seconds")
    receive_max_len: int = option(1_000_000, "keep at most this many email.receive entries")
    send_max_age: float = option(604_800.0, "keep email.send entries this long, seconds")
    send_max_len: int = option(1_000_000, "keep at most this many email.send entries")
    consumer_idle: float = option(3600.0, "remove consumers idle this long with nothing pending")
    housekeep_interval: float = option(60.0, "seconds between housekeeping passes")
    read_bounces: bool = option(
        True,
        "read bounce reports in email.receive (group mailpool-bounces): bounced events, "
        "suppression of addresses that hard-bounced",
    )
    suppress_ttl: float = option(
        float(DEFAULT_TTL), "seconds a hard-bounced address stays suppressed (0: not suppressed)"
    )
    # The same option as delivery's: bounced events go to the same stream, trimmed alike.
    events_maxlen: int = option(100_000, "approximate cap of the events stream")
    http: str | None = option(None, "serve /metrics (with stream gauges), /healthz, /readyz")

    def validate(self) -> None:
        super().validate()
        for name in ("receive_max_age", "receive_max_len", "send_max_age", "send_max_len",
                     "consumer_idle", "housekeep_interval", "events_maxlen"):  # fmt: skip
            positive(name, getattr(self, name))
        check_suppress_ttl(self.suppress_ttl)
        if self.http:
            parse_host_port(self.http, "--http")


async def protected_from(redis: aioredis.Redis, stream: str) -> str | None:
    """The lowest id some group still needs (None: no group needs anything below the top).

    Per group that is its oldest pending entry, or else the first entry after its
    last-delivered id.  Entries below the returned id are acknowledged by every group.
    """
    status = await stream_status(redis, stream)
    if status is None:
        return None
    floors: list[str] = []
    for group, info in status.groups.items():
        if info.pending:
            summary = await redis.xpending(stream, group)
            floors.append(as_text(summary["min"]) or layout.MIN_ID)
        else:
            floors.append(layout.id_after(info.last_delivered_id or layout.MIN_ID))
    if not floors:
        return None
    return layout.format_id(*min(layout.parse_id(floor) for floor in floors))


# Entries read per pass to find the length trim point; a long backlog shrinks over passes.
MAX_TRIM_PER_PASS = 10_000


async def _length_floor(redis: aioredis.Redis, stream: str, max_len: int) -> str | None:
    """The first id that keeping ``max_len`` entries retains (reads only the excess)."""
    excess = min(int(await redis.xlen(stream)) - max_len, MAX_TRIM_PER_PASS)
    if excess <= 0:
        return None
    oldest = await redis.xrange(stream, count=excess)
    return layout.id_after(as_text(oldest[-1][0]) or layout.MIN_ID) if oldest else None


async def trim_stream(
    redis: aioredis.Redis, stream: str, max_age: float, max_len: int, *, unread_kept: bool = False
) -> int:
    """Trim by age and length, never below what a group still needs; returns entries removed.

    ``unread_kept``: a stream no group reads yet is not trimmed at all (the send stream: its
    entries wait for the first delivery worker, whose group starts at id 0).
    """
    protected = await protected_from(redis, stream)
    if protected is None and unread_kept:  # no group (or no stream)
        return 0
    wanted = [layout.id_at(time.time() - max_age)]
    by_length = await _length_floor(redis, stream, max_len)
    if by_length:
        wanted.append(by_length)
    target = max(wanted, key=layout.parse_id)
    if protected is not None:
        target = min(target, protected, key=layout.parse_id)
    removed = int(await redis.xtrim(stream, minid=target, approximate=False))
    if removed:
        log.info("stream_trimmed", stream=stream, removed=removed, min_id=target)
    return removed


async def remove_vanished_consumers(redis: aioredis.Redis, stream: str, idle: float) -> int:
    status = await stream_status(redis, stream)
    removed = 0
    for group in status.groups if status else {}:
        for consumer in await redis.xinfo_consumers(stream, group):
            if int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle * 1000:
                name = as_text(consumer["name"]) or ""
                # In one step with the pending check: a consumer that read since XINFO
                # would lose its entries from the group for good to a bare DELCONSUMER.
                remove = functions.REMOVE_IDLE_CONSUMER
                if int(await functions.fcall(redis, remove, [stream], [group, name])):
                    continue  # it read meanwhile: not vanished after all
                log.info("consumer_removed", stream=stream, group=group, consumer=name)
                removed += 1
    return removed


async def housekeep_once(redis: aioredis.Redis, keys: StreamKeys, config: HousekeepConfig) -> None:
    # Due retries go back to the send stream here too: with delivery scaled to zero, the
    # lag this creates is what wakes it up (KEDA watches the send stream's lag).
    await promote_due(redis, keys, time.time())
    await trim_stream(redis, keys.receive, config.receive_max_age, config.receive_max_len)
    await trim_stream(redis, keys.send, config.send_max_age, config.send_max_len, unread_kept=True)
    for stream in (keys.receive, keys.send):
        await remove_vanished_consumers(redis, stream, config.consumer_idle)
    purged = await SuppressionList([(redis, keys)]).purge_expired()
    if purged:
        log.info("suppressions_expired", count=purged, stream=keys.send)


async def serve(config: HousekeepConfig, stop: asyncio.Event) -> None:
    url = resolve_redis_url(config.redis_url)
    partitions = config.partition_keys()
    clients = partition_clients(url, partitions, connect)
    try:
        async with serving_health(
            config.http, clients[0], partitions[0], lambda: not stop.is_set(), stream_gauges=True,
            partitions=list(zip(clients, partitions, strict=True)),
        ):  # fmt: skip
            checked: set[int] = set()  # partitions whose library was found (exit 2 if missing)
            copies = list(zip(clients, partitions, strict=True))
            bounces = BounceReader(
                copies, suppress_ttl=config.suppress_ttl, events_maxlen=config.events_maxlen
            )
            forgotten: set[int] = set()  # partitions whose bounce group was removed
            while not stop.is_set():
                for n, (redis, keys) in enumerate(copies):
                    try:
                        if n not in checked:
                            await require_functions(redis)
                            checked.add(n)
                        await housekeep_once(redis, keys, config)
                        if config.read_bounces:
                            await bounces.read_once(n)
                        elif n not in forgotten:
                            await forget_group(redis, keys.receive)
                            forgotten.add(n)
                    except (aioredis.RedisError, OSError) as exc:  # the next pass tries again
                        log.warning("housekeeping_failed", error=str(exc), stream=keys.send)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), config.housekeep_interval)
    finally:
        await close_all(clients)


async def main(config: HousekeepConfig) -> int:
    return await serve_until_signalled(serve, config)
