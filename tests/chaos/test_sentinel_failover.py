"""Redis Sentinel failover under load, counted the way Jepsen counts: a primary, a replica
and three Sentinels on loopback; SMTP senders with a unique id per message into an ingest
worker, and a producer feeding a delivery worker, all through a ``redis+sentinel://`` URL;
meanwhile the master is killed with ``kill -9`` (its replica takes over, it comes back as a
replica) and paused with SIGSTOP until the Sentinels have promoted the replica (then resumed:
for a moment it still takes writes as the master it thinks it is, as a partitioned primary
does until the partition heals, and the Sentinels then make it a replica, which drops them).

Counted per mode, with and without ``--min-replicas 1`` on both roles:

- acknowledged-then-lost: a 250 whose entry the final master lacks (ingest); a message the
  relay accepted and the worker settled, whose settlement the failover then took back, so it
  was sent again (delivery: copies at the relay beyond the first), and a confirmed enqueue
  that never reached the relay;
- duplicates: ingest entries beyond one per id (a sender retrying after a ``451`` whose XADD
  had run: allowed, counted);
- time without a writable master as the clients saw it: from each fault to the next 250
  (ingest), and the longest pause in the delivery events around it.

With ``--min-replicas 1`` nothing acknowledged may be lost on either role (the one replica
holds every confirmed write, and it is the one promoted); without it the figures are
reported, not judged.  Short form: one kill and one pause per mode; ``make chaos``: four each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.delivery_chaos_util import dead_letters, observe, recipient
from tests.chaos.ledger import HEADER, Ledger
from tests.chaos.outcome_schemas import check_outcomes
from tests.chaos.scenario import (
    FULL,
    Replies,
    ids_until,
    seconds,
    send_with_ledger,
    size,
    stored_entries,
    stored_ledger_ids,
)
from tests.cluster_util import enqueue_until_replicated, longest_gap
from tests.delivery_util import pack, send_message, settled, terminate, worker_process
from tests.harness import wait_until
from tests.ingest_util import IngestProcess
from tests.sentinel_util import SentinelSet, running_sentinels
from tests.sinks import RecordingSink
from workers.streams.connection import connect

ROUNDS = size(1, 4)  # each: one kill -9 of the master, then one pause of the new one
SENDERS = size(4, 12)
STEADY = seconds(0.8, 2.0)  # load before, between and after the faults
GUARD = ("--min-replicas", "1", "--replica-timeout", "0.5")
MODES = {"guarded": GUARD, "unguarded": ()}


@dataclass
class Fault:
    kind: str  # "kill" or "pause"
    at: float  # time.monotonic()
    wall: float  # time.time(), to compare with stream ids
    failover_s: float  # until a majority of the Sentinels named the new master
    round_s: float  # until the old master was back as a replica the Sentinels could promote


def kill_round(deployment: SentinelSet) -> Fault:
    """kill -9 the master; after the failover, start it again as a replica."""
    wall = time.time()
    old, at = deployment.kill_master()
    new = deployment.wait_for_new_master(old)
    failover = time.monotonic() - at
    deployment.restart_as_replica(old, new)
    deployment.wait_until_watched()
    return Fault("kill", at, wall, failover, time.monotonic() - at)


def pause_round(deployment: SentinelSet) -> Fault:
    """SIGSTOP the master until the Sentinels promoted its replica, then SIGCONT."""
    wall = time.time()
    old, at = deployment.pause_master()
    try:
        deployment.wait_for_new_master(old)
        failover = time.monotonic() - at
    finally:
        deployment.resume(old)
    deployment.wait_until_watched()
    return Fault("pause", at, wall, failover, time.monotonic() - at)


async def produce_confirmed(url: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """A producer through the Sentinels whose sends count once a replica holds them (XADD,
    then WAIT 1 on the same connection); otherwise the same id is enqueued again (the
    duplicate guard sends it once)."""
    client = connect(url, retries=0, socket_timeout=2.0)
    try:
        for ledger_id in ids_until(stop, "send"):
            message = send_message([recipient(ledger_id)], message_id=ledger_id)
            message["headers"][HEADER.lower()] = ledger_id
            data = pack(message)
            ledger.send(ledger_id)
            await enqueue_until_replicated(client, "email.send", data, ledger, ledger_id, 60.0)
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


def ingest_outage(replies: Replies, fault: Fault) -> float:
    """The longest time without a 250 during the fault's round, as the senders saw it."""
    accepted = [at for at, code in replies.codes if code == 250]
    return longest_gap(accepted, fault.at, fault.at + fault.round_s)


def delivery_outage(event_ms: list[int], fault: Fault) -> float:
    """The longest time without a delivery event during the fault's round."""
    times = [ms / 1000 for ms in event_ms]
    return longest_gap(times, fault.wall, fault.wall + fault.round_s)


