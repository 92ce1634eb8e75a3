"""A Redis Cluster on loopback for the tests: 3 primaries and 3 replicas
(``redis-server --cluster-enabled yes``, joined by ``redis-cli --cluster create
--cluster-replicas 1``), each on a free port, with a node timeout of a second so that a
replica takes over a killed primary within a few seconds.

The calls block; a test with an event loop of its own runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.chaos.delivery_chaos_util import recipient
from tests.chaos.ledger import HEADER, Ledger, id_in_raw
from tests.chaos.scenario import (
    Replies,
    ids_until,
    receive_ledger_id,
    send_with_ledger,
    stored_entries,
)
from tests.delivery_util import pack, send_message, terminate, worker_process
from tests.harness import RedisServer, free_port, wait_until
from tests.ingest_util import IngestProcess
from tests.schema_util import schema_violations
from tests.sinks import RecordingSink
from workers.streams import layout
from workers.streams.connection import close_all, connect, partition_clients
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
            # A replica (re)joining syncs at once, not 5 s later (Redis's default): the
            # start-up, and a killed node's return, wait for replicas in sync.
            "--repl-diskless-sync-delay", "0",
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


# --- Failover under load ----------------------------------------------------------------
# The scenario of tests/test_cluster_failover.py (one kill per mode, in CI) and
# tests/chaos/test_cluster_failover.py (kills and pauses on each shard in turn, `make
# chaos`): SMTP senders into an ingest worker and producers feeding a delivery worker, both
# real processes given the cluster URL, while primaries fail (``Fault``).  Counted like the
# Sentinel scenario (tests/chaos/test_sentinel_failover.py), per mode:
#   ingest: 250s whose entry no partition holds afterwards (acknowledged-then-lost, by the
#     fault whose round they fell in), entries beyond one per id (duplicates), 451s, and the
#     time without a writable primary as the senders saw it (``ingest_outage``);
#   delivery: for each confirmed send id, copies at the relay (0: lost, 2+: duplicates) and
#     whether its delivered event and its sent:<id> record survived; the sends in flight at
#     a fault (relay reached in the half second before it, ids of the faulty node's
#     partitions), and the time without settlements: the longest gap between delivered
#     events of those partitions around the fault.

GUARD = ("--min-replicas", "1", "--replica-timeout", "0.5")
FAILOVER_MODES = {"guarded": GUARD, "unguarded": ()}
IN_FLIGHT_WINDOW = 0.5  # seconds before a kill in which a send counts as in flight
RELAY_STALL = 0.05  # the relay's pause before its reply to DATA: sends are mid-way at a kill
FAILOVER_TIMEOUT = 30.0
STORE_TIMEOUT = 5.0  # ingest's --store-timeout: a 451 at the latest this long after a fault


@dataclass
class Fault:
    """One fault of a primary: ``kill`` (kill -9, then started again) or ``pause`` (SIGSTOP
    until its replica is promoted, then SIGCONT: for a moment it still takes writes as the
    primary it thinks it is, as a primary cut off from its cluster does until its node
    timeout); the partitions it served, and how long each step took."""

    kind: str
    port: int
    partitions: list[int]
    at: float  # time.monotonic() (the clock of Replies and TimedLedger)
    wall: float  # time.time() (stream ids are wall-clock milliseconds)
    promoted_s: float  # until CLUSTER SLOTS named its replica
    round_s: float  # until the node was back as the new primary's in-sync replica


def shards(cluster: ClusterSet, keys: Sequence[StreamKeys]) -> list[list[int]]:
    """The partitions grouped by the primary that serves them now, in partition order."""
    by_port: dict[int, list[int]] = {}
    for p, k in enumerate(keys):
        by_port.setdefault(cluster.primary_of(k.send).port, []).append(p)
    return sorted(by_port.values())


def kill_primary(cluster: ClusterSet, keys: Sequence[StreamKeys], shard: int) -> Fault:
    """kill -9 the primary of ``shard`` (an index into :func:`shards`); wait for its
    replica's promotion; start the killed node again and wait until it is the new primary's
    replica in sync (with --min-replicas 1 the new primary needs one to confirm writes)."""
    partitions = shards(cluster, keys)[shard % PRIMARIES]
    key = keys[partitions[0]].send
    victim = cluster.primary_of(key)
    wall, at = time.time(), time.monotonic()
    victim.stop(kill=True)
    _wait_for_promotion(cluster, key, victim, at)
    promoted = time.monotonic() - at
    victim.start()
    _wait_for_replica(cluster, victim, at)
    return Fault("kill", victim.port, partitions, at, wall, promoted, time.monotonic() - at)


def pause_primary(cluster: ClusterSet, keys: Sequence[StreamKeys], shard: int) -> Fault:
    """SIGSTOP the primary of ``shard`` until its replica is promoted, then SIGCONT; wait
    until it is the new primary's replica in sync."""
    partitions = shards(cluster, keys)[shard % PRIMARIES]
    key = keys[partitions[0]].send
    victim = cluster.primary_of(key)
    assert victim.process is not None
    wall, at = time.time(), time.monotonic()
    victim.process.send_signal(signal.SIGSTOP)
    try:
        _wait_for_promotion(cluster, key, victim, at)
        promoted = time.monotonic() - at
    finally:
        victim.process.send_signal(signal.SIGCONT)
    _wait_for_replica(cluster, victim, at)
    return Fault("pause", victim.port, partitions, at, wall, promoted, time.monotonic() - at)


