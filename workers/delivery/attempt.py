"""One attempt at a send entry: what was read, the message built from it, and the settlement
each way it can end (sent, deferred, refused, expired, invalid, poison, nothing left to do).

No state of the worker's here: the functions take what they need and return what Redis is
to record (:class:`workers.streams.outcomes.Settlement`), logging and counting on the way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

import structlog

from workers.codec.build import BuiltMessage, build_message
from workers.codec.errors import CodecError
from workers.codec.types import SendMessage
from workers.codec.wire import unpack
from workers.config import DeliveryConfig
from workers.metrics import DELIVERY_DEAD, DELIVERY_DEFERRED, DELIVERY_SENT
from workers.relay import Reply, SendResult
from workers.streams import layout, suppression
from workers.streams import outcomes as oc
from workers.streams.consumer import StreamEntry
from workers.streams.retry import RetryPolicy
from workers.streams.suppression import SuppressionView

log = structlog.get_logger("mailpool.delivery")


@dataclass(slots=True)  # not frozen: built per message, and frozen __init__ costs 2x
class Job:
    """A send entry as read: the producer's ``data`` plus what retries and replays carry."""

    entry_id: str
    data: bytes
    deliveries: int
    source_id: str
    message_id: str | None  # carried by retries/replays; else from the message or entry id
    attempts: int
    first_attempt: float | None
    recipients: list[str] | None  # carried by retries/replays: who is still to be sent
    replay_of: str | None = None  # an operator's `dead replay` (and its retries): the dead
    # letter it came from; sent even to suppressed recipients

    @classmethod
    def from_entry(cls, entry: StreamEntry, fields: layout.RawFields) -> Job:
        sent = layout.SendEntry.decode(fields)
        return cls(
            entry.id, sent.data, entry.deliveries, sent.source_id or entry.id,
            sent.message_id, sent.attempts, sent.first_attempt, sent.recipients,
            sent.replay_of,
        )  # fmt: skip


@dataclass(slots=True)
class Prepared:
    job: Job
    ref: layout.MessageRef
    built: BuiltMessage
    recipients: list[str]  # wanted for this attempt (before the idempotency check)
    policy: RetryPolicy
    ignore_suppression: bool = False  # the message's own "ignore_suppression": true


def prepare(
    entry: StreamEntry, config: DeliveryConfig, policy: RetryPolicy
) -> Prepared | oc.Settlement:
    """Decode and build an entry, or the settlement of one that cannot be sent (trimmed
    while pending: acknowledged; unreadable or invalid: a dead letter)."""
    if entry.fields is None:
        log.error("entry_trimmed_while_pending", entry=entry.id, stream=config.send_stream)
        return oc.Settlement(entry_id=entry.id, message_id=entry.id)
    job: Job | None = None
    try:
        job = Job.from_entry(entry, entry.fields)
        # build_message validates (SchemaError/BuildError), so the map is not checked twice.
        message = cast(SendMessage, unpack(job.data))
        built = build_message(
            message, default_id=job.source_id, hostname=config.hostname,
            keys=config.signing_keys,
        )  # fmt: skip
    except (CodecError, ValueError) as exc:  # ValueError: our own fields were mangled
        return invalid(entry, job, exc)
    except Exception as exc:  # a builder bug must not crash-loop every worker on one entry
        log.exception("build_crashed", entry=entry.id)
        return invalid(entry, job, exc)
    message_id = job.message_id or message.get("id") or job.source_id
    if "max_attempts" in message or "max_age" in message:  # the message's own limits
        policy = replace(
            policy,
            max_attempts=message.get("max_attempts", policy.max_attempts),
            max_age=message.get("max_age", policy.max_age),
        )
    ref = layout.MessageRef(message_id, job.source_id, job.data)
    recipients = job.recipients or built.recipients
    ignore_suppression = job.replay_of is not None or message.get("ignore_suppression") is True
    return Prepared(job, ref, built, recipients, policy, ignore_suppression)


