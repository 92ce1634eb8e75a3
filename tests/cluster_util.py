"""A Redis Cluster on loopback for the tests: 3 primaries and 3 replicas
(``redis-server --cluster-enabled yes``, joined by ``redis-cli --cluster create
--cluster-replicas 1``), each on a free port, with a node timeout of a second so that a
replica takes over a killed primary within a few seconds.

The calls block; a test with an event loop of its own runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from tests.harness import RedisServer, free_port
from workers.streams import layout
from workers.streams.layout import StreamKeys

NODE_TIMEOUT_MS = 1000
PRIMARIES = 3
# The partitions of the shared cluster's tests: {0}..{5} fall on every shard of three.
PARTITIONS = 6


class ClusterSet:
    """The six nodes; ``servers[i]`` keeps its port across a kill and a start again."""

    def __init__(self, data_dir: Path, *, primaries: int = PRIMARIES) -> None:
        self.servers = [
            RedisServer(data_dir / f"node{n}", appendonly=True, extra=self._settings(data_dir, n))
            for n in range(2 * primaries)
        ]

    @staticmethod
    def _settings(data_dir: Path, n: int) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(data_dir / f"node{n}" / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # The bus port would be port + 10000, past 65535 for a high free port.
            "--cluster-port", str(free_port()),
            # A replica may take over however long it was cut off (the test kills primaries).
            "--cluster-replica-validity-factor", "0",
            "--appendfsync", "everysec",
        ]  # fmt: skip

    def url(self, scheme: str = "redis+cluster") -> str:
        seeds = ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:3])
        return f"{scheme}://{seeds}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        self.wait_until_ok()

    def stop(self) -> None:
        for server in self.servers:
            server.stop(kill=True)

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=2)

    def info(self, server: RedisServer) -> dict[str, str]:
        info = self.client(server).cluster("INFO")  # parsed by redis-py
        return {str(k): str(v) for k, v in info.items()}

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Every running node says the cluster is ok (all slots served), and every running
        replica is in sync with its primary (a replica promoted in the middle of its first
        sync would take over with nothing: the consumer groups gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for server in self.running():
                with contextlib.suppress(redis.RedisError, OSError):
                    states.append(self.info(server).get("cluster_state"))
                    states.append(self.link(server))
            if states and all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise AssertionError(f"the cluster is not ok after {timeout}s")

    def link(self, server: RedisServer) -> str:
        """ "ok" for a primary or a replica whose link to its primary is up."""
        info = self.client(server).info("replication")
        return (
            "ok" if info["role"] == "master" or info.get("master_link_status") == "up" else "down"
        )

    def primary_of(self, key: str) -> RedisServer:
        """The running node that serves ``key`` as primary now."""
        slot = key_slot(key.encode())
        for server in self.running():
            rows = self.client(server).cluster("SLOTS")
            for (start, end), port in _ranges(rows):
                if start <= slot <= end:
                    return next(s for s in self.servers if s.port == port)
        raise AssertionError(f"no primary for {key!r}")

    def running(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None]

    def node_keys(self, server: RedisServer, pattern: str) -> list[str]:
        """The keys ``server`` itself holds (SCAN on one node)."""
        return sorted(k.decode() for k in self.client(server).scan_iter(match=pattern))


def _ranges(rows: Any) -> list[tuple[tuple[int, int], int]]:
    """CLUSTER SLOTS as ((first slot, last slot), primary's port)."""
    if isinstance(rows, dict):  # redis-py's parsed form
        return [((int(s), int(e)), int(v["primary"][1])) for (s, e), v in rows.items()]
    return [((int(r[0]), int(r[1])), int(r[2][1])) for r in rows]


@contextlib.contextmanager
def running_cluster(data_dir: Path, **kwargs: int) -> Iterator[ClusterSet]:
    cluster = ClusterSet(data_dir, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def all_keys(partitions: int = PARTITIONS) -> tuple[StreamKeys, ...]:
    """The default names of every partition on a cluster (tagged)."""
    return layout.partitions(StreamKeys(), partitions, tagged=True)


def flush_primaries(cluster: ClusterSet) -> None:
    """Empty every primary (the function library stays)."""
    for server in cluster.running():
        if cluster.client(server).info("replication")["role"] == "master":
            cluster.client(server).flushall()
