"""What Redis spends per message: the shared parts of bench/cluster.py and bench/capacity.py.

Redis's CPU is read from ``INFO`` (``used_cpu_sys`` + ``used_cpu_user``) of every primary
before and after a round, so it covers all of Redis's work (commands, socket reads and
writes, replication to replicas, AOF), summed over the shards of a cluster.  ``INFO
commandstats`` and ``total_reads_processed``/``total_writes_processed`` deltas say where it
went: command time per command, and how many socket reads (round trips) each message cost.

A round is real traffic through a real worker:

* ingest: ``mailpool ingest`` (its own process, ``--partitions N``) fed by Postfix's
  ``smtp-source`` as in bench/ingest.py (10 sessions, connection reuse);
* delivery: ``workers.delivery.serve`` in this process drains messages enqueued beforehand
  (spread round robin over the partitions) into ``smtp-sink``, as in bench/delivery.py; the
  clock and the counters start at the worker's start and stop when every partition's group
  has read everything and has nothing pending.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench.delivery import SmtpSink, enqueue_all, make_messages, until_drained  # noqa: E402
from bench.ingest import Case, Server, smtp_source  # noqa: E402
from tests.cluster_util import running_cluster  # noqa: E402
from tests.harness import RedisServer, free_port, wait_for_port  # noqa: E402
from workers.codec.build import build_message  # noqa: E402
from workers.codec.types import SendMessage  # noqa: E402
from workers.config import DeliveryConfig  # noqa: E402
from workers.producer import make_send_message  # noqa: E402
from workers.streams.cluster import is_cluster_url, parse_cluster_url  # noqa: E402
from workers.streams.connection import close_all, connect, partition_clients  # noqa: E402
from workers.streams.layout import StreamKeys, partitions  # noqa: E402

SESSIONS = 10  # smtp-source sessions, reused connections: bench/ingest.py's headline case
CONCURRENCY = 10  # delivery --concurrency (shared out over the partitions)
# The cluster nodes of tests/cluster_util.py write an AOF fsynced every second; a standalone
# server compared with them does the same, so persistence is not the difference measured.
STANDALONE_SETTINGS = ["--appendfsync", "everysec"]
# The benchmark's own commands (counters, the drain check): their time is not the workers'.
BENCH_COMMANDS = ("info", "xinfo|groups", "xlen", "zcard")


# --- counters --------------------------------------------------------------------------------


@dataclass
class Counters:
    """Sums over the primaries of one deployment at one moment (or a difference of two)."""

    cpu: float = 0.0  # seconds, used_cpu_sys + used_cpu_user
    reads: int = 0  # total_reads_processed: socket reads that found a request
    writes: int = 0  # total_writes_processed
    commands: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (calls, usec)

    def __sub__(self, other: Counters) -> Counters:
        names = set(self.commands) | set(other.commands)
        return Counters(
            self.cpu - other.cpu,
            self.reads - other.reads,
            self.writes - other.writes,
            {n: _minus(self.commands.get(n, (0, 0)), other.commands.get(n, (0, 0))) for n in names},
        )

    def __add__(self, other: Counters) -> Counters:
        names = set(self.commands) | set(other.commands)
        return Counters(
            self.cpu + other.cpu,
            self.reads + other.reads,
            self.writes + other.writes,
            {n: _plus(self.commands.get(n, (0, 0)), other.commands.get(n, (0, 0))) for n in names},
        )


def _minus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] - b[0], a[1] - b[1]


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def node_counters(port: int) -> Counters:
    with redis.Redis(port=port, socket_timeout=5) as client:
        info: dict[str, Any] = client.info("everything")
    commands = {
        name.removeprefix("cmdstat_"): (int(stats["calls"]), int(stats["usec"]))
        for name, stats in info.items()
        if name.startswith("cmdstat_")
    }
    return Counters(
        float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        int(info["total_reads_processed"]),
        int(info["total_writes_processed"]),
        commands=commands,
    )


# --- deployments -------------------------------------------------------------------------------


@dataclass
class Deployment:
    """Where the streams live: a URL, its partition count and the ports of its primaries."""

    name: str
    url: str
    partitions: int
    primaries: list[int]
    replicas: list[int] = field(default_factory=list)

    def counters(self) -> Counters:
        total = Counters()
        for port in self.primaries:
            total = total + node_counters(port)
        return total

    def data_memory(self) -> int:
        """Octets the keys take (``MEMORY USAGE`` of each, summed over the primaries).

        Not ``used_memory`` deltas: those hold clients' query and output buffers and the
        allocator's own pages, tens of KB that come and go with the connections (60
        messages of 2 KB once read as 326 B each, another time as -1899).  Read after a
        round's counters: its commands are not the round's."""
        total = 0
        for port in self.primaries:
            with redis.Redis(port=port, socket_timeout=30) as client:
                keys = list(client.scan_iter(count=1000))
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.memory_usage(key, samples=0)
                total += sum(size or 0 for size in pipe.execute())
        return total

    def replica_cpu(self) -> float:
        return sum(node_counters(port).cpu for port in self.replicas)

    def keys(self) -> tuple[StreamKeys, ...]:
        return partitions(StreamKeys(), self.partitions, tagged=self.tagged)

    @property
    def tagged(self) -> bool:
        return self.partitions > 1 or is_cluster_url(self.url)

    def flush(self) -> None:
        """Empty every primary (FLUSHALL keeps the function library)."""
        for port in self.primaries:
            with redis.Redis(port=port, socket_timeout=30) as client:
                client.flushall()

    def idle_cpu_per_second(self, seconds: float = 2.0) -> float:
        """Redis's own CPU with no traffic (cron, cluster bus pings), CPU-s per second."""
        before, started = self.counters(), time.perf_counter()
        time.sleep(seconds)
        return (self.counters() - before).cpu / (time.perf_counter() - started)


