"""Redis Cluster failovers under load, counted the way Jepsen counts: 3 primaries and 3
replicas on loopback, SMTP senders with a unique id per message into an ingest worker, and
a producer per partition feeding a delivery worker, both real processes given a
``redis+cluster://`` URL with 6 partitions (every shard serves two); meanwhile primaries
fail, one shard after the other: killed with ``kill -9`` (its replica is promoted; the node
is started again and comes back as the new primary's replica), or paused with SIGSTOP until
its replica is promoted, then resumed (for a moment it still takes writes as the primary
it thinks it is, as a primary cut off from the cluster does until its node timeout, and
the cluster then makes it a replica, which drops them).

Counted per mode, with and without ``--min-replicas 1`` on both roles
(tests/cluster_util.py, "Failover under load", says how each figure is taken):

- ingest: acknowledged-then-lost (a 250 whose entry no partition holds), duplicates (a
  sender retrying after a 451 whose XADD had run: allowed, counted), 451s, and the time
  without a writable primary as the senders saw it (median and max over the kills);
- delivery: per confirmed send id, copies at the relay (none: lost; two or more:
  duplicates), whether its delivered event and its sent:<id> record survived, the sends in
  flight at a kill, and the longest gap in settlements of the killed node's partitions.

With ``--min-replicas 1`` nothing acknowledged may be lost on either role, and a send may
reach the relay twice only when it was in flight at a kill; without it the figures are
reported, not judged.  Short form: one kill and one pause per mode; ``make chaos``: four
of each (every shard killed and paused).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.scenario import FULL, seconds, size
from tests.cluster_util import (
    FAILOVER_MODES,
    ClusterSet,
    check_nothing_acknowledged_lost,
    failover_under_load,
    flush_primaries,
    running_cluster,
)

ROUNDS = size(1, 4)  # each: a kill, then a pause of the next shard's primary
SENDERS = size(2, 12)
STEADY = seconds(0.5, 3.0)  # load before, between and after the kills
OUTAGE_LIMIT = 30.0  # seconds: the clients found the new primary each time


@pytest.fixture(scope="module")
def killable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    """A 3+3 cluster of this module's own: the session's shared one must keep its nodes."""
    with running_cluster(tmp_path_factory.mktemp("killable-cluster")) as nodes:
        yield nodes


# The short form runs the guarded mode only (its kill and pause judge it; both modes' kills
# run in tests/test_cluster_failover.py): the CI budget.  Full size: both.
MODES = sorted(FAILOVER_MODES) if FULL else ["guarded"]


@pytest.mark.timeout(900 if FULL else 120)
@pytest.mark.parametrize("mode", MODES)
async def test_primaries_killed_in_turn_under_load(
    mode: str, killable_cluster: ClusterSet, tmp_path: Path
) -> None:
    flush_primaries(killable_cluster)  # the other mode's streams
    run = await failover_under_load(
        killable_cluster, mode, tmp_path, rounds=ROUNDS, senders=SENDERS, steady=STEADY,
        faults=("kill", "pause"),
    )  # fmt: skip
    ingest, delivery = run.report("cluster-chaos")

    assert not run.crashed, f"died: {run.crashed}"
    assert ingest["replies_451"] > 0, "no 451: the kills tested nothing"
    assert ingest["replies_5xx"] == 0
    assert not run.received.strangers(["stored"]) and not run.sends.strangers()
    assert delivery["dead"] == 0, f"dead letters from a failover: {run.outcomes.dead[:3]}"
    assert not run.outcomes.schema_violations, run.outcomes.schema_violations[:5]
    for figures in (ingest, delivery):
        assert figures["unavailable_kill_max_s"] < OUTAGE_LIMIT
        assert figures["unavailable_pause_max_s"] < OUTAGE_LIMIT
    if FAILOVER_MODES[mode]:
        check_nothing_acknowledged_lost(run, ingest, delivery)
