"""``mailpool dead`` on partitioned streams: every partition has its own dead-letter stream and
an entry id names a letter only within one, so ids are ``PARTITION/ENTRY-ID``.  ``list`` shows
every partition's letters (oldest first across them), ``show``/``replay``/``purge`` take the
qualified id, ``--all`` covers every partition, and a letter is replayed into its own
partition's send stream."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.delivery_util import pack, send_message
from tests.harness import ROOT, child_env
from workers import cli
from workers.streams import functions, layout

OLDER, SAME = "1690000000000-0", "1700000000000-0"
# Partition 4 holds the oldest letter, and one whose entry id partition 1's letter has too.
LETTERS = [(4, OLDER, "carol"), (1, SAME, "bob"), (4, SAME, "dave")]


def dead(cluster: ClusterSet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "dead", *args, "--redis-url", cluster.url(),
         "--partitions", str(PARTITIONS)],
        capture_output=True, text=True, timeout=30, env=child_env(), cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.fixture
async def letters(partitions: list[aioredis.Redis]) -> list[aioredis.Redis]:
    """The dead letters of LETTERS (each to <name>@example.com) and the functions loaded on
    every primary (replay is one)."""
    keys = all_keys()
    for p, entry_id, name in LETTERS:
        message = send_message([f"{name}@example.com"], message_id=f"order-{name}")
        fields = layout.dead_letter(
            layout.MessageRef(message_id=f"order-{name}", source_id=entry_id, data=pack(message)),
            reason="rejected", error="550 5.1.1 no such user", recipients=[f"{name}@example.com"],
            attempts=1, first_attempt=1.7e9, last_attempt=1.7e9,
        )  # fmt: skip
        await partitions[p].xadd(keys[p].dead, dict(fields), id=entry_id)
    for client in partitions:
        await functions.ensure_library(client)
    return partitions


async def streams_by_partition(clients: list[aioredis.Redis], stream: str) -> dict[int, list[str]]:
    """The recipients of each partition's ``stream`` ("send" or "dead") that has entries."""
    found = {}
    for p, (client, keys) in enumerate(zip(clients, all_keys(), strict=True)):
        rows = await client.xrange(getattr(keys, stream))
        if rows:
            found[p] = [fields[b"recipients"].decode() for _, fields in rows]
    return found


async def test_list_shows_every_partitions_letters_by_partition_qualified_id(
    cluster: ClusterSet, letters: list[aioredis.Redis]
) -> None:
    listed = dead(cluster, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    shown = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(d["id"], d["partition"], d["to"]) for d in shown] == [
        (f"4/{OLDER}", 4, ["carol@example.com"]),
        (f"1/{SAME}", 1, ["bob@example.com"]),
        (f"4/{SAME}", 4, ["dave@example.com"]),
    ]  # fmt: skip
    table = dead(cluster, "list", "--limit", "2")
    assert [line.split()[0] for line in table.stdout.splitlines()] == [f"4/{OLDER}", f"1/{SAME}"]
    assert "2 shown of 3 dead letters" in table.stderr


async def test_show_and_purge_take_the_qualified_id_of_one_partition(
    cluster: ClusterSet, letters: list[aioredis.Redis]
) -> None:
    shown = dead(cluster, "show", f"1/{SAME}", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["recipients"] == ["bob@example.com"]
    purged = dead(cluster, "purge", f"4/{SAME}")
    assert purged.returncode == 0, purged.stderr
    assert await streams_by_partition(letters, "dead") == {
        1: ['["bob@example.com"]'], 4: ['["carol@example.com"]'],
    }  # fmt: skip
    assert dead(cluster, "purge", "--all").returncode == 0
    assert await streams_by_partition(letters, "dead") == {}


async def test_replay_of_a_qualified_id_moves_the_letter_into_its_own_partitions_send_stream(
    cluster: ClusterSet, letters: list[aioredis.Redis]
) -> None:
    replayed = dead(cluster, "replay", f"4/{SAME}")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith(f"4/{SAME} -> email.send{{4}} ")
    assert await streams_by_partition(letters, "send") == {4: ['["dave@example.com"]']}
    assert await streams_by_partition(letters, "dead") == {
        1: ['["bob@example.com"]'], 4: ['["carol@example.com"]'],
    }  # fmt: skip


async def test_replay_all_replays_every_partitions_letters_within_it(
    cluster: ClusterSet, letters: list[aioredis.Redis]
) -> None:
    replayed = dead(cluster, "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3, skipped 0 invalid" in replayed.stderr
    assert await streams_by_partition(letters, "send") == {
        1: ['["bob@example.com"]'], 4: ['["carol@example.com"]', '["dave@example.com"]'],
    }  # fmt: skip
    assert await streams_by_partition(letters, "dead") == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", SAME, "--partitions", "6"],
         f"dead show: '{SAME}': an entry id is ambiguous over partitions: give PARTITION/ID "
         f"as `dead list` shows it (0/{SAME} .. 5/{SAME})"),
        (["replay", f"6/{SAME}", "--partitions", "6"],
         f"dead replay: '6/{SAME}': the partition must be 0..5 (PARTITION/ID)"),
        (["show", f"\N{SUPERSCRIPT TWO}/{SAME}", "--partitions", "6"],
         f"dead show: '\N{SUPERSCRIPT TWO}/{SAME}': the partition must be 0..5"),
        (["purge", f"1/{SAME}"],
         f"dead purge: '1/{SAME}' names a partition, but the streams are not partitioned"),
    ],
    ids=["bare-id-partitioned", "partition-out-of-range", "partition-not-ascii-digits",
         "qualified-id-not-partitioned"],
)  # fmt: skip
def test_an_id_that_does_not_match_the_partitioning_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["dead", *args, "--redis-url", "redis://127.0.0.1:1/0"])
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"mailpool dead: {message}")