def cluster_nodes(url: str) -> tuple[list[int], list[int]]:
    """(primaries' ports, replicas' ports) of the cluster a redis+cluster:// URL names."""
    host, port = parse_cluster_url(url).seeds[0]
    with redis.Redis(host=host, port=port, socket_timeout=5) as client:
        lines = client.execute_command("CLUSTER", "NODES")
    text = lines.decode() if isinstance(lines, bytes) else str(lines)
    if isinstance(lines, dict):  # redis-py may parse it
        rows = [(addr, info["flags"]) for addr, info in lines.items()]
    else:
        rows = [(line.split()[1], line.split()[2]) for line in text.splitlines() if line.strip()]
    primaries: list[int] = []
    replicas: list[int] = []
    for address, flags in rows:
        node_port = int(address.split("@")[0].rsplit(":", 1)[1])
        if "fail" in flags:
            continue
        (primaries if "master" in flags else replicas).append(node_port)
    return sorted(primaries), sorted(replicas)


def cluster_deployment(url: str, partition_count: int) -> Deployment:
    primaries, replicas = cluster_nodes(url)
    return Deployment(f"cluster {len(primaries)}x{partition_count}p", url, partition_count,
                      primaries, replicas)  # fmt: skip


@contextmanager
def own_cluster(
    workdir: Path, partition_count: int, *, replicas: bool = True
) -> Iterator[Deployment]:
    """tests/cluster_util.py's cluster (3 primaries, 3 replicas, AOF everysec); without
    ``replicas`` they are stopped once it is up (the primaries go on serving)."""
    with running_cluster(workdir / "cluster") as nodes:
        deployment = cluster_deployment(nodes.url(), partition_count)
        if not replicas:
            for server in nodes.servers:
                if server.port in deployment.replicas:
                    server.stop(kill=True)
            deployment.replicas = []
        yield deployment


