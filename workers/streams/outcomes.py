"""The Redis side of delivery outcomes: idempotency records, retries, dead letters, events.

A send entry is always in exactly one of three places, and every move between them is one
Redis function (atomic in Redis; the Lua is in :mod:`workers.streams.functions`) or, for
the commonest move, one transaction (below):

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
outcome, and one message never waits in two places.

The hot path, a settlement run for the first time that only records accepted recipients
and their ``delivered`` events (:func:`is_plain_delivery`), is a ``MULTI``/``EXEC``
transaction of the same commands instead, one for all such settlements of a batch (each
one's result read from its own part of EXEC's reply; an error in one part leaves the others
applied, as separate transactions would): no retry or dead letter can end up in two places,
and its one condition does not arise.  A first run cannot have been applied before.  An
entry another worker acknowledged first (it claimed the entry while we were stalled, before
our record existed) was sent by that worker too, or dead-lettered (expired, poison): our
``delivered`` event still says what our relay did, where the function would write none.
With the function Redis spends a third more CPU per delivered 2 KB message (28.3 against
21.2 us, medians of 7 alternated rounds of bench/redis_floor.py's delivery round; the raw
floor measured 15.4): its arguments are converted into Lua and back.  The worker pays for
the transaction's replies (a QUEUED and a result per command) instead of one: 0.92x the
messages per CPU-second with a transaction per message (4367 against 4748, medians of 8
alternated rounds of bench/delivery.py's worker), a trade made for the shared Redis, which
workers cannot scale out of.  One transaction per batch instead of per message (about 7
messages a batch at --concurrency 10) took the bare client's settlement commands from
1.22-1.49x to 1.15-1.26x the raw floor (bench/redis_floor.py's COMMANDS line, 3 alternated
runs each) and the worker to 0.96-1.07x its CPU per message (5 alternated pairs, median
1.04x).
Every later run of a settlement (the settler's retry after a failed round trip) takes the
function, whose acknowledgement check writes nothing a first run wrote.

``promote_due`` moves due retries back into the send stream as new entries that carry the
original ``data`` untouched plus the bookkeeping fields of a retry entry
(:mod:`workers.streams.layout`), so any worker picks them up.

Idempotency records: the hash ``<prefix>sent:<message id>`` maps each accepted recipient to
the time it was first accepted; it expires ``sent_ttl`` seconds after the last write.

Replicas (``min_replicas``): a batch of settlements ends with ``WAIT``, on the connection that
ran them.  When fewer replicas than asked acknowledge them in time, every settlement of the
batch counts as not applied (:class:`ReplicasMissing`): the settler runs it again until a
``WAIT`` confirms it (a second run writes nothing), and a worker that stops first leaves the
entry pending, to be claimed and decided by the duplicate guard, as after any failure.  A
failover then cannot take back a settlement the worker counted as done, which would send the
message again.  One gap: a second run that finds its work already done, on another connection
than the first (the first one broke), confirms what that connection wrote, so only a replica
that syncs meanwhile is certain to hold the first run's writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from workers.streams import functions, layout, redis_fence
from workers.streams.hiredis_fence import pack_command
from workers.streams.layout import Fields, StreamKeys

log = structlog.get_logger("mailpool.delivery")


@dataclass(frozen=True)
class Retry:
    due: float  # epoch seconds
    fields: Mapping[str, str | bytes | int | float]  # the retry entry (layout.retry_entry)


@dataclass(slots=True, kw_only=True)  # not frozen: one per message (frozen __init__ costs 2x)
class Settlement:
    """Everything that happens to one read entry once its fate is known (built with keyword
    arguments only: five of its six fields are lists or optional and easy to swap)."""

    entry_id: str
    message_id: str
    accepted: list[str] = field(default_factory=list)  # recorded as sent before the ack
    dead_letters: list[Fields] = field(default_factory=list)  # layout.dead_letter
    retry: Retry | None = None
    events: list[Fields] = field(default_factory=list)  # layout.event


@dataclass(slots=True)  # not frozen: one per message looked up
class SentLookup:
    """One message's question to :meth:`Outcomes.already_sent`: which of these recipients
    did a relay accept already (and which of them for the entry ``entry_id`` itself)?"""

    message_id: str
    recipients: Sequence[str]
    entry_id: str = ""


@dataclass(slots=True)
class Accepted:
    """A lookup's answer: the recipients a relay accepted before, and those of them whose
    record the asking entry wrote itself (read again after a failover took its read back:
    its outcome was written then)."""

    recipients: set[str]
    by_this_entry: set[str]


def _accepted(lookup: SentLookup, marks: Sequence[bytes | None]) -> Accepted:
    recipients, by_this_entry = set(), set()
    for rcpt, mark in zip(lookup.recipients, marks, strict=True):
        if mark is not None:
            recipients.add(rcpt)
            if layout.sent_by(mark, lookup.entry_id):
                by_this_entry.add(rcpt)
    return Accepted(recipients, by_this_entry)


def _pairs(fields: Mapping[str, str | bytes | int | float]) -> list[str | bytes | int]:
    flat: list[str | bytes | int] = []
    for name, value in fields.items():
        flat += (name, repr(value) if isinstance(value, float) else value)
    return flat


def _section(
    kind: str, fields: Mapping[str, str | bytes | int | float], due: str = "0"
) -> list[str | bytes | int]:
    return [kind, len(fields), due, *_pairs(fields)]


def _event_section(event: layout.Fields) -> str:
    """The section kind of an event: those of accepted recipients are told apart (settle
    writes them also for an entry a failover left unread).  An ``already_sent`` event is
    this entry's alone: written only with its own acknowledgement."""
    accepted = (
        event.get(layout.EVENT) == layout.EVENT_DELIVERED and layout.ALREADY_SENT not in event
    )
    return functions.SECTION_ACCEPTED_EVENT if accepted else functions.SECTION_EVENT