@dataclass(slots=True)
class Known:
    """What Redis knows of one message's recipients before it is sent."""

    accepted: set[str]  # accepted by a relay before (the duplicate guard)
    suppressed: dict[str, float]  # on the suppression list: until when (epoch seconds)
    # Of accepted: those an earlier entry sent, not this one (its outcome written then).
    sent_before: list[str]


async def look_up(
    outcomes: oc.Outcomes,
    batch: list[Prepared],
    *,
    reads_may_be_taken_back: bool,
    suppressions: SuppressionView | None,
    only: list[str] | None = None,
) -> list[Known]:
    """Recipients accepted before, and those suppressed, per message (one round trip for
    the batch; none when there is nothing to ask).

    An entry read for the first time whose id is its own entry id (no message ``id``, not a
    retry or replay) cannot have been sent before: it is not looked up.  Unless reads may be
    taken back: a read that reached a primary but not its replica is undone by a failover,
    and the entry, sent and recorded meanwhile, comes again as a first delivery
    (``--min-replicas``: the settlements wait for a replica, the reads cannot).
    ``only``: the recipients to ask about (one message's, narrowed), instead of its own.
    ``suppressions``: the worker's copy of the suppression list (None: the list is off); a
    list too large to copy is asked about in the same round trip (ZMSCORE).
    """
    wanted_of = {id(p): only if only is not None else p.recipients for p in batch}
    fresh = [
        not reads_may_be_taken_back and p.job.deliveries == 1 and p.ref.message_id == p.job.entry_id
        for p in batch
    ]
    wanted = [
        oc.SentLookup(p.ref.message_id, wanted_of[id(p)], p.job.entry_id)
        for p, new in zip(batch, fresh, strict=True)
        if not new
    ]
    ask_redis = suppressions is not None and not suppressions.local
    addresses: list[str] = []  # normalised, when the list is asked about (not copied)
    if ask_redis:
        checked = [p for p in batch if not p.ignore_suppression]
        addresses = sorted({suppression.normalise(r) for p in checked for r in wanted_of[id(p)]})
    sent, ends = await outcomes.look_up(wanted, addresses)
    if ask_redis:
        until = {a: end for a, end in zip(addresses, ends, strict=True) if end is not None}
    else:
        until = suppressions.until if suppressions is not None else {}
    now = time.time()
    looked_up = iter(sent)
    known = []
    nothing = oc.Accepted(set(), set())
    for p, new in zip(batch, fresh, strict=True):
        answer = nothing if new else next(looked_up)
        accepted = answer.recipients
        suppressed: dict[str, float] = {}
        if until and not p.ignore_suppression:
            for rcpt in wanted_of[id(p)]:
                end = until.get(suppression.normalise(rcpt))
                if end is not None and end > now:
                    suppressed[rcpt] = end
        others = [r for r in wanted_of[id(p)] if r in accepted and r not in answer.by_this_entry]
        known.append(Known(accepted, suppressed, others))
    return known


def nothing_left(p: Prepared, sent_before: Sequence[str]) -> oc.Settlement:
    """Every recipient left was accepted before, for an earlier entry with the same message
    id (enqueued twice, or a dead letter replayed): nothing is sent, and the entry's outcome
    is a ``delivered`` event marked ``already_sent``, so a producer that follows its entry
    id sees one."""
    s = oc.Settlement(entry_id=p.job.entry_id, message_id=p.ref.message_id)
    _add_sent_before(s, p, sent_before, time.time())
    return s