@contextmanager
def standalone(
    workdir: Path, *, replica: bool = False, aof: bool = True, partition_count: int = 1
) -> Iterator[Deployment]:
    """A redis-server (AOF everysec unless not ``aof``) and, with ``replica``, a replica of
    it as a cluster's shard has (a Sentinel deployment's primary pays the same for its);
    its streams split into ``partition_count`` partitions."""
    name = f"{'standalone+replica' if replica else 'standalone'} {partition_count}p"
    folder = workdir / name.replace(" ", "-")
    server = RedisServer(folder, appendonly=aof, extra=STANDALONE_SETTINGS)
    server.start()
    servers = [server]
    try:
        if replica:
            follow = ["--replicaof", "127.0.0.1", str(server.port)]
            servers.append(RedisServer(folder / "replica", appendonly=True,
                                       extra=STANDALONE_SETTINGS + follow))  # fmt: skip
            servers[1].start()
            _wait_in_sync(servers[1].port)
        yield Deployment(
            name, server.url, partition_count, [server.port], [s.port for s in servers[1:]]
        )
    finally:
        for each in servers:
            each.stop(kill=True)


def _wait_in_sync(port: int) -> None:
    with redis.Redis(port=port, socket_timeout=5) as client:
        for _ in range(300):
            if client.info("replication").get("master_link_status") == "up":
                return
            time.sleep(0.05)
    raise SystemExit(f"the replica on {port} did not sync in 15 s")


# --- rounds ------------------------------------------------------------------------------------


@dataclass
class Round:
    """One round's traffic: messages, wall seconds, the worker's CPU seconds, Redis's."""

    messages: int
    seconds: float
    worker_cpu: float
    redis: Counters
    retained: int = 0  # octets of data (Deployment.data_memory) the round left

    def redis_us_per_message(self, idle_per_second: float = 0.0) -> float:
        """Redis CPU per message, less the benchmark's own INFO and XINFO polls, and with
        ``idle_per_second`` the idle CPU of the round's length."""
        ours = sum(self.redis.commands.get(name, (0, 0))[1] for name in BENCH_COMMANDS) / 1e6
        busy = self.redis.cpu - ours - idle_per_second * self.seconds
        return busy * 1e6 / self.messages

    @property
    def worker_per_cpu_second(self) -> float:
        return self.messages / max(self.worker_cpu, 1e-9)


