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
from dataclasses import dataclass

from workers.config import CommonConfig, option
from workers.streams.connection import one_shot_partitions
from workers.streams.layout import Snapshot
from workers.streams.snapshot import collect_partitions


@dataclass
class StatusConfig(CommonConfig):
    json: bool = option(False, "print one JSON document instead of a table")
    watch: bool = option(False, "refresh until interrupted")
    interval: float = option(2.0, "seconds between refreshes with --watch")


def _cell(value: object) -> str:
    return "unknown" if value is None else str(value)


def render_table(status: Snapshot) -> str:
    header = ("STREAM", "LENGTH", "GROUP", "CONSUMERS", "LAG", "PENDING", "OLDEST PENDING s")
    rows: list[tuple[str, ...]] = [header]
    for name, stream in status.streams.items():
        if not stream.groups:
            rows.append((name, str(stream.length), "-", "", "", "", ""))
        for group, info in stream.groups.items():
            oldest = info.oldest_pending_seconds
            rows.append((
                name, str(stream.length), group, str(info.consumers), _cell(info.lag),
                str(info.pending), "-" if oldest is None else f"{oldest:.1f}",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    next_retry = status.next_retry_at
    due = "-" if next_retry is None else f"in {max(0.0, next_retry - time.time()):.0f}s"
    lines.append("")
    lines.append(f"dead letters: {status.dead_letters}   retries waiting: "
                 f"{status.retries_waiting} (next due: {due})")  # fmt: skip
    return "\n".join(lines)


async def main(config: StatusConfig) -> int:
    partitions = config.partition_keys()
    async with one_shot_partitions(config.redis_url, partitions) as clients:
        while True:
            status = await collect_partitions(clients, partitions)
            if config.json:
                print(json.dumps(status.as_json()), flush=True)
            else:
                if config.watch:
                    sys.stdout.write("\x1b[2J\x1b[H")  # clear the terminal between refreshes
                print(render_table(status), flush=True)
            if not config.watch:
                return 0
            await asyncio.sleep(config.interval)