def settle_attempt(
    p: Prepared,
    result: SendResult,
    attempts: int,
    first_attempt: float,
    rng: random.Random,
    *,
    sent_before: Sequence[str] = (),
) -> oc.Settlement:
    """What one attempt's per-recipient answer means: records, dead letters, retry, events.
    ``sent_before``: recipients an earlier entry with this message id sent it to."""
    now = time.time()
    s = oc.Settlement(
        entry_id=p.job.entry_id, message_id=p.ref.message_id, accepted=list(result.accepted)
    )
    if sent_before:
        _add_sent_before(s, p, sent_before, now)
    if result.suppressed:
        _add_suppressed(s, p, result.suppressed, _When(attempts, first_attempt, now))
    if result.accepted:
        delivered = layout.event(
            layout.EVENT_DELIVERED, p.ref, result.accepted, result.accepted_reply, now,
            dsn_not_offered=result.dsn_not_offered,
        )  # fmt: skip
        s.events.append(delivered)
        DELIVERY_SENT.inc()
        code = result.accepted_reply.code if result.accepted_reply else None
        log.info("delivered", id=p.ref.message_id, entry=p.job.entry_id,
                 recipients=len(result.accepted), code=code)  # fmt: skip
    if not (result.rejected or result.deferred):
        return s
    when = _When(attempts, first_attempt, now)
    if result.rejected:
        _add_dead(s, p, "rejected", result.rejected, when)
    if result.deferred:
        due = p.policy.next_attempt(attempts, first_attempt, now, rng)
        if due is None:
            _add_dead(s, p, "expired", result.deferred, when)
        else:
            _add_retry(s, p, result.deferred, when, due)
    return s


@dataclass(slots=True)
class _When:
    attempts: int  # this one included
    first_attempt: float
    now: float


def _add_retry(
    s: oc.Settlement,
    p: Prepared,
    deferred: Mapping[str, layout.SmtpReply],
    when: _When,
    due: float,
) -> None:
    recipients = list(deferred)
    retry = layout.retry_entry(
        data=p.job.data, message_id=p.ref.message_id, source_id=p.ref.source_id,
        attempts=when.attempts, first_attempt=when.first_attempt, recipients=recipients,
        replay_of=p.job.replay_of,
    )  # fmt: skip
    s.retry = oc.Retry(due=due, fields=retry)
    for group, reply in _by_reply(deferred):
        s.events.append(layout.event("deferred", p.ref, group, reply, when.now, next_attempt=due))
    DELIVERY_DEFERRED.inc()
    log.info("deferred", id=p.ref.message_id, attempts=when.attempts,
             due_in=round(due - when.now, 3))  # fmt: skip


def _add_sent_before(s: oc.Settlement, p: Prepared, recipients: Sequence[str], now: float) -> None:
    if not recipients:
        return
    s.events.append(
        layout.event(layout.EVENT_DELIVERED, p.ref, recipients, None, now, already_sent=True)
    )
    log.info("already_sent", id=p.ref.message_id, entry=p.job.entry_id, recipients=len(recipients))


def _add_suppressed(s: oc.Settlement, p: Prepared, until: Mapping[str, float], when: _When) -> None:
    """Recipients on the suppression list: not attempted; a dead letter and an event with
    reason ``suppressed`` (``mailpool suppress remove`` and ``dead replay`` send them)."""
    recipients = list(until)
    error = "; ".join(
        f"{rcpt}: suppressed until {suppression.describe_until(end)}" for rcpt, end in until.items()
    )
    reply = Reply(None, "suppressed: on the suppression list (mailpool suppress list)")
    letter = layout.dead_letter(
        p.ref, reason=layout.SUPPRESSED, error=error, recipients=recipients,
        attempts=when.attempts, first_attempt=when.first_attempt, last_attempt=when.now,
    )  # fmt: skip
    s.dead_letters.append(letter)
    s.events.append(layout.event(layout.SUPPRESSED, p.ref, recipients, reply, when.now))
    DELIVERY_DEAD.inc()
    log.info("suppressed", id=p.ref.message_id, recipients=recipients)