def lost_by_fault(ledger: Ledger, faults: list[Fault]) -> dict[str, int]:
    """The 250s the final master lacks, by the kind of the fault before their entry id."""
    counts = {"kill": 0, "pause": 0}
    for ledger_id in ledger.lost(["stored"]):
        stored_ms = int((ledger.accepted[ledger_id] or "0").partition("-")[0])
        before = [f for f in faults if f.wall * 1000 <= stored_ms]
        counts[before[-1].kind if before else "kill"] += 1  # before any fault: none expected
    return counts


def worst(outage: Callable[[Fault], float], faults: list[Fault], kind: str) -> float:
    return max(outage(f) for f in faults if f.kind == kind)


@pytest.mark.timeout(900 if FULL else 120)
@pytest.mark.parametrize("mode", sorted(MODES))
async def test_failover_under_load(
    mode: str,
    tmp_path: Path,
    ingest_workers: Callable[..., IngestProcess],
    sink: RecordingSink,
) -> None:
    guard = MODES[mode]
    ingest_ledger = Ledger(f"sentinel-failover-ingest-{mode}")
    send_ledger = Ledger(f"sentinel-failover-delivery-{mode}")
    replies = Replies()
    faults: list[Fault] = []
    with running_sentinels(tmp_path / "redis", replicas=1) as deployment:
        url = deployment.url()
        ingest = ingest_workers(url, "--store-timeout", "5", *guard)
        delivery = worker_process(
            url, sink.url, *guard, "--max-deliveries", "1000", log=tmp_path / "deliver.log"
        )
        stop = asyncio.Event()
        load = [
            asyncio.create_task(
                send_with_ledger(
                    ingest.port, ingest_ledger, ids_until(stop, f"{mode}-in{n}"), replies,
                    pause=0.02,
                )
            )
            for n in range(SENDERS)
        ] + [asyncio.create_task(produce_confirmed(url, send_ledger, stop))]  # fmt: skip
        try:
            # Both roles at work before the first fault (the workers take a second to start).
            await wait_until(lambda: sink.received and replies.count(lambda c: c == 250) > 0)
            await asyncio.sleep(STEADY)
            for _ in range(ROUNDS):
                for fault_round in (kill_round, pause_round):
                    faults.append(await asyncio.to_thread(fault_round, deployment))
                    await asyncio.sleep(STEADY)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*load), timeout=60)
        client = connect(url)
        try:
            await wait_until(lambda: settled(client), "delivery drained", timeout=30)
            entries = await stored_entries(client)
            await observe(send_ledger, client, sink)
            dead = await dead_letters(client)
            event_ms = [
                int(entry_id.decode().partition("-")[0])
                for entry_id, _ in await client.xrange("email.send.events")
            ]
        finally:
            await client.aclose()
        assert delivery.poll() is None, "the delivery worker died"
        assert ingest.process is not None and ingest.process.poll() is None
        terminate(delivery)
        check_outcomes([deployment.master().url])

    ingest_ledger.record_all("stored", stored_ledger_ids(entries))
    unexplained = ingest_ledger.unexplained_duplicates("stored")
    fault_figures = {
        "kills": sum(1 for f in faults if f.kind == "kill"),
        "pauses": sum(1 for f in faults if f.kind == "pause"),
        "failover_max_s": max(f.failover_s for f in faults),
    }
    lost = lost_by_fault(ingest_ledger, faults)
    ingest_figures = ingest_ledger.report(
        ["stored"],
        acked_then_lost=len(ingest_ledger.lost(["stored"])),
        lost_after_kill=lost["kill"],
        lost_after_pause=lost["pause"],
        dup_without_retry=len(unexplained),
        replies_4xx=replies.count(lambda c: 400 <= c < 500),
        replies_5xx=replies.count(lambda c: c >= 500),
        unavailable_kill_s=worst(lambda f: ingest_outage(replies, f), faults, "kill"),
        unavailable_pause_s=worst(lambda f: ingest_outage(replies, f), faults, "pause"),
        **fault_figures,
    )
    send_figures = send_ledger.report(
        ["delivered", "dead"],
        acked_then_lost=send_ledger.duplicates("delivered") + len(send_ledger.lost()),
        dead_letters=len(dead),
        unavailable_kill_s=worst(lambda f: delivery_outage(event_ms, f), faults, "kill"),
        unavailable_pause_s=worst(lambda f: delivery_outage(event_ms, f), faults, "pause"),
        **fault_figures,
    )

    assert replies.count(lambda c: 400 <= c < 500) > 0, "no 4xx: the faults tested nothing"
    assert replies.count(lambda c: c >= 500) == 0
    assert not ingest_ledger.strangers(["stored"]) and not send_ledger.strangers()
    assert not dead, f"dead letters from a failover: {dead[:3]}"
    for figures in (ingest_figures, send_figures):  # clients found the new master each time
        assert figures["unavailable_kill_s"] < 30 and figures["unavailable_pause_s"] < 30
    if guard:
        # Nothing acknowledged is lost, and a 250 never turns into two entries.
        ingest_ledger.check(["stored"], max_duplicates=ingest_figures["stored"])
        assert not unexplained, f"several entries for a single 250: {unexplained}"
        send_ledger.check(["delivered", "dead"], max_duplicates=0)