FAULTS = {"kill": kill_primary, "pause": pause_primary}


def _wait_for_promotion(cluster: ClusterSet, key: str, victim: RedisServer, at: float) -> None:
    """Until a node other than ``victim`` (which may not answer) names another primary."""
    while _serving_port(cluster, key, victim) in (None, victim.port):
        assert time.monotonic() < at + FAILOVER_TIMEOUT, "no replica promoted"
        time.sleep(0.05)


def _serving_port(cluster: ClusterSet, key: str, asked_not: RedisServer) -> int | None:
    """The primary's port for ``key`` as the first other node that answers says."""
    slot = key_slot(key.encode())
    for server in cluster.running():
        if server is asked_not:
            continue
        with contextlib.suppress(redis.RedisError, OSError):
            for (start, end), port in _ranges(cluster.client(server).cluster("SLOTS")):
                if start <= slot <= end:
                    return port
    return None


def _wait_for_replica(cluster: ClusterSet, server: RedisServer, at: float) -> None:
    while not _in_sync_replica(cluster, server):
        assert time.monotonic() < at + 2 * FAILOVER_TIMEOUT, "the node did not come back"
        time.sleep(0.05)
    cluster.wait_until_ok()


def _in_sync_replica(cluster: ClusterSet, server: RedisServer) -> bool:
    with contextlib.suppress(redis.RedisError, OSError):
        info = cluster.client(server).info("replication")
        return bool(info["role"] == "slave" and info.get("master_link_status") == "up")
    return False


class TimedLedger(Ledger):
    """A ledger that also notes when each id got its promise (``time.monotonic()``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.accepted_at: dict[str, float] = {}

    def accept(self, ledger_id: str, receipt: str | None = None) -> None:
        super().accept(ledger_id, receipt)
        self.accepted_at[ledger_id] = time.monotonic()


@dataclass
class TimedSink(RecordingSink):
    """A recording relay that also notes when it accepted each message (``arrivals[i]`` is
    ``received[i]``'s ``time.monotonic()``)."""

    arrivals: list[float] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        before = len(self.received)
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.received) > before:  # appended just now: no await since
            self.arrivals.append(time.monotonic())
        return reply


def partition_ids(stop: asyncio.Event, prefix: str, partition: int) -> Iterator[str]:
    """Fresh ledger ids whose partition (the producers' rule) is ``partition``."""
    for ledger_id in ids_until(stop, prefix):
        if layout.partition_of(ledger_id, PARTITIONS) == partition:
            yield ledger_id


async def produce_confirmed(
    client: aioredis.Redis,
    keys: StreamKeys,
    ledger: Ledger,
    ledger_ids: Iterable[str],
    *,
    pause: float = 0.05,
    give_up_after: float = 60.0,
) -> None:
    """A producer of one partition whose sends count once a replica holds them (XADD, then
    WAIT 1 on the same connection); otherwise the same id is enqueued again (the duplicate
    guard sends it once).  The enqueue side is confirmed in both modes, so that what the
    delivery ledger loses is the delivery worker's."""
    for ledger_id in ledger_ids:
        message = send_message([recipient(ledger_id)], message_id=ledger_id)
        message["headers"][HEADER.lower()] = ledger_id
        data = pack(message)
        ledger.send(ledger_id)
        await enqueue_until_replicated(client, keys.send, data, ledger, ledger_id, give_up_after)
        await asyncio.sleep(pause)