def _add_dead(
    s: oc.Settlement,
    p: Prepared,
    reason: str,
    replies: Mapping[str, layout.SmtpReply],
    when: _When,
) -> None:
    recipients = list(replies)
    reply = oc.first_reply(replies)
    error = oc.describe_replies(replies)
    if reason == "expired":
        error = f"gave up after {when.attempts} attempts: {error}"
    letter = layout.dead_letter(
        p.ref, reason=reason, error=error, recipients=recipients, attempts=when.attempts,
        first_attempt=when.first_attempt, last_attempt=when.now, reply=reply,
    )  # fmt: skip
    s.dead_letters.append(letter)
    for group, own_reply in _by_reply(replies):
        s.events.append(layout.event("failed", p.ref, group, own_reply, when.now))
    DELIVERY_DEAD.inc()
    log.warning("dead_letter", id=p.ref.message_id, reason=reason, recipients=recipients)


def _by_reply(
    replies: Mapping[str, layout.SmtpReply],
) -> list[tuple[list[str], layout.SmtpReply]]:
    """The recipients of each distinct reply, in the order given: one event per reply, so
    that each quotes what its own recipients got (one event for all quoted the first reply
    a server gave: a recipient whose dot reply never came read as refused with 452)."""
    groups: dict[tuple[int | None, str], tuple[list[str], layout.SmtpReply]] = {}
    for rcpt, reply in replies.items():
        groups.setdefault((reply.code, reply.text), ([], reply))[0].append(rcpt)
    return list(groups.values())


def poison(p: Prepared, recipients: list[str]) -> oc.Settlement:
    """An entry handed out more than --max-deliveries times without an outcome (it kills
    whichever worker touches it): a dead letter instead of another try."""
    now = time.time()
    error = f"handed to consumers {p.job.deliveries} times without an outcome"
    log.error("poison_entry", entry=p.job.entry_id, id=p.ref.message_id, error=error)
    dead = layout.dead_letter(
        p.ref, reason="poison", error=error, recipients=recipients, attempts=p.job.attempts,
        first_attempt=p.job.first_attempt or now, last_attempt=now,
    )  # fmt: skip
    failed = layout.event("failed", p.ref, recipients, Reply(None, f"poison: {error}"), now)
    DELIVERY_DEAD.inc()
    return oc.Settlement(
        entry_id=p.job.entry_id, message_id=p.ref.message_id, dead_letters=[dead], events=[failed]
    )


def invalid(entry: StreamEntry, job: Job | None, exc: Exception) -> oc.Settlement:
    """An entry that cannot be decoded or built: a dead letter with the reason, filed under
    the send's ``id`` where it can still be read (a producer follows its sends by it)."""
    data = layout.entry_data(entry.fields) or b""
    readable = _readable_part(data)
    given_id = readable.get("id")
    ref = layout.MessageRef(
        (job.message_id if job else None)
        or (given_id if isinstance(given_id, str) and given_id else None)
        or entry.id,
        (job.source_id if job else None) or entry.id,
        data,
    )
    now = time.time()
    log.warning("invalid_entry", entry=entry.id, id=ref.message_id, error=str(exc))
    to = readable.get("to")
    recipients = [r for r in to if isinstance(r, str)] if isinstance(to, list) else []
    dead = layout.dead_letter(
        ref, reason="invalid", error=str(exc), recipients=recipients,
        attempts=job.attempts if job else 0, first_attempt=now, last_attempt=now,
    )  # fmt: skip
    # No server answered: the event says why (schema: error), as the dead letter does.
    failed = layout.event("failed", ref, recipients, Reply(None, f"invalid: {exc}"), now)
    DELIVERY_DEAD.inc()
    return oc.Settlement(
        entry_id=entry.id, message_id=ref.message_id, dead_letters=[dead], events=[failed]
    )


def _readable_part(data: bytes) -> dict[str, object]:
    """The map of an entry that failed validation, when it can still be decoded (else {})."""
    try:
        message = unpack(data)
    except CodecError:
        return {}
    return dict(message) if isinstance(message, dict) else {}
