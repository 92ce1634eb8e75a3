"""The stream gauges cover every partition: housekeeping's /metrics on the shared Redis
Cluster shows each partition's streams under their own names (``stream="email.send{4}"``,
which Prometheus sums), dead letters summed over the partitions."""

from __future__ import annotations

import asyncio
import urllib.request

import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.harness import free_port, wait_until
from workers import housekeeping, pool
from workers.housekeeping import HousekeepConfig
from workers.pool import RunConfig

KEYS = all_keys()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_housekeeping_metrics_show_every_partitions_streams(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    send, dead = KEYS[4].send, KEYS[4].dead
    for n in range(3):
        await partitions[4].xadd(send, {"data": f"m{n}"})
    await partitions[4].xgroup_create(send, "delivery", id="0")
    await partitions[4].xreadgroup("delivery", "w1", {send: ">"}, count=1)
    await partitions[4].xadd(dead, {"data": b"x", "reason": "rejected"})
    await partitions[1].xadd(KEYS[1].dead, {"data": b"x", "reason": "rejected"})
    port = free_port()
    config = HousekeepConfig(
        redis_url=cluster.url(), partitions=PARTITIONS, http=f"127.0.0.1:{port}",
        housekeep_interval=60,
    )  # fmt: skip
    config.validate()
    stop = asyncio.Event()
    task = asyncio.create_task(housekeeping.serve(config, stop))
    wanted = [
        'mailpool_stream_length{stream="email.send{4}"} 3.0',
        'mailpool_stream_lag{group="delivery",stream="email.send{4}"} 2.0',
        'mailpool_stream_pending{group="delivery",stream="email.send{4}"} 1.0',
        "mailpool_dead_letters 2.0",
    ]

    async def exported() -> bool:
        try:
            text = await asyncio.to_thread(metrics, port)
        except OSError:
            return False  # not listening yet
        return all(line in text.splitlines() for line in wanted)

    try:
        await wait_until(exported, "partition 4's gauges and the summed dead letters", timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_the_pools_metrics_show_every_partitions_streams(
    cluster: ClusterSet, partitions: list[aioredis.Redis]
) -> None:
    """``mailpool run`` against a cluster: its own gauges, not partition 0's alone."""
    for n in range(3):
        await partitions[4].xadd(KEYS[4].receive, {"data": f"m{n}"})
    port = free_port()
    config = RunConfig(
        redis_url=cluster.url(), partitions=PARTITIONS, http=f"127.0.0.1:{port}",
        listen=f"127.0.0.1:{free_port()}", relay="smtp://127.0.0.1:9",
    )  # fmt: skip
    config.validate()
    stop = asyncio.Event()
    task = asyncio.create_task(pool.serve(config, stop))
    wanted = 'mailpool_stream_length{stream="email.receive{4}"} 3.0'

    async def exported() -> bool:
        try:
            text = await asyncio.to_thread(metrics, port)
        except OSError:
            return False  # not listening yet
        return wanted in text.splitlines()

    try:
        await wait_until(exported, "partition 4's receive stream length", timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