async def enqueue_until_replicated(
    client: aioredis.Redis,
    stream: str,
    data: bytes,
    ledger: Ledger,
    ledger_id: str,
    give_up_after: float,
) -> None:
    """XADD, then WAIT 1 on the same connection, until a replica holds the entry (accepted
    in the ledger) or ``give_up_after`` seconds passed (indeterminate)."""
    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        try:
            pipe = client.pipeline(transaction=False)
            pipe.xadd(stream, {"data": data})
            pipe.execute_command("WAIT", 1, 500)
            entry_id, replicas = await pipe.execute()
        except (redis.RedisError, OSError):
            replicas = 0
        if replicas >= 1:
            ledger.accept(ledger_id, receipt=entry_id.decode())
            return
        ledger.mark_indeterminate(ledger_id)
        await asyncio.sleep(0.1)


async def partitions_settled(clients: Sequence[aioredis.Redis], keys: Sequence[StreamKeys]) -> bool:
    """Every partition's send stream read, nothing pending, no retry waiting."""
    for client, k in zip(clients, keys, strict=True):
        try:
            groups = await client.xinfo_groups(k.send)
            info = await client.xinfo_stream(k.send)
            waiting = await client.zcard(k.retry_schedule)
        except (redis.RedisError, OSError):
            return False
        if not groups or int(groups[0]["pending"]) or int(waiting):
            return False
        if groups[0]["last-delivered-id"] != info["last-generated-id"]:
            return False
    return True


async def served_again(
    clients: Sequence[aioredis.Redis], keys: Sequence[StreamKeys], fault: Fault
) -> bool:
    """Every partition of the faulty node has a received entry written after the fault
    and a delivered event after its round: both roles use the new primary (so the outage
    figures of the fault are measured before the load stops)."""
    for p in fault.partitions:
        try:
            received: Any = await clients[p].xrevrange(keys[p].receive, count=1)
            settled: Any = await clients[p].xrevrange(keys[p].events, count=1)
        except (redis.RedisError, OSError):
            return False
        if not received or _entry_ms(received[0][0].decode()) < fault.wall * 1000:
            return False
        if not settled or _entry_ms(settled[0][0].decode()) < (fault.wall + fault.round_s) * 1000:
            return False
    return True


async def stored_partition_entries(
    clients: Sequence[aioredis.Redis], keys: Sequence[StreamKeys]
) -> list[tuple[int, str, str | None]]:
    """Every partition's receive entries as (partition, entry id, ledger id)."""
    found = []
    for p, (client, k) in enumerate(zip(clients, keys, strict=True)):
        for entry_id, message in await stored_entries(client, k.receive):
            found.append((p, entry_id, receive_ledger_id(message)))
    return found


def ingest_outage(
    ledger: TimedLedger, stored: list[tuple[int, str, str | None]], fault: Fault
) -> float:
    """How long the faulty node's partitions took no writes, as the senders' 250s show it:
    from the fault to the first 250 whose entry is in one of those partitions and was
    written after the fault began, so by the new primary (inf when none came).  The
    senders saw less of it (``refusing``): ingest passes over a partition it cannot write."""
    written_after = {
        (entry_id, lid) for p, entry_id, lid in stored
        if p in fault.partitions and _entry_ms(entry_id) >= fault.wall * 1000
    }  # fmt: skip
    back = [
        at for lid, at in ledger.accepted_at.items()
        if at > fault.at and (ledger.accepted[lid], lid) in written_after
    ]  # fmt: skip
    return min(back) - fault.at if back else float("inf")


def refusing(replies: Replies, fault: Fault, until: float) -> float:
    """From the first to the last 451 of the fault's round (before ``until``, the next
    fault): how long the senders saw refusals."""
    end = min(until, fault.at + fault.round_s + STORE_TIMEOUT)
    refused = [at for at, code in replies.codes if code == 451 and fault.at <= at < end]
    return refused[-1] - refused[0] if refused else 0.0


def _entry_ms(entry_id: str | None) -> int:
    return int((entry_id or "0").partition("-")[0])


