"""``mailpool dead list | show ID... | replay ID...|--all | purge ID...|--all``.

Dead letters live in ``email.send.dead`` (fields: contract.md).  ``replay`` moves a dead
letter back to ``email.send`` in one Lua script (XDEL + XADD: never in both streams, never in
neither) as an entry with the original ``data`` plus ``message_id``, ``source_id``,
``recipients`` (those the dead letter concerns) and ``replay_of``; attempts start again from
zero.  Because the message id is kept, recipients a relay already accepted for it are not
sent again (idempotency records, kept ``--sent-ttl``).  Entries dead as ``invalid`` are not
replayed: the same bytes would fail the same way; fix the producer and enqueue a new send.

``ACTION`` and ``ID`` are positional arguments (no environment variables); ``--all`` is
``MAILPOOL_ALL``.

Partitioned (``--partitions N`` > 1 or a cluster ``--redis-url``), every partition has its
own dead-letter stream, and an entry id names a letter only within one.  So ids are
qualified by the partition: ``PARTITION/ENTRY-ID`` (``3/1712345678901-0``).  ``list`` shows
every partition's letters, oldest first across them, by their qualified id (JSON: ``id``
qualified, and ``partition``); ``show``, ``replay`` and ``purge`` take qualified ids (a bare
one is refused, exit 2); ``--all`` covers every partition; a letter is replayed into its own
partition's send stream (the replay function stays in one slot).  Not partitioned: bare ids,
and the output is as it always was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from workers.codec.errors import CodecError
from workers.codec.validate import decode_send
from workers.config import CommonConfig, ConfigError, option
from workers.streams import layout
from workers.streams import outcomes as oc
from workers.streams.connection import one_shot_partitions
from workers.streams.layout import DeadLetter, StreamKeys

ACTIONS = ("list", "show", "replay", "purge")
PAGE = 500
# Between the partition and the entry id of a partitioned deployment's dead letter: an
# entry id has none (digits and '-'), and a shell passes it unquoted.
PARTITION_SEPARATOR = "/"
ID_HELP = (
    "dead-letter entry ids; partitioned (--partitions N > 1 or a cluster): PARTITION/ID as "
    "`dead list` shows them, e.g. 3/1712345678901-0"
)


@dataclass
class DeadConfig(CommonConfig):
    """``mailpool dead``: inspect, replay and purge dead letters."""

    _action: str = option("list", "list, show, replay or purge (positional)")
    _ids: list[str] = option([], "dead-letter entry ids (positional)", repeatable=True)
    all_entries: bool = option(
        False, "replay/purge every dead letter (of every partition)", flag="--all"
    )
    limit: int = option(100, "dead letters shown by list (oldest first)")
    json: bool = option(False, "print JSON lines instead of a table")

    @staticmethod
    def add_positional_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("_action", metavar="ACTION", choices=ACTIONS, help=" | ".join(ACTIONS))
        parser.add_argument("_ids", metavar="ID", nargs="*", help=ID_HELP)

    @property
    def action(self) -> str:
        return self._action

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def validate(self) -> None:
        super().validate()
        if self._action not in ACTIONS:
            raise ConfigError(f"ACTION: {self._action!r} is not one of {', '.join(ACTIONS)}")
        if self._action in {"replay", "purge"} and bool(self._ids) == self.all_entries:
            raise ConfigError(f"dead {self._action}: give entry ids or --all (not both)")
        if self._action == "show" and not self._ids:
            raise ConfigError("dead show: give one or more entry ids")
        if self.limit <= 0:
            raise ConfigError(f"--limit must be > 0, got {self.limit}")
        self.targets()

    def targets(self) -> list[tuple[int, str]]:
        """The ids given as (partition, entry id); ConfigError (exit 2) for an id that does
        not say its partition when partitioned, or says one when not."""
        return [self._target(given) for given in self._ids]

    def _target(self, given: str) -> tuple[int, str]:
        number, separator, entry_id = given.rpartition(PARTITION_SEPARATOR)
        where = f"dead {self._action}: {given!r}"
        if not layout.is_entry_id(entry_id):
            raise ConfigError(f"{where} is not an entry id (MILLISECONDS-SEQUENCE, as `dead "
                              "list` shows them)")  # fmt: skip
        if not self.partitioned:
            if separator:
                raise ConfigError(
                    f"{where} names a partition, but the streams are not partitioned "
                    "(--partitions N or a cluster --redis-url): give the bare entry id"
                )
            return 0, given
        last = self.partitions - 1
        if not separator:
            forms = f"0/{given}" + (f" .. {last}/{given}" if last else "")
            raise ConfigError(
                f"{where}: an entry id is ambiguous over partitions: give PARTITION/ID as "
                f"`dead list` shows it ({forms})"
            )
        if not (number.isascii() and number.isdigit()) or int(number) > last:
            raise ConfigError(f"{where}: the partition must be 0..{last} (PARTITION/ID)")
        return int(number), entry_id


@dataclass(frozen=True)
class Partition:
    """Where one partition's dead letters are: its number, a client of the Redis serving it
    and its keys; ``qualified`` when ids must name the partition (partitioned)."""

    number: int
    redis: aioredis.Redis
    keys: StreamKeys
    qualified: bool

    def shown_id(self, entry_id: str) -> str:
        """The id an operator sees and gives back: qualified when partitioned."""
        if not self.qualified:
            return entry_id
        return f"{self.number}{PARTITION_SEPARATOR}{entry_id}"

    def about(self) -> dict[str, Any]:
        """What JSON output says of the partition (nothing when not partitioned)."""
        return {"partition": self.number} if self.qualified else {}


def _id(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def describe(letter: DeadLetter, partition: Partition) -> dict[str, Any]:
    """A dead letter for people: fields typed, ``data`` summarised (never dumped)."""
    shown: dict[str, Any] = {"id": "", **partition.about(), **letter.shown()}
    shown["id"] = partition.shown_id(letter.id)  # first, and not a field of the letter's own
    shown["data_size"] = len(letter.data)
    try:
        message = decode_send(letter.data)
        shown["from"] = message["from"]
        shown["to"] = message["to"]
        shown["subject"] = message["headers"].get("subject", "")
    except CodecError as exc:
        shown["data_error"] = str(exc)
    return shown


Fields = dict[bytes, bytes]


def _rows(reply: Any) -> list[tuple[str, Fields]]:
    """XRANGE/XREVRANGE rows as (id text, fields); the client's types are loose."""
    return [(_id(raw_id), dict(fields or {})) for raw_id, fields in reply or []]


