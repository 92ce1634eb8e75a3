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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from workers.codec.errors import CodecError
from workers.codec.validate import decode_send
from workers.config import CommonConfig, ConfigError, option
from workers.streams import layout
from workers.streams import outcomes as oc
from workers.streams.connection import one_shot_client
from workers.streams.layout import DeadLetter, StreamKeys

ACTIONS = ("list", "show", "replay", "purge")
PAGE = 500


@dataclass
class DeadConfig(CommonConfig):
    """``mailpool dead``: inspect, replay and purge dead letters."""

    _action: str = option("list", "list, show, replay or purge (positional)")
    _ids: list[str] = option([], "dead-letter entry ids (positional)", repeatable=True)
    all_entries: bool = option(False, "replay/purge every dead letter", flag="--all")
    limit: int = option(100, "dead letters shown by list (oldest first)")
    json: bool = option(False, "print JSON lines instead of a table")

    @staticmethod
    def add_positional_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("_action", metavar="ACTION", choices=ACTIONS, help=" | ".join(ACTIONS))
        parser.add_argument("_ids", metavar="ID", nargs="*", help="dead-letter entry ids")

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


def _id(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def describe(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter for people: fields typed, ``data`` summarised (never dumped)."""
    shown: dict[str, Any] = {"id": letter.id, **letter.shown()}
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


async def iterate_dead(redis: aioredis.Redis, stream: str) -> AsyncIterator[DeadLetter]:
    start = "-"
    while True:
        page = _rows(await redis.xrange(stream, min=start, max="+", count=PAGE))
        for entry_id, fields in page:
            yield DeadLetter.decode(entry_id, fields)
        if len(page) < PAGE:
            return
        start = layout.exclusive(page[-1][0])


async def fetch(redis: aioredis.Redis, stream: str, entry_id: str) -> DeadLetter | None:
    found = _rows(await redis.xrange(stream, min=entry_id, max=entry_id, count=1))
    return DeadLetter.decode(*found[0]) if found else None


def _plain(value: Any) -> str:
    """A typed field as table text: lists comma-separated."""
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _line(letter: DeadLetter) -> str:
    """One table row of a dead letter."""
    when = "-"
    if letter.last_attempt:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.last_attempt))
    error = (letter.error or "").replace("\n", " ")
    reason = "?" if letter.reason is None else letter.reason
    # Recipients that do not read as an array are shown as stored.
    recipients = _plain(letter.recipients or letter.extra.get(layout.RECIPIENTS, ""))
    return f"{letter.id}  {reason:<8}  {when}  {recipients}  {error[:100]}"


async def list_dead(redis: aioredis.Redis, keys: StreamKeys, config: DeadConfig) -> int:
    count = 0
    async for letter in iterate_dead(redis, keys.dead):
        print(json.dumps(describe(letter), ensure_ascii=False) if config.json else _line(letter))
        count += 1
        if count >= config.limit:
            break
    if not config.json:
        total = await redis.xlen(keys.dead)
        print(f"{count} shown of {total} dead letters", file=sys.stderr)
    return 0


async def show_dead(redis: aioredis.Redis, keys: StreamKeys, config: DeadConfig) -> int:
    status = 0
    for entry_id in config.ids:
        letter = await fetch(redis, keys.dead, entry_id)
        if letter is None:
            print(f"{entry_id}: no such dead letter", file=sys.stderr)
            status = 1
            continue
        shown = describe(letter)
        if config.json:
            print(json.dumps(shown, ensure_ascii=False))
        else:
            print("\n".join(f"{name}: {_plain(value)}" for name, value in shown.items()) + "\n")
    return status


async def _targets(
    redis: aioredis.Redis, keys: StreamKeys, config: DeadConfig
) -> AsyncIterator[tuple[str, DeadLetter | None]]:
    if config.all_entries:
        async for letter in iterate_dead(redis, keys.dead):
            yield letter.id, letter
        return
    for entry_id in config.ids:
        yield entry_id, await fetch(redis, keys.dead, entry_id)


async def replay_dead(redis: aioredis.Redis, keys: StreamKeys, config: DeadConfig) -> int:
    await oc.require_functions(redis)  # replay is a Redis function: exit 2 if missing
    outcomes = oc.Outcomes(redis, keys, group="", sent_ttl=1, events_maxlen=1)
    status, replayed, skipped = 0, 0, 0
    async for entry_id, letter in _targets(redis, keys, config):
        if letter is None:
            print(f"{entry_id}: no such dead letter", file=sys.stderr)
            status = 1
        elif not letter.replayable:
            print(f"{entry_id}: not replayed (invalid: the same data would fail again)",
                  file=sys.stderr)  # fmt: skip
            skipped += 1
        elif (entry := _replay_entry(entry_id, letter)) is None:
            status = 1
        elif (new_id := await outcomes.replay(entry_id, entry)) is None:
            print(
                f"{entry_id}: gone meanwhile (replayed or purged by someone else)", file=sys.stderr
            )
            status = 1
        else:
            print(f"{entry_id} -> {keys.send} {new_id}")
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


async def purge_dead(redis: aioredis.Redis, keys: StreamKeys, config: DeadConfig) -> int:
    if config.all_entries:
        # Up to the newest entry seen now: dead letters arriving meanwhile are kept.
        newest = _rows(await redis.xrevrange(keys.dead, count=1))
        if not newest:
            print("purged 0", file=sys.stderr)
            return 0
        removed = int(await redis.xtrim(keys.dead, minid=layout.id_after(newest[0][0])))
        print(f"purged {removed}", file=sys.stderr)
        return 0
    removed = int(await redis.xdel(keys.dead, *config.ids))
    print(f"purged {removed} of {len(config.ids)}", file=sys.stderr)
    return 0 if removed == len(config.ids) else 1


ACTION_HANDLERS = {"list": list_dead, "show": show_dead, "replay": replay_dead, "purge": purge_dead}


async def main(config: DeadConfig) -> int:
    async with one_shot_client(config.redis_url) as redis:
        return await ACTION_HANDLERS[config.action](redis, config.stream_keys(), config)
