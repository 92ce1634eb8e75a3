"""``mailpool status`` over partitions adds a summed row per stream base name
(``email.send (all 6)``) to the table, and a ``totals`` object to the JSON; a lag unknown in
one partition makes the summed lag unknown, never a smaller number."""

from __future__ import annotations

import json
import subprocess
import sys

import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.harness import ROOT, child_env
from workers.streams.layout import GroupStatus, Snapshot, StreamKeys, StreamStatus
from workers.streams.snapshot import partition_totals

KEYS = all_keys()


def status(cluster: ClusterSet, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--redis-url", cluster.url(),
         "--partitions", str(PARTITIONS), *args],
        capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout


async def test_status_sums_each_stream_over_the_partitions(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    for p, entries in ((1, 2), (4, 3)):
        client, send = partitions[p], KEYS[p].send
        for n in range(entries):
            await client.xadd(send, {"data": f"m{n}"})
        await client.xgroup_create(send, "delivery", id="0")
        await client.xreadgroup("delivery", "w1", {send: ">"}, count=1)

    document = json.loads(status(cluster, "--json"))
    table = status(cluster)

    assert document["totals"] == {
        "email.send": {
            "partitions": 2, "length": 5,
            "groups": {"delivery": {
                "partitions": 2, "pending": 2, "lag": 3,
                "oldest_pending_seconds": document["totals"]["email.send"]["groups"]["delivery"][
                    "oldest_pending_seconds"],
            }},
        },
    }  # fmt: skip
    rows = [line.split() for line in table.splitlines()]
    summed = next(row for row in rows if row[:3] == ["email.send", "(all", f"{PARTITIONS})"])
    assert summed[3:7] == ["5", "delivery", "3", "2"]  # length, group, lag, pending
    partition_rows = [i for i, row in enumerate(rows) if row and row[0].startswith("email.send{")]
    assert max(partition_rows) < rows.index(summed)  # after the partitions' rows


def test_a_lag_unknown_in_one_partition_leaves_the_summed_lag_unknown() -> None:
    keys = [StreamKeys(send=f"email.send{{{p}}}") for p in range(2)]

    def stream(lag: int | None) -> StreamStatus:
        group = GroupStatus(consumers=1, pending=1, lag=lag, oldest_pending_seconds=2.0,
                            last_delivered_id="1-0")  # fmt: skip
        return StreamStatus(length=4, groups={"delivery": group})

    known = Snapshot({"email.send{0}": stream(3), "email.send{1}": stream(2)}, 0, 0, None)
    unknown = Snapshot({"email.send{0}": stream(3), "email.send{1}": stream(None)}, 0, 0, None)

    def summed_lag(snapshot: Snapshot) -> int | None:
        return partition_totals(snapshot, StreamKeys(), keys)["email.send"].groups["delivery"].lag

    assert summed_lag(known) == 5
    assert summed_lag(unknown) is None
