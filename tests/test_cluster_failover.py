"""A primary of a Redis Cluster killed (-9) while mail flows both ways through partitioned
streams: its replica is promoted, ingest answers 451 for the partitions it served and 250
again once the new primary takes writes, and delivery goes on settling; sends in flight at
the kill (the relay had the message, the settlement may not have reached the replica) are
counted one by one.  Counted like the Sentinel scenario, in each mode, with and without
``--min-replicas 1`` on both roles (``FIGURE cluster-failover-<role>-<mode>:`` lines, ``-s``):

- with it, nothing acknowledged is lost: every 250 is stored and every confirmed send
  reaches the relay; an ingest entry stored twice was retried after a 451, and a send goes
  to the relay twice only when it was in flight at the kill (its settlement lost with the
  primary, the ``sent:<id>`` guard with it);
- without it the figures are reported, not judged.

One cluster of our own for the module (the scenario kills its nodes); each mode kills the
primary of a different shard.  The full size, several kills per mode:
tests/chaos/test_cluster_failover.py (``make chaos``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_util import (
    FAILOVER_MODES,
    ClusterSet,
    failover_under_load,
    flush_primaries,
    running_cluster,
)

STEADY = 0.8  # seconds of load before and after the kill


@pytest.fixture(scope="module")
def killable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    """A 3+3 cluster of this module's own: the session's shared one must keep its nodes."""
    with running_cluster(tmp_path_factory.mktemp("killable-cluster")) as nodes:
        yield nodes


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", sorted(FAILOVER_MODES))
async def test_a_killed_primary_is_followed_by_both_roles(
    mode: str, killable_cluster: ClusterSet, tmp_path: Path
) -> None:
    flush_primaries(killable_cluster)  # the other mode's streams
    run = await failover_under_load(
        killable_cluster, mode, tmp_path, rounds=1, senders=4, steady=STEADY,
        first_shard=sorted(FAILOVER_MODES).index(mode),
    )  # fmt: skip
    ingest, delivery = run.report("cluster-failover")

    assert not run.crashed, f"died: {run.crashed}"
    (kill,) = run.kills
    assert ingest["replies_451"] > 0, "no 451: the kill hit no partition the senders wrote"
    assert ingest["replies_5xx"] == 0
    assert delivery["in_flight"] > 0, "no send in flight at the kill: it tested nothing"
    assert not run.received.strangers(["stored"]) and not run.sends.strangers()
    assert delivery["dead"] == 0, f"dead letters from a failover: {run.outcomes.dead[:3]}"
    # Both roles found the new primary: 250s and settlements in its partitions again.
    assert ingest["unavailable_max_s"] < kill.round_s + 5
    assert delivery["unavailable_max_s"] < kill.round_s + 5
    if FAILOVER_MODES[mode]:
        # Nothing acknowledged is lost; a 250 never turns into two entries; a send reaches
        # the relay twice only if it was in flight at the kill.
        run.received.check(["stored"], max_duplicates=ingest["replies_451"])
        assert ingest["dup_without_retry"] == 0
        run.sends.check(["delivered", "dead"], max_duplicates=delivery["in_flight"])
        assert delivery["dup_not_in_flight"] == 0