def is_plain_delivery(s: Settlement) -> bool:
    """Accepted recipients and their ``delivered`` events, nothing else: the settlement of
    most messages, which a first run applies as a transaction (module docstring)."""
    return (
        bool(s.accepted)
        and not s.dead_letters
        and s.retry is None
        and all(_event_section(event) == functions.SECTION_ACCEPTED_EVENT for event in s.events)
    )


@dataclass(slots=True)
class _Transaction:
    """Consecutive plain deliveries of a batch settled in one ``MULTI``/``EXEC``: per
    settlement, how many commands it queued and where its XACK's reply is among theirs
    (after its HSETNXs and its EXPIRE)."""

    queued: list[int] = field(default_factory=list)
    xack_at: list[int] = field(default_factory=list)

    @property
    def replies(self) -> int:
        """Replies to read: MULTI's, one per queued command, EXEC's."""
        return sum(self.queued) + 2


def _transaction_results(replies: Sequence[object], shape: _Transaction) -> list[bool | RedisError]:
    """Each settlement's result from its transaction's replies (MULTI's, one per queued
    command, EXEC's): True when its XACK acknowledged the entry, or the error that kept it
    from being applied whole."""
    *queued, executed = replies
    # +OK, then QUEUED, or the error queueing a command got (then EXEC aborts).
    failed = next((r for r in queued if isinstance(r, ResponseError)), None)
    if isinstance(executed, ResponseError):  # EXECABORT: nothing was applied
        return [failed or executed] * len(shape.queued)
    if not isinstance(executed, list):  # nil is for a WATCH that failed: none is set
        return [RedisError(f"EXEC answered {executed!r}")] * len(shape.queued)
    results: list[bool | RedisError] = []
    start = 0
    for count, xack_at in zip(shape.queued, shape.xack_at, strict=True):
        own = executed[start : start + count]
        start += count
        errors = [r for r in own if isinstance(r, Exception)]
        # Applied in part (a key of the wrong type: an operator's key clashing with ours).
        # Unlike the function, which stops at its first error, EXEC runs the other
        # commands: the entry is acknowledged, so the settler's next run (the function)
        # writes nothing, and what failed here stays unwritten.  Reported, so the settler
        # logs it; the other settlements of the transaction stand.
        results.append(RedisError(str(errors[0])) if errors else bool(own[xack_at]))
    return results


def _function_result(reply: object) -> bool | RedisError:
    return reply if isinstance(reply, ResponseError) else bool(reply)


class ReplicasMissing(RedisError):
    """A batch of settlements was applied, but fewer replicas than asked confirmed it."""


_MULTI, _EXEC = pack_command(["MULTI"]), pack_command(["EXEC"])
SETTLE_IDLE_CHECK = 5.0  # seconds idle after which the settlement connection is probed


