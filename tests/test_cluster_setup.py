"""`mailpool redis-setup` on a Redis Cluster: functions are per node (a primary copies them
to its own replicas, never to another shard), so the library must be loaded on every
primary, and each replica gets it from its primary."""

from __future__ import annotations

import subprocess
import sys
import time

import redis

from tests.cluster_util import PARTITIONS, ClusterSet
from tests.harness import child_env, free_port
from workers.redis_setup import library_names
from workers.streams import functions

REPLICATION_WAIT = 10.0  # seconds for a replica to apply its primary's FUNCTION LOAD


def libraries(client: redis.Redis) -> set[str]:
    return set(library_names(client.function_list()))


def nodes_by_role(cluster: ClusterSet) -> dict[str, list[redis.Redis]]:
    found: dict[str, list[redis.Redis]] = {"master": [], "slave": []}
    for server in cluster.running():
        client = cluster.client(server)
        found[client.info("replication")["role"]].append(client)
    return found


def wait_for_library(client: redis.Redis) -> bool:
    deadline = time.monotonic() + REPLICATION_WAIT
    while time.monotonic() < deadline:
        if functions.LIBRARY in libraries(client):
            return True
        time.sleep(0.05)
    return False


def test_redis_setup_loads_the_library_on_every_primary_of_a_cluster(
    cluster: ClusterSet,
) -> None:
    nodes = nodes_by_role(cluster)
    assert len(nodes["master"]) >= 3
    for primary in nodes["master"]:
        primary.function_flush()  # replicated: the replicas lose it too
    try:
        result = subprocess.run(
            [sys.executable, "-m", "workers", "redis-setup", "--redis-url", cluster.url(),
             "--partitions", str(PARTITIONS)],
            capture_output=True, text=True, env=child_env(), timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        without = [p for p in nodes["master"] if functions.LIBRARY not in libraries(p)]
        assert not without, f"{len(without)} of {len(nodes['master'])} primaries lack it"
        loaded = [line for line in result.stdout.splitlines() if " loaded on " in line]
        assert len(loaded) == len(nodes["master"]), result.stdout
        for replica in nodes["slave"]:  # copied from its primary, not loaded by setup
            assert wait_for_library(replica), "a replica did not get its primary's library"
    finally:
        # The other cluster tests share this cluster and call the library: leave it loaded
        # even when this test failed half way.
        for primary in nodes["master"]:
            primary.function_load(functions.LIBRARY_CODE, replace=True)


def test_redis_setup_names_each_cluster_seed_that_did_not_answer() -> None:
    port = free_port()  # nothing listens there
    url = f"redis+cluster://setup:secret@127.0.0.1:{port}"
    result = subprocess.run(
        [sys.executable, "-m", "workers", "redis-setup", "--redis-url", url],
        capture_output=True, text=True, env=child_env(), timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "secret" not in line
    assert f"no cluster node answered: 127.0.0.1:{port}: " in line
    assert not line.endswith(": "), "says why the seed did not answer"
