"""``mailpool status``: what operators watch — stream length, group lag and pending,
oldest pending age, dead letters, retries waiting.

This module only renders: the snapshot is read by :mod:`workers.streams.snapshot`, which
the metrics gauges and housekeeping read too, so the table, the JSON and ``/metrics``
always agree.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from workers.config import CommonConfig, option, positive
from workers.streams.connection import one_shot_partitions
from workers.streams.layout import Snapshot
from workers.streams.snapshot import (
    StreamTotal,
    collect_or_why,
    collect_partitions,
    partition_totals,
)


@dataclass
class StatusConfig(CommonConfig):
    json: bool = option(False, "print one JSON document instead of a table")
    watch: bool = option(False, "refresh until interrupted")
    interval: float = option(2.0, "seconds between refreshes with --watch")

    def validate(self) -> None:
        super().validate()
        positive("interval", self.interval)  # 0 refreshed in a tight loop


def _cell(value: object) -> str:
    return "unknown" if value is None else str(value)


def render_table(
    status: Snapshot, totals: Mapping[str, StreamTotal] | None = None, partitions: int = 1
) -> str:
    """The table; with ``totals`` (partitioned), one row per stream base name and group
    after the partitions' rows: ``email.send (all 6)``, its length, lag and pending summed,
    the oldest pending of them all."""
    header = ("STREAM", "LENGTH", "GROUP", "CONSUMERS", "LAG", "PENDING", "OLDEST PENDING s")
    rows: list[tuple[str, ...]] = [header]
    for name, stream in status.streams.items():
        if not stream.groups:
            rows.append((name, str(stream.length), "-", "", "", "", ""))
        for group, info in stream.groups.items():
            rows.append((
                name, str(stream.length), group, str(info.consumers), _cell(info.lag),
                str(info.pending), _age(info.oldest_pending_seconds),
            ))  # fmt: skip
    for base, total in (totals or {}).items():
        rows.extend(_total_rows(f"{base} (all {partitions})", total))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    next_retry = status.next_retry_at
    due = "-" if next_retry is None else f"in {max(0.0, next_retry - time.time()):.0f}s"
    lines.append("")
    lines.append(f"dead letters: {status.dead_letters}   retries waiting: "
                 f"{status.retries_waiting} (next due: {due})")  # fmt: skip
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def _total_rows(label: str, total: StreamTotal) -> list[tuple[str, ...]]:
    """A summed stream's rows; no consumer count: one process is a consumer in every
    partition, so a sum would count it once per partition."""
    if not total.groups:
        return [(label, str(total.length), "-", "", "", "", "")]
    return [
        (label, str(total.length), group, "", _cell(g.lag), str(g.pending),
         _age(g.oldest_pending_seconds))
        for group, g in total.groups.items()
    ]  # fmt: skip


def as_json(status: Snapshot, totals: Mapping[str, StreamTotal] | None) -> dict[str, Any]:
    """The contract's document; partitioned, also ``totals``: per stream base name the
    summed ``length`` and per group ``pending`` and ``lag`` (null when any partition's lag
    is unknown), the oldest pending, and how many ``partitions`` each covers."""
    document = status.as_json()
    if totals is not None:
        document["totals"] = {base: asdict(total) for base, total in totals.items()}
    return document


async def main(config: StatusConfig) -> int:
    partitions = config.partition_keys()
    async with one_shot_partitions(config.redis_url, partitions) as clients:
        while True:
            # A failure without --watch: one line and exit 1 (one_shot_partitions).  With
            # it, refreshed until interrupted: a Redis away (a failover, a restart) is said
            # and looked at again, not the end of the watch.
            refreshed = (
                await collect_or_why(clients, partitions)
                if config.watch
                else await collect_partitions(clients, partitions)
            )
            if isinstance(refreshed, str):
                print(f"mailpool status: cannot use Redis ({refreshed}); again in "
                      f"{config.interval:g} s", file=sys.stderr, flush=True)  # fmt: skip
                await asyncio.sleep(config.interval)
                continue
            status = refreshed
            totals = (
                partition_totals(status, config.stream_keys(), partitions)
                if config.partitioned
                else None
            )
            if config.json:
                print(json.dumps(as_json(status, totals)), flush=True)
            else:
                if config.watch:
                    sys.stdout.write("\x1b[2J\x1b[H")  # clear the terminal between refreshes
                print(render_table(status, totals, len(partitions)), flush=True)
            if not config.watch:
                return 0
            await asyncio.sleep(config.interval)