class Outcomes:
    """Idempotency checks, settlements and retry promotion, each one round trip per batch."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: StreamKeys,
        *,
        group: str,
        sent_ttl: float,
        events_maxlen: int,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.sent_ttl = max(1, int(sent_ttl))
        self.events_maxlen = events_maxlen
        self.min_replicas = min_replicas
        self.replica_timeout_ms = max(1, round(replica_timeout * 1000))
        self._settlements = redis_fence.HeldConnection(
            redis.connection_pool, idle_check=SETTLE_IDLE_CHECK
        )
        # May this Redis user run MULTI/EXEC (check_transactions)?  Without, plain deliveries
        # settle through the function too.
        self.transactions = True

    async def check_transactions(self) -> None:
        """At start: an ACL file from before the transactions (no ``+multi +exec`` for the
        delivery user) would refuse MULTI and EXEC but run the commands between them one by
        one; such a user settles everything through the function, and a warning says so."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.ping()
                await pipe.execute()
        except NoPermissionError as exc:
            self.transactions = False
            log.warning(
                "settling_without_transactions", error=str(exc), stream=self.keys.send,
                fix="give the delivery user +multi +exec +discard (deploy/redis/users.acl)",
            )  # fmt: skip

    async def already_sent(self, wanted: Sequence[SentLookup]) -> list[set[str]]:
        """For each lookup: the recipients among its own already accepted by a relay."""
        accepted, _ = await self.look_up(wanted, [])
        return [answer.recipients for answer in accepted]

    async def look_up(
        self, wanted: Sequence[SentLookup], addresses: Sequence[str]
    ) -> tuple[list[Accepted], list[float | None]]:
        """What a relay accepted before for ``wanted``, and the suppression list's end
        (epoch seconds, None: not on it) of each of ``addresses`` (normalised), in one
        round trip (none when there is nothing to ask)."""
        if not wanted and not addresses:
            return [], []
        pipe = self.redis.pipeline(transaction=False)
        for lookup in wanted:
            pipe.hmget(self.keys.sent(lookup.message_id), list(lookup.recipients))
        if addresses:
            pipe.zmscore(self.keys.suppressed, list(addresses))
        replies = await pipe.execute()
        ends = list(replies.pop()) if addresses else []
        return [
            _accepted(lookup, marks) for lookup, marks in zip(wanted, replies, strict=True)
        ], ends

    async def settle(
        self, settlements: Sequence[Settlement], now: float, *, first_run: bool = False
    ) -> list[bool | RedisError]:
        """Apply settlements (one function call or transaction each, one round trip).

        ``first_run``: none of them was sent to Redis before, so plain deliveries may take
        the transaction (module docstring); a run after a failed one must not say so.

        Per settlement: True where we acknowledged the entry, False where it was already
        acknowledged (by another worker, or by an earlier run of this same settlement whose
        reply was lost), or the error that kept it from being applied (the caller retries
        just those, not as a first run; running one again is harmless).
        """
        if not settlements:
            return []
        results = await self.settle_batch(settlements, now, first_run=first_run)
        missing = [
            i for i, r in enumerate(results)
            if isinstance(r, ResponseError) and functions.is_function_missing(r)
        ]  # fmt: skip
        if missing:  # the library is gone (FUNCTION FLUSH, Redis lost its data): load, redo
            await functions.ensure_library(self.redis)
            redone = await self.settle_batch([settlements[i] for i in missing], now)
            for i, result in zip(missing, redone, strict=True):
                results[i] = result
        return results

    def settle_command(self, s: Settlement, now: str) -> list[str | bytes | int]:
        """FCALL of the settle function for one settlement; ``now`` is ``repr(time)``, written
        once per batch.  Public so that other ways of sending the batch can be measured
        (bench/redis_fence.py)."""
        keys = self.keys
        command: list[str | bytes | int] = [
            "FCALL", functions.SETTLE, 6, keys.send, keys.dead, keys.events,
            keys.retry_schedule, keys.retry_payload(s.entry_id), keys.sent(s.message_id),
            # The function writes its third argument as the record's value: "now" in its
            # text, the record's mark (layout.sent_mark) since the mark names the entry.
            self.group, s.entry_id, layout.sent_mark(now, s.entry_id), self.sent_ttl,
            self.events_maxlen, len(s.accepted), *s.accepted,
        ]  # fmt: skip
        for dead in s.dead_letters:
            command += _section(functions.SECTION_DEAD, dead)
        if s.retry is not None:
            command += _section(functions.SECTION_RETRY, s.retry.fields, repr(s.retry.due))
        for event in s.events:
            command += _section(_event_section(event), event)
        return command

    def delivered_commands(self, s: Settlement, now: str) -> list[list[str | bytes | int]]:
        """A plain delivery's commands (:func:`is_plain_delivery`), what the settle function
        runs for it, queued in a transaction: record, acknowledge, events."""
        keys, sent = self.keys, self.keys.sent(s.message_id)
        mark = layout.sent_mark(now, s.entry_id)
        commands: list[list[str | bytes | int]] = [
            ["HSETNX", sent, recipient, mark] for recipient in s.accepted
        ]
        commands.append(["EXPIRE", sent, self.sent_ttl])
        commands.append(["XACK", keys.send, self.group, s.entry_id])
        commands += [
            ["XADD", keys.events, "MAXLEN", "~", self.events_maxlen, "*", *_pairs(event)]
            for event in s.events
        ]
        return commands

    async def settle_batch(
        self, settlements: Sequence[Settlement], now: float, *, first_run: bool = False
    ) -> list[bool | RedisError]:
        """FCALL per settlement (on a ``first_run``, one transaction for each run of
        consecutive plain deliveries), all written at once on one connection, packed by
        hiredis; one result per settlement, as :meth:`settle` returns them (without its
        reload of a missing library).

        This is the per-message hot path: redis-py's pipeline costs 10% more CPU per
        message (figures in :mod:`workers.streams.redis_fence`).  It is the seam where
        bench/redis_fence.py puts its variants (a subclass or a swapped method, built from
        :meth:`settle_command`).
        """
        parts, packed = self._packed(settlements, repr(now), first_run=first_run)
        if self.min_replicas:
            packed.append(pack_command(["WAIT", self.min_replicas, self.replica_timeout_ms]))
        expected = sum(1 if part is None else part.replies for part in parts)
        async with self._settlements.use() as connection:
            await redis_fence.send_packed(connection, b"".join(packed))
            # An error reply fails its settlement only; the others stand.
            replies = iter(await redis_fence.read_replies(connection, expected))
            results: list[bool | RedisError] = []
            for part in parts:
                if part is None:
                    results.append(_function_result(next(replies)))
                else:
                    own = [next(replies) for _ in range(part.replies)]
                    results += _transaction_results(own, part)
            if self.min_replicas:
                missing = await self._replicas_missing(connection)
                if missing is not None:
                    results = [r if isinstance(r, RedisError) else missing for r in results]
            return results

    def _packed(
        self, settlements: Sequence[Settlement], now: str, *, first_run: bool
    ) -> tuple[list[_Transaction | None], list[bytes]]:
        """The batch's commands, packed, and its parts in order: a transaction of plain
        deliveries (one MULTI/EXEC for all of them: two commands a message fewer than one
        each), or None for one settlement's FCALL."""
        parts: list[_Transaction | None] = []
        packed: list[bytes] = []
        transaction: _Transaction | None = None
        for s in settlements:
            if first_run and self.transactions and is_plain_delivery(s):
                if transaction is None:
                    transaction = _Transaction()
                    parts.append(transaction)
                    packed.append(_MULTI)
                commands = self.delivered_commands(s, now)
                transaction.queued.append(len(commands))
                transaction.xack_at.append(len(s.accepted) + 1)
                packed += map(pack_command, commands)
                continue
            if transaction is not None:
                packed.append(_EXEC)
                transaction = None
            parts.append(None)
            packed.append(pack_command(self.settle_command(s, now)))
        if transaction is not None:
            packed.append(_EXEC)
        return parts, packed

    async def _replicas_missing(self, connection: AbstractConnection) -> ReplicasMissing | None:
        """None when ``WAIT``'s reply counts ``min_replicas`` replicas."""
        acked = int(await redis_fence.read_reply(connection))
        if acked >= self.min_replicas:
            return None
        return ReplicasMissing(
            f"{acked} of {self.min_replicas} replicas confirmed the settlements within "
            f"{self.replica_timeout_ms} ms"
        )

    async def aclose(self) -> None:
        """Give the settlement connection back to the pool."""
        await self._settlements.aclose()

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


async def promote_due(redis: aioredis.Redis, keys: StreamKeys, now: float, limit: int = 100) -> int:
    """Move retries due by ``now`` back into the send stream (delivery and housekeeping)."""
    keys_used = [keys.retry_schedule, keys.send]
    args: list[str | int | float] = [now, limit, keys.retry_payload_prefix]
    return int(await functions.fcall(redis, functions.PROMOTE, keys_used, args))


def describe_replies(replies: Mapping[str, layout.SmtpReply]) -> str:
    """``rcpt: 550 text; rcpt2: ...`` for the dead letter's error field (bounded length)."""
    parts = [
        f"{rcpt}: {r.code} {r.text}".strip() if r.code else f"{rcpt}: {r.text or 'no reply'}"
        for rcpt, r in replies.items()
    ]
    return "; ".join(parts)[: layout.MAX_ERROR_TEXT]


def first_reply(replies: Mapping[str, layout.SmtpReply]) -> layout.SmtpReply | None:
    """The reply a dead letter or event quotes: the first one a server actually gave."""
    with_code = [r for r in replies.values() if r.code is not None]
    return with_code[0] if with_code else next(iter(replies.values()), None)