async def iterate_dead(
    redis: aioredis.Redis, stream: str, page_size: int = PAGE, until: str = "+"
) -> AsyncGenerator[DeadLetter, None]:
    """The stream's dead letters, oldest first, up to ``until`` (an id, included)."""
    start = "-"
    while True:
        page = _rows(await redis.xrange(stream, min=start, max=until, count=page_size))
        for entry_id, fields in page:
            yield DeadLetter.decode(entry_id, fields)
        if len(page) < page_size:
            return
        start = layout.exclusive(page[-1][0])


async def fetch(redis: aioredis.Redis, stream: str, entry_id: str) -> DeadLetter | None:
    found = _rows(await redis.xrange(stream, min=entry_id, max=entry_id, count=1))
    return DeadLetter.decode(*found[0]) if found else None


Placed = tuple[Partition, DeadLetter]


async def oldest_first(
    partitions: Sequence[Partition], page_size: int = PAGE
) -> AsyncGenerator[Placed, None]:
    """Every partition's dead letters, oldest first across them (entry ids are times),
    each stream read page by page as it is needed."""
    readers = [(p, iterate_dead(p.redis, p.keys.dead, page_size)) for p in partitions]
    heads: list[tuple[Placed, AsyncGenerator[DeadLetter, None]]] = []
    try:
        for partition, reader in readers:
            if (letter := await anext(reader, None)) is not None:
                heads.append(((partition, letter), reader))
        while heads:
            index = min(range(len(heads)), key=lambda i: _order(heads[i][0]))
            placed, reader = heads[index]
            yield placed
            if (letter := await anext(reader, None)) is None:
                del heads[index]
            else:
                heads[index] = ((placed[0], letter), reader)
    finally:  # a list cut short by --limit: the readers stop here, not at the loop's end
        for _, reader in readers:
            await reader.aclose()


def _order(placed: Placed) -> tuple[int, int, int]:
    partition, letter = placed
    return (*layout.parse_id(letter.id), partition.number)


async def fetch_targets(
    partitions: Sequence[Partition], config: DeadConfig
) -> AsyncIterator[tuple[Partition, str, DeadLetter | None]]:
    """Each id given, in its partition: (partition, entry id, the letter or None)."""
    for number, entry_id in config.targets():
        partition = partitions[number]
        yield partition, entry_id, await fetch(partition.redis, partition.keys.dead, entry_id)


def _plain(value: Any) -> str:
    """A typed field as table text: lists comma-separated."""
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _line(letter: DeadLetter, partition: Partition) -> str:
    """One table row of a dead letter."""
    when = "-"
    if letter.last_attempt:
        try:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.last_attempt))
        except (OverflowError, OSError, ValueError):  # another producer's inf, nan or 1e30
            when = repr(letter.last_attempt)
    error = (letter.error or "").replace("\n", " ")
    reason = "?" if letter.reason is None else letter.reason
    # Recipients that do not read as an array are shown as stored.
    recipients = _plain(letter.recipients or letter.extra.get(layout.RECIPIENTS, ""))
    shown_id = partition.shown_id(letter.id)
    return f"{shown_id}  {reason:<8}  {when}  {recipients}  {error[:100]}"


async def list_dead(partitions: Sequence[Partition], config: DeadConfig) -> int:
    count = 0
    # No partition is read much past what --limit shows.
    page_size = min(PAGE, config.limit)
    async with contextlib.aclosing(oldest_first(partitions, page_size)) as letters:
        async for partition, letter in letters:
            shown = describe(letter, partition)
            print(
                json.dumps(shown, ensure_ascii=False) if config.json else _line(letter, partition)
            )
            count += 1
            if count >= config.limit:
                break
    if not config.json:
        total = sum([int(await p.redis.xlen(p.keys.dead)) for p in partitions])
        print(f"{count} shown of {total} dead letters", file=sys.stderr)
    return 0


