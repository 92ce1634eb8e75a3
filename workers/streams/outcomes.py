"""The Redis side of delivery outcomes: idempotency records, retries, dead letters, events.

A send entry is always in exactly one of three places, and every move between them is one
Redis function (atomic in Redis; the Lua is in :mod:`workers.streams.functions`):

* **in progress**: an entry of the send stream, pending in the ``delivery`` group (or not
  yet read by it);
* **waiting for retry**: a member of the schedule ``<prefix>retry`` (a sorted set scored by
  the due time, epoch seconds) plus its entry fields in the hash ``<prefix>retry:<entry id>``;
* **dead**: an entry of the dead-letter stream.

``settle`` records the recipients the relay accepted, acknowledges the entry and, in the
same function, adds its dead letters, its retry and its events, only when that acknowledgement
was its own.  A settlement that runs twice (it was applied, but the reply was lost with the
connection, so the settler sends it again) or that finds the entry acknowledged by another
worker (one that claimed it while we were slow) writes nothing more: one event per
outcome, and one message never waits in two places.  ``promote_due`` moves due retries back
into the send stream as new entries that carry the original ``data`` untouched plus the
bookkeeping fields below, so any worker picks them up.

Idempotency records: the hash ``<prefix>sent:<message id>`` maps each accepted recipient to
the time it was first accepted; it expires ``sent_ttl`` seconds after the last write.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from workers.streams import functions
from workers.streams.keys import StreamKeys
from workers.streams.redis_compat import checkout, is_stale

# Fields a retry or replay entry of the send stream carries next to the original ``data``.
# A producer's entry has only ``data``; these let the worker keep the message id, attempt
# count and remaining recipients across retries and replays.
FIELD_DATA = "data"
FIELD_MESSAGE_ID = "message_id"  # the idempotency id (message "id", else the source entry id)
FIELD_SOURCE_ID = "source_id"  # the producer's entry id in the send stream
FIELD_ATTEMPTS = "attempts"  # SMTP attempts made so far
FIELD_FIRST_ATTEMPT = "first_attempt"  # epoch seconds
FIELD_RECIPIENTS = "recipients"  # JSON array: the recipients still to send to
FIELD_REPLAY_OF = "replay_of"  # the dead-letter entry id a replay came from

Fields = Mapping[str, str | bytes | int | float]

SETTLE_IDLE_CHECK = 5.0  # seconds idle after which the settlement connection is re-checked


@dataclass(frozen=True)
class OutcomeKeys:
    send: str
    dead: str
    events: str
    retry_schedule: str  # sorted set: retry member (entry id) -> due time
    retry_payload_prefix: str  # + entry id: hash of the entry fields to re-add when due
    sent_prefix: str  # + message id: hash recipient -> accepted at

    @classmethod
    def from_stream_keys(cls, keys: StreamKeys) -> OutcomeKeys:
        return cls(
            send=keys.send,
            dead=keys.dead,
            events=keys.events,
            retry_schedule=keys.internal("retry"),
            retry_payload_prefix=keys.internal("retry", ""),
            sent_prefix=keys.internal("sent", ""),
        )

    def sent(self, message_id: str) -> str:
        return self.sent_prefix + message_id

    def retry_payload(self, entry_id: str) -> str:
        return self.retry_payload_prefix + entry_id


@dataclass(frozen=True)
class Retry:
    due: float  # epoch seconds
    fields: Fields  # the send-stream entry to add when due


@dataclass
class Settlement:
    """Everything that happens to one read entry once its fate is known."""

    entry_id: str
    message_id: str
    accepted: list[str] = field(default_factory=list)  # recorded as sent before the ack
    dead_letters: list[Fields] = field(default_factory=list)
    retry: Retry | None = None
    events: list[Fields] = field(default_factory=list)


def _pairs(fields: Fields) -> list[str | bytes | int]:
    flat: list[str | bytes | int] = []
    for name, value in fields.items():
        flat += (name, repr(value) if isinstance(value, float) else value)
    return flat


def _section(kind: str, fields: Fields, due: str = "0") -> list[str | bytes | int]:
    return [kind, len(fields), due, *_pairs(fields)]


class Outcomes:
    """Idempotency checks, settlements and retry promotion, each one round trip per batch."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: OutcomeKeys,
        *,
        group: str,
        sent_ttl: float,
        events_maxlen: int,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.sent_ttl = max(1, int(sent_ttl))
        self.events_maxlen = events_maxlen
        # Settlements keep one connection: a pool checkout per round trip (lock, liveness
        # probe, bookkeeping) costs as much CPU as the settlement's own Python work.
        self._settle_connection: AbstractConnection | None = None
        self._settle_used = 0.0  # monotonic time of its last round trip
        self._settle_lock = asyncio.Lock()

    async def already_sent(self, wanted: Sequence[tuple[str, Sequence[str]]]) -> list[set[str]]:
        """For each (message id, recipients): the recipients already accepted by a relay."""
        if not wanted:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for message_id, recipients in wanted:
            pipe.hmget(self.keys.sent(message_id), list(recipients))
        replies = await pipe.execute()
        return [
            {rcpt for rcpt, mark in zip(recipients, marks, strict=True) if mark is not None}
            for (_, recipients), marks in zip(wanted, replies, strict=True)
        ]

    async def settle(
        self, settlements: Sequence[Settlement], now: float
    ) -> list[bool | RedisError]:
        """Apply settlements (one function call each, one round trip).

        Per settlement: True where we acknowledged the entry, False where it was already
        acknowledged (by another worker, or by an earlier run of this same settlement whose
        reply was lost), or the error that kept it from being applied (the caller retries
        just those; running one again is harmless).
        """
        if not settlements:
            return []
        results = await self._settle_batch(settlements, now)
        missing = [
            i for i, r in enumerate(results)
            if isinstance(r, ResponseError) and functions.is_function_missing(r)
        ]  # fmt: skip
        if missing:  # the library is gone (FUNCTION FLUSH, Redis lost its data): load, redo
            await functions.ensure_library(self.redis)
            redone = await self._settle_batch([settlements[i] for i in missing], now)
            for i, result in zip(missing, redone, strict=True):
                results[i] = result
        return results

    def _settle_command(self, s: Settlement, now: str) -> list[str | bytes | int]:
        """FCALL of the settle function for one settlement (floats already written as text)."""
        keys = self.keys
        command: list[str | bytes | int] = [
            "FCALL", functions.SETTLE, 6, keys.send, keys.dead, keys.events,
            keys.retry_schedule, keys.retry_payload(s.entry_id), keys.sent(s.message_id),
            self.group, s.entry_id, now, self.sent_ttl, self.events_maxlen, len(s.accepted),
            *s.accepted,
        ]  # fmt: skip
        for dead in s.dead_letters:
            command += _section("dead", dead)
        if s.retry is not None:
            command += _section("retry", s.retry.fields, repr(s.retry.due))
        for event in s.events:
            command += _section("event", event)
        return command

    async def _settle_batch(
        self, settlements: Sequence[Settlement], now: float
    ) -> list[bool | RedisError]:
        """FCALL per settlement, all written at once on one connection, packed by hiredis.

        This is the per-message hot path: redis-py's pipeline costs more CPU than the send's
        own SMTP exchange.
        """
        now_text = repr(now)
        packed = b"".join(
            # hiredis's stub declares a 1-tuple; it takes a tuple of any length
            hiredis.pack_command(tuple(self._settle_command(s, now_text)))  # type: ignore[arg-type]
            for s in settlements
        )
        async with self._settle_lock:
            connection = await self._held_connection()
            try:
                await connection.send_packed_command(packed)
                results: list[bool | RedisError] = []
                for _ in settlements:
                    try:
                        results.append(bool(await connection.read_response()))
                    except ResponseError as exc:  # this one failed; the others stand
                        results.append(exc)
                return results
            except BaseException:
                await self._give_back(disconnect=True)  # replies may be left unread on it
                raise

    async def _held_connection(self) -> AbstractConnection:
        """The settlement connection, checked after an idle spell: the server may have closed
        it meanwhile (Redis ``timeout``), which the pool's checkout does not notice while
        redis-py's maintenance notifications are on."""
        now = time.monotonic()
        connection = self._settle_connection
        if connection is None:
            connection = await checkout(self.redis.connection_pool)
            self._settle_connection = connection
        elif now - self._settle_used > SETTLE_IDLE_CHECK and await is_stale(connection):
            await connection.disconnect()  # the next command connects again
        self._settle_used = now
        return connection

    async def _give_back(self, *, disconnect: bool) -> None:
        connection, self._settle_connection = self._settle_connection, None
        if connection is not None:
            if disconnect:
                await connection.disconnect()
            await self.redis.connection_pool.release(connection)

    async def aclose(self) -> None:
        """Give the settlement connection back to the pool."""
        async with self._settle_lock:
            await self._give_back(disconnect=False)

    async def promote_due(self, now: float, limit: int = 100) -> int:
        """Move retries due by ``now`` back into the send stream; returns how many."""
        return await promote_due(self.redis, self.keys, now, limit)

    async def replay(self, dead_id: str, fields: Fields) -> str | None:
        """Move one dead letter back to the send stream as ``fields``; None when it is gone."""
        keys = [self.keys.dead, self.keys.send]
        new_id = await functions.fcall(
            self.redis, functions.REPLAY, keys, [dead_id, *_pairs(fields)]
        )
        if new_id is None:
            return None
        return new_id.decode() if isinstance(new_id, bytes) else str(new_id)