def fault_of(entry_ms: int, faults: Sequence[Fault]) -> str:
    """The kind of the fault whose round (from a second before it) holds ``entry_ms``."""
    for fault in faults:
        if (fault.wall - 1) * 1000 <= entry_ms <= (fault.wall + fault.round_s) * 1000:
            return fault.kind
    return "none"


@dataclass
class SendOutcomes:
    """What became of each confirmed send id: copies at the relay, delivered events left in
    its partition, whether its sent:<id> record is there, and its first copy's time."""

    copies: Counter[str]
    events: Counter[str]
    recorded: set[str]
    first_copy_at: dict[str, float]
    event_ms: dict[int, list[int]]  # partition -> delivered events' entry times (ms)
    dead: list[str]
    schema_violations: list[str]  # events and dead letters against schema/*.schema.json


async def send_outcomes(
    clients: Sequence[aioredis.Redis], keys: Sequence[StreamKeys], sink: TimedSink,
    ledger: Ledger,
) -> SendOutcomes:  # fmt: skip
    copies: Counter[str] = Counter()
    first_copy_at: dict[str, float] = {}
    for record, at in zip(list(sink.received), list(sink.arrivals), strict=False):
        lid = id_in_raw(record.data)
        if lid is not None:
            copies[lid] += 1
            first_copy_at.setdefault(lid, at)
    events: Counter[str] = Counter()
    event_ms: dict[int, list[int]] = {}
    recorded: set[str] = set()
    dead: list[str] = []
    violations: list[str] = []
    for p, (client, k) in enumerate(zip(clients, keys, strict=True)):
        event_ms[p] = []
        event_rows = await _all_entries(client, k.events)
        for entry_id, fields in event_rows:
            if fields.get(b"event") == b"delivered":
                events[fields[b"id"].decode()] += 1
                event_ms[p].append(int(entry_id.partition("-")[0]))
        dead_rows = await _all_entries(client, k.dead)
        dead += [fields.get(b"message_id", b"").decode() for _, fields in dead_rows]
        for kind, rows in (("event", event_rows), ("dead-letter", dead_rows)):
            violations += schema_violations(kind, [(i.encode(), f) for i, f in rows])
        mine = sorted(i for i in ledger.sent if layout.partition_of(i, PARTITIONS) == p)
        pipe = client.pipeline(transaction=False)
        for lid in mine:
            pipe.exists(k.sent(lid))
        recorded.update(lid for lid, n in zip(mine, await pipe.execute(), strict=True) if n)
    return SendOutcomes(copies, events, recorded, first_copy_at, event_ms, dead, violations)