async def show_dead(partitions: Sequence[Partition], config: DeadConfig) -> int:
    status = 0
    async for partition, entry_id, letter in fetch_targets(partitions, config):
        if letter is None:
            print(f"{partition.shown_id(entry_id)}: no such dead letter", file=sys.stderr)
            status = 1
            continue
        shown = describe(letter, partition)
        if config.json:
            print(json.dumps(shown, ensure_ascii=False))
        else:
            print("\n".join(f"{name}: {_plain(value)}" for name, value in shown.items()) + "\n")
    return status


async def _targets(
    partitions: Sequence[Partition], config: DeadConfig
) -> AsyncIterator[tuple[Partition, str, DeadLetter | None]]:
    if not config.all_entries:
        async for target in fetch_targets(partitions, config):
            yield target
        return
    for partition in partitions:  # each partition's letters stay in it
        # Up to the newest letter now: a replay that fails again (the relay still refuses)
        # makes a new letter meanwhile, which this run must not replay again, and again.
        newest = _rows(await partition.redis.xrevrange(partition.keys.dead, count=1))
        if not newest:
            continue
        until = newest[0][0]
        async for letter in iterate_dead(partition.redis, partition.keys.dead, until=until):
            yield partition, letter.id, letter


async def replay_dead(partitions: Sequence[Partition], config: DeadConfig) -> int:
    for redis in {id(p.redis): p.redis for p in partitions}.values():
        await oc.require_functions(redis)  # replay is a Redis function: exit 2 if missing
    replayers = [
        oc.Outcomes(p.redis, p.keys, group="", sent_ttl=1, events_maxlen=1) for p in partitions
    ]
    status, replayed, skipped = 0, 0, 0
    async for partition, entry_id, letter in _targets(partitions, config):
        shown_id = partition.shown_id(entry_id)
        if letter is None:
            print(f"{shown_id}: no such dead letter", file=sys.stderr)
            status = 1
        elif not letter.replayable:
            print(f"{shown_id}: not replayed (invalid: the same data would fail again)",
                  file=sys.stderr)  # fmt: skip
            skipped += 1
        elif (entry := _replay_entry(shown_id, letter)) is None:
            status = 1
        elif (new_id := await replayers[partition.number].replay(entry_id, entry)) is None:
            print(
                f"{shown_id}: gone meanwhile (replayed or purged by someone else)", file=sys.stderr
            )
            status = 1
        else:
            print(f"{shown_id} -> {partition.keys.send} {new_id}")
            replayed += 1
    print(f"replayed {replayed}, skipped {skipped} invalid", file=sys.stderr)
    return status


def _replay_entry(entry_id: str, letter: layout.DeadLetter) -> layout.Fields | None:
    """The send entry a letter becomes, or None (said in one line) when a field written by
    something else does not parse: that letter stays, the others are still replayed."""
    try:
        return letter.replay_entry()
    except ValueError as exc:
        print(f"{entry_id}: not replayed: its recipients field does not parse ({exc})",
              file=sys.stderr)  # fmt: skip
        return None


async def purge_all(partition: Partition) -> int:
    """Every dead letter of the partition up to the newest seen now (dead letters arriving
    meanwhile are kept); how many were removed."""
    redis, stream = partition.redis, partition.keys.dead
    newest = _rows(await redis.xrevrange(stream, count=1))
    if not newest:
        return 0
    # Exact: '~' only drops whole stream nodes, and a node whose newest entry was deleted
    # by id (`purge ID`) keeps its older letters.
    minid = layout.id_after(newest[0][0])
    return int(await redis.xtrim(stream, minid=minid, approximate=False))


async def purge_dead(partitions: Sequence[Partition], config: DeadConfig) -> int:
    if config.all_entries:
        removed = sum([await purge_all(p) for p in partitions])
        print(f"purged {removed}", file=sys.stderr)
        return 0
    by_partition: dict[int, list[str]] = {}
    for number, entry_id in config.targets():
        by_partition.setdefault(number, []).append(entry_id)
    removed = 0
    for number, entry_ids in by_partition.items():
        partition = partitions[number]
        removed += int(await partition.redis.xdel(partition.keys.dead, *entry_ids))
    print(f"purged {removed} of {len(config.ids)}", file=sys.stderr)
    return 0 if removed == len(config.ids) else 1


ACTION_HANDLERS = {"list": list_dead, "show": show_dead, "replay": replay_dead, "purge": purge_dead}


async def main(config: DeadConfig) -> int:
    keys = config.partition_keys()
    async with one_shot_partitions(config.redis_url, keys) as clients:
        partitions = [
            Partition(number, redis, partition_keys, config.partitioned)
            for number, (redis, partition_keys) in enumerate(zip(clients, keys, strict=True))
        ]
        return await ACTION_HANDLERS[config.action](partitions, config)