async def require_functions(redis: aioredis.Redis) -> None:
    """At a role's start: the Redis functions it calls are loaded (else one line, exit 2)."""
    await functions.require_library(redis)


async def promote_due(
    redis: aioredis.Redis, keys: OutcomeKeys, now: float, limit: int = 100
) -> int:
    """Move retries due by ``now`` back into the send stream (delivery and housekeeping)."""
    keys_used = [keys.retry_schedule, keys.send]
    args: list[str | int | float] = [now, limit, keys.retry_payload_prefix]
    return int(await functions.fcall(redis, functions.PROMOTE, keys_used, args))


def recipients_text(recipients: Sequence[str]) -> str:
    """Recipient lists in entries are JSON arrays (readable from any language)."""
    return json.dumps(list(recipients), ensure_ascii=False)


def recipients_from_text(text: bytes | str | None) -> list[str] | None:
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise ValueError("recipients must be a JSON array of strings")
    return value


class SmtpReply(Protocol):
    """An SMTP reply as the transports report it (code None: no reply, e.g. a timeout)."""

    @property
    def code(self) -> int | None: ...

    @property
    def text(self) -> str: ...


MAX_ERROR_TEXT = 2000


def describe_replies(replies: Mapping[str, SmtpReply]) -> str:
    """``rcpt: 550 text; rcpt2: ...`` for the dead letter's error field (bounded length)."""
    parts = [f"{rcpt}: {r.code or 'no reply'} {r.text}".strip() for rcpt, r in replies.items()]
    return "; ".join(parts)[:MAX_ERROR_TEXT]