def start_ingest(deployment: Deployment, log: Path) -> Server:
    """``mailpool ingest`` of this checkout on ``deployment`` with its partitions."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPOOL_")}
    env["MAILPOOL_VERIFY"] = "false"  # no DNS: bench/ingest.py --verify measures verification
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "ingest", "--listen", f"127.0.0.1:{port}",
         "--redis-url", deployment.url, "--partitions", str(deployment.partitions),
         "--hostname", "ingest.bench", "--log-format", "json", "--log-level", "warning",
         "--max-connections", "2000"],
        cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(port, timeout=30)
    return Server(f"ingest on {deployment.name}", process, port)


def ingest_round(
    deployment: Deployment, server: Server, size: int, messages: int, sessions: int = SESSIONS
) -> Round:
    data_before = deployment.data_memory()
    before = deployment.counters()
    started = time.perf_counter()
    result = smtp_source(server, Case(size, sessions, True, messages))
    seconds = time.perf_counter() - started
    spent = deployment.counters() - before
    retained = deployment.data_memory() - data_before
    return Round(messages, seconds, messages / result.per_cpu, spent, retained)


def sized_messages(count: int, size: int, tag: str) -> list[SendMessage]:
    """Distinct messages of about ``size`` octets once built (bench/delivery.py's at 2 KB)."""
    if size <= 2048:
        return make_messages(count, tag)
    line = "The quick brown fox jumps over the lazy dog. " * 2 + "\n"
    text = line * (size // len(line))
    return [
        make_send_message(from_="bench@example.com", to=[f"rcpt{n % 50}@example.net"],
                          subject=f"bench {tag} message {n}", text=text)
        for n in range(count)
    ]  # fmt: skip


def built_size(messages: list[SendMessage]) -> int:
    return len(build_message(messages[0], default_id="size").data)


async def delivery_round(
    deployment: Deployment,
    sink: SmtpSink,
    messages: list[SendMessage],
    concurrency: int = CONCURRENCY,
    **settings: Any,
) -> Round:
    """Enqueue round robin over the partitions, then time the worker until all is settled
    (``settings``: more DeliveryConfig fields, e.g. ``suppress_ttl=0``)."""
    from workers.delivery import serve

    config = DeliveryConfig(
        redis_url=deployment.url, relay=f"smtp://127.0.0.1:{sink.port}", starttls="off",
        concurrency=concurrency, consumer="bench-worker", hostname="bench.invalid",
        partitions=deployment.partitions, **settings,
    )  # fmt: skip
    config.validate()
    keys = config.partition_keys()
    clients = partition_clients(deployment.url, keys, connect)
    try:
        deployment.flush()
        empty = deployment.data_memory()
        counts = [0] * len(keys)
        for p, (client, k) in enumerate(zip(clients, keys, strict=True)):
            share = messages[p :: len(keys)]
            counts[p] = len(share)
            await enqueue_all(client, k.send, share)
        stop = asyncio.Event()
        before = deployment.counters()
        started, cpu = time.perf_counter(), time.process_time()
        worker = asyncio.create_task(serve(config, stop))
        await _until_drained(worker, clients, keys, config.group, counts)
        seconds, worker_cpu = time.perf_counter() - started, time.process_time() - cpu
        spent = deployment.counters() - before
        retained = deployment.data_memory() - empty
        stop.set()
        await asyncio.wait_for(worker, 60)
        await _nothing_failed(clients, keys)
    finally:
        await close_all(clients)
    return Round(len(messages), seconds, worker_cpu, spent, retained)


async def _until_drained(
    worker: asyncio.Task[None],
    clients: list[aioredis.Redis],
    keys: tuple[StreamKeys, ...],
    group: str,
    counts: list[int],
) -> None:
    """Each partition in turn until its group has settled all it was given: the worker
    drains them together, so the first wait is the round's and the others look once or
    twice.  :func:`bench.delivery.until_drained` looks seldom (a few dozen XINFO GROUPS a
    round, where a look every 50 ms charged the worker's CPU column with hundreds)."""
    for client, k, count in zip(clients, keys, counts, strict=True):
        await until_drained(client, k.send, group, count, worker)


async def _nothing_failed(clients: list[aioredis.Redis], keys: tuple[StreamKeys, ...]) -> None:
    for client, k in zip(clients, keys, strict=True):
        dead, retries = await client.xlen(k.dead), await client.zcard(k.retry_schedule)
        if dead or retries:
            raise SystemExit(f"{k.send}: {dead} dead letters and {retries} retries waiting")


@contextmanager
def smtp_sink(workdir: Path) -> Iterator[SmtpSink]:
    sink = SmtpSink(workdir)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


# --- reporting ----------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def command_profile(spent: Counters, messages: int, top: int = 8) -> list[str]:
    """Where Redis's CPU went, per message: round trips, then the costliest commands."""
    command_us = sum(usec for _, usec in spent.commands.values())
    lines = [
        f"    CPU {spent.cpu * 1e6 / messages:6.1f} us/msg = commands "
        f"{command_us / messages:5.1f} + outside commands (sockets, replication, AOF, cron) "
        f"{(spent.cpu * 1e6 - command_us) / messages:5.1f};  socket reads "
        f"{spent.reads / messages:.2f}/msg, writes {spent.writes / messages:.2f}/msg"
    ]
    ranked = sorted(spent.commands.items(), key=lambda item: -item[1][1])
    for name, (calls, usec) in ranked[:top]:
        if calls:
            lines.append(
                f"      {name:<22} {calls / messages:6.3f} calls/msg {usec / messages:6.2f} us/msg"
                f" ({usec / calls:5.2f} us/call)"
            )
    return lines