async def _all_entries(
    client: aioredis.Redis, stream: str, batch: int = 2000
) -> list[tuple[str, dict[bytes, bytes]]]:
    found: list[tuple[str, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        rows: Any = await client.xrange(stream, min=start, count=batch)
        found += [(entry_id.decode(), fields) for entry_id, fields in rows]
        if len(rows) < batch:
            return found
        start = "(" + rows[-1][0].decode()


def longest_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest time without an event among the gaps that reach into [start, end]
    (inf when no event comes after ``end``)."""
    ordered = sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(ordered) if b >= start and a <= end]
    if not ordered or ordered[-1] < end or not gaps:
        return float("inf")
    return max(gaps)


def delivery_outage(outcomes: SendOutcomes, fault: Fault) -> float:
    """The longest gap between delivered events of the faulty node's partitions around the
    fault (until the node was back as a replica)."""
    times = [ms / 1000 for p in fault.partitions for ms in outcomes.event_ms[p]]
    return longest_gap(times, fault.wall, fault.wall + fault.round_s)


def in_flight(outcomes: SendOutcomes, faults: Sequence[Fault]) -> set[str]:
    """Send ids of a faulty node's partitions whose first copy reached the relay in the
    IN_FLIGHT_WINDOW before the fault, or during a pause until the promotion (their
    settlement waited for the paused node, which took it when resumed, just before it
    became a replica): their settlement may never have reached the replica."""
    return {
        lid
        for fault in faults
        for lid, at in outcomes.first_copy_at.items()
        if fault.at - IN_FLIGHT_WINDOW <= at <= fault.at + _paused_for(fault)
        and layout.partition_of(lid, PARTITIONS) in fault.partitions
    }


def _paused_for(fault: Fault) -> float:
    return fault.promoted_s if fault.kind == "pause" else 0.0


def outage_figures(
    outages: Sequence[tuple[str, float]], name: str = "unavailable"
) -> dict[str, float]:
    """``<name>_<kind>_median_s`` and ``_max_s`` for each kind of fault."""
    figures = {}
    for kind in FAULTS:
        seconds = sorted(s for k, s in outages if k == kind)
        if seconds:
            figures[f"{name}_{kind}_median_s"] = statistics.median(seconds)
            figures[f"{name}_{kind}_max_s"] = seconds[-1]
    return figures


def delivery_figures(
    ledger: Ledger, outcomes: SendOutcomes, faults: Sequence[Fault]
) -> dict[str, Any]:
    """The delivery side's counts (see the section comment); ``lost`` is a confirmed send
    with no copy at the relay and no dead letter."""
    accepted = set(ledger.accepted)
    delivered = {i for i in accepted if outcomes.copies[i]}
    duplicated = {i for i in delivered if outcomes.copies[i] > 1}
    flying = in_flight(outcomes, faults) & accepted
    no_event = {i for i in delivered if not outcomes.events[i]}
    no_record = delivered - outcomes.recorded
    return {
        "accepted": len(accepted),
        "delivered": len(delivered),
        "lost": len(accepted - delivered - set(outcomes.dead)),
        "dup": sum(outcomes.copies[i] - 1 for i in duplicated),
        "dup_ids": len(duplicated),
        "dead": len(outcomes.dead),
        "events_missing": len(no_event),
        "records_missing": len(no_record),
        "extra_events": sum(max(0, n - 1) for n in outcomes.events.values()),
        "in_flight": len(flying),
        "in_flight_dup": len(flying & duplicated),
        "in_flight_event_lost": len(flying & no_event),
        "in_flight_record_lost": len(flying & no_record),
        "dup_not_in_flight": len(duplicated - flying),
        "strangers": len(set(outcomes.copies) - ledger.sent),
        **outage_figures([(f.kind, delivery_outage(outcomes, f)) for f in faults]),
    }


PRODUCER_PAUSE = 0.05  # per partition's producer, between confirmed sends
SENDER_PAUSE = 0.02  # per SMTP sender, between messages and before a retry


@dataclass
class FailoverRun:
    """What one mode of the scenario saw (:func:`failover_under_load`)."""

    mode: str
    received: TimedLedger  # ingest: SMTP ids, stored entries recorded as "stored"
    sends: Ledger  # delivery: confirmed enqueues, copies as "delivered", "dead"
    replies: Replies
    faults: list[Fault]
    stored: list[tuple[int, str, str | None]]
    outcomes: SendOutcomes
    crashed: list[str]  # the roles whose process died

    def report(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Print a ``FIGURE <name>-ingest-<mode>:`` and a ``FIGURE <name>-delivery-<mode>:``
        line (and add them to $MAILPOOL_CHAOS_FIGURES); returns both figure sets."""
        self.received.name = f"{name}-ingest-{self.mode}"
        self.sends.name = f"{name}-delivery-{self.mode}"
        lost = self.received.lost(["stored"])
        lost_after = Counter(
            fault_of(_entry_ms(self.received.accepted[lid]), self.faults) for lid in lost
        )
        faults: dict[str, Any] = {f"{kind}s": 0 for kind in FAULTS}
        faults.update(Counter(f"{f.kind}s" for f in self.faults))
        faults["promoted_max_s"] = max((f.promoted_s for f in self.faults), default=0.0)
        faults["round_max_s"] = max((f.round_s for f in self.faults), default=0.0)
        outages = [(f.kind, ingest_outage(self.received, self.stored, f)) for f in self.faults]
        ends = [f.at for f in self.faults[1:]] + [float("inf")]
        refusals = [
            (f.kind, refusing(self.replies, f, end))
            for f, end in zip(self.faults, ends, strict=True)
        ]
        ingest = self.received.report(
            ["stored"],
            acked_then_lost=len(lost),
            **{f"lost_after_{kind}": lost_after[kind] for kind in FAULTS},
            dup_without_retry=len(self.received.unexplained_duplicates("stored")),
            replies_451=self.replies.count(lambda c: c == 451),
            replies_other_4xx=self.replies.count(lambda c: 400 <= c < 500 and c != 451),
            replies_5xx=self.replies.count(lambda c: c >= 500),
            **outage_figures(outages),
            **outage_figures(refusals, "refusing"),
            **faults,
        )
        figures = delivery_figures(self.sends, self.outcomes, self.faults)
        in_summary = ("accepted", "delivered", "lost", "dup", "dead")  # Ledger.summary's own
        shown = {k: v for k, v in figures.items() if k not in in_summary}
        delivery = self.sends.report(["delivered", "dead"], **shown, **faults)
        return ingest, delivery


async def failover_under_load(
    cluster: ClusterSet,
    mode: str,
    logs: Path,
    *,
    rounds: int,
    senders: int,
    steady: float,
    faults: Sequence[str] = ("kill",),
    first_shard: int = 0,
) -> FailoverRun:
    """Both roles under load through the cluster URL, with ``FAILOVER_MODES[mode]``, while
    for ``rounds`` rounds each of ``faults`` (:data:`FAULTS`) hits a primary, shard
    ``first_shard`` first, then the next..., with ``steady`` seconds of load before, between
    and after; then delivery drains and the outcomes are read from every partition."""
    guard, keys, url = FAILOVER_MODES[mode], all_keys(), cluster.url()
    received, sends, replies = TimedLedger(mode), Ledger(mode), Replies()
    sink = TimedSink(stall_data=RELAY_STALL)
    sink.start()
    partitioned = ("--partitions", str(PARTITIONS), *guard)
    ingest = IngestProcess(
        url, *partitioned, "--store-timeout", str(STORE_TIMEOUT), log_path=logs / "ingest.log"
    )
    delivery = worker_process(url, sink.url, *partitioned, "--max-deliveries", "1000",
                              log=logs / "deliver.log")  # fmt: skip
    clients = partition_clients(url, keys, connect, retries=0, socket_timeout=2.0)
    done: list[Fault] = []
    try:
        ingest.start()
        stop = asyncio.Event()
        load = [
            send_with_ledger(ingest.port, received, ids_until(stop, f"{mode}-in{n}"), replies,
                             pause=SENDER_PAUSE)
            for n in range(senders)
        ] + [
            produce_confirmed(clients[p], keys[p], sends, partition_ids(stop, f"{mode}-s", p),
                              pause=PRODUCER_PAUSE)
            for p in range(PARTITIONS)
        ]  # fmt: skip
        running = [asyncio.create_task(work) for work in load]
        try:
            await wait_until(lambda: bool(sink.received) and replies.count(lambda c: c == 250) > 0,
                             "both roles at work", timeout=30)  # fmt: skip
            await asyncio.sleep(steady)
            for n, kind in enumerate(kind for _ in range(rounds) for kind in faults):
                fault = FAULTS[kind]
                done.append(await asyncio.to_thread(fault, cluster, keys, first_shard + n))
                again = "the partitions written and settled again"
                await wait_until(lambda: served_again(clients, keys, done[-1]), again, timeout=30)
                await asyncio.sleep(steady)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running), timeout=120)
        await wait_until(lambda: partitions_settled(clients, keys), "delivery drained", timeout=60)
        stored = await stored_partition_entries(clients, keys)
        outcomes = await send_outcomes(clients, keys, sink, sends)
        crashed = [role for role, process in (("ingest", ingest.process), ("delivery", delivery))
                   if process is None or process.poll() is not None]  # fmt: skip
    finally:
        terminate(delivery)
        ingest.kill()
        sink.stop()
        await close_all(clients)
    received.record_all("stored", [lid for _, _, lid in stored])
    sends.record_all("delivered", [lid for lid, n in outcomes.copies.items() for _ in range(n)])
    sends.record_all("dead", outcomes.dead)
    return FailoverRun(mode, received, sends, replies, done, stored, outcomes, crashed)


def check_nothing_acknowledged_lost(
    run: Any, ingest: dict[str, Any], delivery: dict[str, Any]
) -> None:
    """The judgement of a guarded run (``--min-replicas 1``): nothing acknowledged is lost,
    a 250 never turns into two entries, a send reaches the relay twice only if it was in
    flight at a fault, and no confirmed ``sent:<id>`` guard is lost."""
    run.received.check(["stored"], max_duplicates=ingest["replies_451"])
    assert ingest["dup_without_retry"] == 0
    run.sends.check(["delivered", "dead"], max_duplicates=delivery["in_flight"])
    assert delivery["dup_not_in_flight"] == 0
    assert delivery["records_missing"] == 0, "a sent:<id> guard confirmed, then lost"