def first_reply(replies: Mapping[str, SmtpReply]) -> SmtpReply | None:
    """The reply a dead letter or event quotes: the first one a server actually gave."""
    with_code = [r for r in replies.values() if r.code is not None]
    return with_code[0] if with_code else next(iter(replies.values()), None)


@dataclass(frozen=True)
class MessageRef:
    """What dead letters and events say about the message they concern."""

    message_id: str
    source_id: str
    data: bytes


def dead_letter(
    ref: MessageRef,
    *,
    reason: str,
    error: str,
    recipients: Sequence[str],
    attempts: int,
    first_attempt: float,
    last_attempt: float,
    reply: SmtpReply | None = None,
) -> dict[str, str | bytes | int | float]:
    """Dead-letter entry fields (contract.md): ``data`` untouched plus why it is dead."""
    fields: dict[str, str | bytes | int | float] = {
        FIELD_DATA: ref.data,
        "reason": reason,
        "error": error[:MAX_ERROR_TEXT],
        "recipients": recipients_text(recipients),
        FIELD_ATTEMPTS: attempts,
        FIELD_FIRST_ATTEMPT: repr(first_attempt),
        "last_attempt": repr(last_attempt),
        FIELD_SOURCE_ID: ref.source_id,
        FIELD_MESSAGE_ID: ref.message_id,
    }
    code = _server_code(reply)
    if reply is not None and code is not None:  # only where a server answered
        fields["smtp_code"] = code
        fields["smtp_text"] = reply.text
    return fields


def _server_code(reply: SmtpReply | None) -> int | None:
    """The reply's code when a server gave one (2xx-5xx, as the schemas say), else None: a
    local failure (timeout, connection lost, a reply too long to read) has no SMTP code."""
    if reply is None or reply.code is None or not 200 <= reply.code <= 599:
        return None
    return reply.code


def event(
    kind: str,
    ref: MessageRef,
    recipients: Sequence[str],
    reply: SmtpReply | None,
    now: float,
    *,
    next_attempt: float | None = None,
) -> dict[str, str | bytes | int | float]:
    """An ``email.send.events`` entry: delivered, deferred (with next_attempt) or failed.

    ``smtp_code`` and ``smtp_text`` are the server's reply, both empty when no server
    answered; then ``error`` says what happened instead (timeout, connection refused).
    """
    code = _server_code(reply)
    fields: dict[str, str | bytes | int | float] = {
        "event": kind,
        "id": ref.message_id,
        FIELD_SOURCE_ID: ref.source_id,
        "recipients": recipients_text(recipients),
        "smtp_code": "" if code is None else code,
        "smtp_text": "" if reply is None or code is None else reply.text,
    }
    if reply is not None and code is None and reply.text:
        fields["error"] = reply.text[:MAX_ERROR_TEXT]
    if next_attempt is not None:
        fields["next_attempt"] = repr(round(next_attempt, 3))
    fields["time"] = repr(round(now, 3))
    return fields
