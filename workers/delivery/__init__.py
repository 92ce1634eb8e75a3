"""``mailpool deliver``: read ``email.send`` in the ``delivery`` group and send each message.

One loop (:meth:`DeliveryWorker.run`): read a batch (own leftovers, then stale entries of
silent consumers, then new ones), prepare it (decode, build, drop recipients already
accepted), start up to ``--concurrency`` sends, and hand each outcome to the settler, which
writes idempotency records, acks, dead letters, retries and events in one Redis round trip
per batch of finished sends (group commit).  A side task moves due retries back into the
stream.  Redis layout and atomicity: :mod:`workers.streams.outcomes`.

Duplicate guarantee: a recipient is sent a message id again only if the worker dies (or
loses Redis for good) between the relay's reply to DATA and the settlement that records
it; every other redelivery (claims after a crash, retries, replays, a producer enqueuing
the same ``id`` twice) skips recipients already recorded as accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import structlog
from redis.exceptions import RedisError

from workers.codec.build import BuiltMessage, build_message
from workers.codec.errors import CodecError
from workers.codec.types import SendMessage
from workers.codec.wire import unpack
from workers.config import DeliveryConfig, Unavailable, mask_url_password
from workers.health import serving_health
from workers.lifecycle import install_stop_signals
from workers.metrics import (
    DELIVERY_DEAD,
    DELIVERY_DEFERRED,
    DELIVERY_IN_FLIGHT,
    DELIVERY_SENT,
    DELIVERY_SMTP,
)
from workers.relay import SendResult, Transport
from workers.streams import outcomes as oc
from workers.streams.connection import connect, resolve_redis_url
from workers.streams.consumer import START_ALL, GroupConsumer, StreamEntry
from workers.streams.keys import StreamKeys
from workers.streams.retry import RetryPolicy

log = structlog.get_logger("mailpool.delivery")
T = TypeVar("T")

READ_BLOCK = 0.5  # seconds an idle XREADGROUP waits
# Seconds between looks at our own pending list for entries we do not hold (one XPENDING):
# a read that timed out while Redis stalled still runs when it resumes, and the entries it
# hands us would otherwise wait --claim-after.  A failed read makes the next look immediate.
OWN_CHECK = 1.0
REDIS_BACKOFF_CAP = 5.0
# Seconds the outcomes of finished sends may take to reach Redis at stop, after the drain:
# shutdown grace + this + closing connections (1 s) stays inside the pod's grace period.
FLUSH_CAP = 10.0


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

    @classmethod
    def from_entry(cls, entry: StreamEntry, fields: dict[bytes, bytes]) -> Job:
        data = fields.get(_DATA, b"")
        if len(fields) == 1 and data:  # a producer's entry: nothing else to read
            return cls(entry.id, data, entry.deliveries, entry.id, None, 0, None, None)

        def text(name: str) -> str | None:
            value = fields.get(name.encode())
            return None if value is None else value.decode()

        first = text(oc.FIELD_FIRST_ATTEMPT)
        return cls(
            entry_id=entry.id,
            data=data,
            deliveries=entry.deliveries,
            source_id=text(oc.FIELD_SOURCE_ID) or entry.id,
            message_id=text(oc.FIELD_MESSAGE_ID),
            attempts=int(text(oc.FIELD_ATTEMPTS) or 0),
            first_attempt=float(first) if first else None,
            recipients=oc.recipients_from_text(fields.get(oc.FIELD_RECIPIENTS.encode())),
        )


_DATA = oc.FIELD_DATA.encode()


@dataclass(slots=True)
class Prepared:
    job: Job
    ref: oc.MessageRef
    built: BuiltMessage
    recipients: list[str]  # wanted for this attempt (before the idempotency check)
    policy: RetryPolicy


# (prepared message, recipients to send to, owner of its message id here)
Send = tuple[Prepared, list[str], bool]
Settled = Callable[[oc.Settlement], None]  # called once Redis has applied the settlement


class SettlerCrashed(Unavailable):
    """The settler died of a bug: the worker stopped (exit 1) so that it is restarted."""

    def __init__(self) -> None:
        super().__init__(
            "outcomes could not be recorded (settler_crashed in the log); the worker stopped, "
            "unrecorded entries stay pending and are claimed after --claim-after"
        )


class Settler:
    """Group commit: settlements queued while one round trip is in flight go in the next.

    Each settlement comes with a callback, called once Redis has applied it (never when it
    was not: the entry then stays pending).
    """

    def __init__(self, outcomes: oc.Outcomes, on_crash: Callable[[], None]) -> None:
        self.outcomes = outcomes
        # Called when the settler dies of a bug: a worker that keeps sending while nothing
        # is acknowledged would send every message again after a claim, so it must stop.
        self._on_crash = on_crash
        self.crashed = False
        self._queue: list[tuple[oc.Settlement, Settled]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._applying = 0  # settlements in the round trip under way
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="settler")

    def submit(self, settlement: oc.Settlement, settled: Settled) -> None:
        self._queue.append((settlement, settled))
        self._wake.set()

    async def _run(self) -> None:
        try:
            await self._settle_until_closed()
        except Exception:  # a bug (Redis errors are retried in _apply): stop the worker
            log.exception("settler_crashed", unsettled=len(self._queue) + self._applying)
            self.crashed = True
            self._on_crash()

    async def _settle_until_closed(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                # One loop turn lets sends that finished together join the same round trip.
                await asyncio.sleep(0)
                continue
            batch, self._queue = self._queue, []
            self._applying = len(batch)
            await self._apply(batch)
            self._applying = 0

    async def _apply(self, batch: list[tuple[oc.Settlement, Settled]]) -> None:
        """Apply a batch; retry what failed (Redis away, out of memory) until it is applied.

        An outcome is never dropped: the recipients it records were really sent, and an
        entry left unacknowledged would be sent again.  Only the stop deadline ends this.
        """
        delay = 0.05
        while batch:
            try:
                results: list[bool | RedisError] = list(
                    await self.outcomes.settle([s for s, _ in batch], time.time())
                )
            except (RedisError, OSError) as exc:
                results = [RedisError(str(exc))] * len(batch)
            failed = []
            for (settlement, settled), result in zip(batch, results, strict=True):
                if isinstance(result, RedisError):
                    failed.append((settlement, settled))
                else:
                    settled(settlement)
            if failed:
                errors = {str(r) for r in results if isinstance(r, RedisError)}
                log.warning("settle_retry", errors=sorted(errors)[:3], settlements=len(failed))
                await asyncio.sleep(delay)
                delay = min(delay * 2, REDIS_BACKOFF_CAP)
            batch = failed

    async def close(self, grace: float) -> None:
        """Flush what is queued; give up after ``grace`` seconds (Redis gone at shutdown)."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, grace)
        except TimeoutError:
            # Those entries stay pending; recipients they record as sent may be sent again.
            log.error("settlements_lost_at_stop", count=len(self._queue) + self._applying)


class DeliveryWorker:
    def __init__(self, config: DeliveryConfig, outcomes: oc.Outcomes, transport: Transport) -> None:
        self.config = config
        self.outcomes = outcomes
        self.transport = transport
        self.settler = Settler(outcomes, on_crash=self._stop_now)
        self.rng = random.Random()  # noqa: S311 - retry jitter, not cryptography
        # Entry ids read and not yet settled: a consumer re-reading its own pending entries
        # (after a restart) must not start a second send of an entry already in hand.
        self._held: set[str] = set()
        # Entry ids settled since the current read was sent: that read's reply may still
        # list them (Redis answered it before the settlement's XACK, on another connection).
        self._settled_during_read: set[str] = set()
        # Message ids with a send in progress here -> set when its outcome is recorded.  A
        # second entry with the same id (a producer enqueued it twice) waits, then re-checks.
        self._sending: dict[str, asyncio.Event] = {}
        # Prepared sends wait here for one of --concurrency lanes (one SMTP connection each).
        self._ready: asyncio.Queue[Send | None] = asyncio.Queue()
        self._unfinished = 0  # sends handed to the lanes (waiting or in flight)
        self._room = asyncio.Event()  # the window has room for another read
        self._finished = asyncio.Event()  # a lane finished a send
        self._stop = asyncio.Event()
        # When to look next for entries pending on us that we do not hold: at once (a
        # restarted consumer's leftovers), then every OWN_CHECK, and after any failed read.
        self._own_check_at = 0.0
        self._policy = RetryPolicy(
            config.retry_base, config.retry_cap, config.max_attempts, config.max_age
        )

    async def run(self, consumer: GroupConsumer, stop: asyncio.Event) -> None:
        """The loop: read as many entries as the window has room for, queue them, repeat.

        ``--concurrency`` lanes take queued sends in order, one SMTP transaction at a time
        each.  At most one entry per lane waits in the queue (read-ahead hides the read
        round trip), so an entry we hold starts within one SMTP transaction of its read and
        ``--claim-after`` never hands a live worker's entry to another.  On stop: no more
        reads (one waiting on a stalled Redis is cancelled), sends in flight drain, entries
        not yet started stay pending for others.
        """
        self._stop = stop
        self.settler.start()
        promoter = asyncio.create_task(self._promote_retries(stop), name="retry-promoter")
        stopping = asyncio.create_task(stop.wait(), name="stop-watch")
        lanes = [
            asyncio.create_task(self._lane(), name=f"send-lane-{n}")
            for n in range(self.config.concurrency)
        ]
        reading = asyncio.create_task(self._read_until_stopped(consumer, stop), name="reader")
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Whatever the reader waits for (a read, an idempotency check) may wait on a
            # stalled Redis: it must not hold up the stop.  What it would have handed us
            # stays pending for others.
            reading.cancel()
            await asyncio.wait((reading,))
            await self._drain(lanes)
            stopping.cancel()
            promoter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await promoter
            await self.settler.close(grace=min(max(self.config.shutdown_grace, 1.0), FLUSH_CAP))
            await self.transport.aclose()
        if self.settler.crashed:
            raise SettlerCrashed
        if not reading.cancelled() and (bug := reading.exception()) is not None:
            raise bug

    async def _read_until_stopped(self, consumer: GroupConsumer, stop: asyncio.Event) -> None:
        """Read as many entries as the window has room for, queue them, repeat."""
        while not stop.is_set():
            if self._unfinished > self.config.concurrency:
                # Read in batches of at least a window's half: --concurrency sends are
                # still in flight meanwhile, and one XREADGROUP serves many entries.
                self._room.clear()
                await self._room.wait()
                continue
            window = 2 * self.config.concurrency - self._unfinished
            consumer.batch = min(window, self.config.batch)
            entries = await self._read(consumer, stop)
            if stop.is_set():
                break  # what was just read stays pending: another worker claims it
            if entries and all(e.id in self._held for e in entries):
                await self._pause()  # own pending entries still in hand
                continue
            for send in await self._prepare(entries):
                self._unfinished += 1
                self._ready.put_nowait(send)

    def _stop_now(self) -> None:
        self._stop.set()  # the event run() was given, so the whole process stops

    async def _lane(self) -> None:
        """Send queued messages one after another until told to stop (a None)."""
        while (send := await self._ready.get()) is not None:
            p, recipients, owner = send
            try:
                if self._stop.is_set():
                    self._let_go(p, owner)  # not started: stays pending for another worker
                else:
                    await self._send(p, recipients, owner)
            except Exception:  # a bug must not take a lane down; the entry stays pending
                log.exception("send_crashed", entry=p.job.entry_id)
                self._let_go(p, owner=False)  # _send gave back the message id it held
            finally:
                self._unfinished -= 1
                if self._unfinished <= self.config.concurrency:
                    self._room.set()
                self._finished.set()

    async def _pause(self) -> None:
        """Wait a moment for a send or settlement to finish instead of re-reading at once."""
        if not self._unfinished:
            await asyncio.sleep(0.01)
            return
        self._finished.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._finished.wait(), READ_BLOCK)

    async def _read(self, consumer: GroupConsumer, stop: asyncio.Event) -> list[StreamEntry]:
        self._settled_during_read.clear()  # settled before this read: it cannot list them
        try:
            entries = []
            if time.monotonic() >= self._own_check_at:
                entries = await self._read_unseen_own(consumer)
            if not entries:
                entries = await consumer.read_shared()
        except (RedisError, OSError) as exc:
            # Redis may still run the read that failed (a stalled Redis runs what waits in
            # its socket buffers when it resumes) and hand us entries we never see.
            self._own_check_at = 0.0
            log.warning("read_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            return []
        if self._settled_during_read:
            entries = [e for e in entries if e.id not in self._settled_during_read]
        return entries

    async def _read_unseen_own(self, consumer: GroupConsumer) -> list[StreamEntry]:
        """Entries pending on us that we do not hold: leftovers of a consumer of our name,
        entries let go of without an outcome, entries of a read whose reply never came."""
        entries = await consumer.read_unseen_own(self._held, consumer.batch)
        # A full batch: more may be there, look again at the next read.
        full = len(entries) >= consumer.batch
        self._own_check_at = 0.0 if full else time.monotonic() + OWN_CHECK
        if entries:
            log.info("own_pending_taken", count=len(entries))
        return entries

    async def _prepare(self, entries: list[StreamEntry]) -> list[Send]:
        """Decode and build; settle what needs no sending; drop recipients already accepted.

        Returns (prepared, recipients to send, owner); ``owner`` False means another entry
        with the same message id is in hand here and this one must wait its turn.
        """
        ready: list[tuple[Prepared, bool]] = []
        for entry in entries:
            if entry.id in self._held:
                continue
            self._held.add(entry.id)
            p = self._prepare_one(entry)
            if p is not None:
                owner = p.ref.message_id not in self._sending
                if owner:
                    self._sending[p.ref.message_id] = asyncio.Event()
                ready.append((p, owner))
        done = await self._checked_sent(ready) if ready else None
        if done is None:
            return []
        to_send: list[Send] = []
        for (p, owner), already in zip(ready, done, strict=True):
            remaining = [r for r in p.recipients if r not in already]
            if not remaining:
                log.info("already_sent", id=p.ref.message_id, entry=p.job.entry_id)
                self._settle(oc.Settlement(p.job.entry_id, p.ref.message_id))
                self._let_go(p, owner, held=True)
            elif p.job.deliveries > self.config.max_deliveries:
                self._poison(p, remaining)
                self._let_go(p, owner, held=True)
            else:
                to_send.append((p, remaining, owner))
        return to_send

    async def _checked_sent(self, ready: list[tuple[Prepared, bool]]) -> list[set[str]] | None:
        """``_already_sent``, or None when Redis could not tell: the entries are let go of."""
        try:
            return await self._already_sent([p for p, _ in ready])
        except BaseException as exc:
            for p, owner in ready:  # they stay pending (at stop: for others)
                self._let_go(p, owner)
            if not isinstance(exc, RedisError | OSError):
                raise  # cancelled at stop, or a bug
            log.warning("idempotency_check_failed", error=str(exc))
            self._own_check_at = 0.0  # they come back as our own leftovers at the next read
            return None

    async def _already_sent(self, ready: list[Prepared]) -> list[set[str]]:
        """Recipients already accepted per message (one round trip for the batch).

        An entry read for the first time whose id is its own entry id (no message ``id``,
        not a retry or replay) cannot have been sent before: it is not looked up.
        """
        fresh = [p.job.deliveries == 1 and p.ref.message_id == p.job.entry_id for p in ready]
        looked_up = iter(
            await self.outcomes.already_sent(
                [
                    (p.ref.message_id, p.recipients)
                    for p, new in zip(ready, fresh, strict=True)
                    if not new
                ]
            )
        )
        return [set() if new else next(looked_up) for new in fresh]

    def _let_go(self, p: Prepared, owner: bool, *, held: bool = False) -> None:
        """Release the message id (if this entry owned it) and, unless settling, the entry."""
        if owner and (event := self._sending.pop(p.ref.message_id, None)) is not None:
            event.set()
        if not held:
            self._held.discard(p.job.entry_id)

    def _settle(self, settlement: oc.Settlement) -> None:
        self.settler.submit(settlement, self._settled)

    def _settled(self, settlement: oc.Settlement) -> None:
        self._held.discard(settlement.entry_id)
        self._settled_during_read.add(settlement.entry_id)

    def _prepare_one(self, entry: StreamEntry) -> Prepared | None:
        if entry.fields is None:
            log.error("entry_trimmed_while_pending", entry=entry.id, stream=self.config.send_stream)
            self._settle(oc.Settlement(entry.id, entry.id))
            return None
        job: Job | None = None
        try:
            job = Job.from_entry(entry, entry.fields)
            # build_message validates (SchemaError/BuildError), so the map is not checked twice.
            message = cast(SendMessage, unpack(job.data))
            built = build_message(message, default_id=job.source_id, hostname=self.config.hostname)
        except (CodecError, ValueError) as exc:  # ValueError: our own fields were mangled
            self._invalid(entry, job, exc)
            return None
        except Exception as exc:  # a builder bug must not crash-loop every worker on one entry
            log.exception("build_crashed", entry=entry.id)
            self._invalid(entry, job, exc)
            return None
        message_id = job.message_id or message.get("id") or job.source_id
        policy = self._policy
        if "max_attempts" in message or "max_age" in message:  # the message's own limits
            policy = replace(
                policy,
                max_attempts=message.get("max_attempts", policy.max_attempts),
                max_age=message.get("max_age", policy.max_age),
            )
        ref = oc.MessageRef(message_id, job.source_id, job.data)
        return Prepared(job, ref, built, job.recipients or built.recipients, policy)

    async def _send(self, p: Prepared, recipients: list[str], owner: bool) -> None:
        if not owner:
            recipients = await self._wait_turn(p, recipients)
            if not recipients:
                return
        # This entry holds its message id now: every way out below must give it back.
        if self._stop.is_set():  # stopped while it waited its turn: not started
            self._let_go(p, owner=True)
            return
        try:
            first_attempt = p.job.first_attempt or time.time()
            with DELIVERY_IN_FLIGHT.track_inprogress(), DELIVERY_SMTP.time():
                result = await self.transport.send(p.built, recipients)
            settlement = settle_attempt(p, result, p.job.attempts + 1, first_attempt, self.rng)
        except BaseException:  # cancelled at stop (or a bug): no outcome, the entry stays pending
            self._let_go(p, owner=True)
            raise

        def settled(settlement: oc.Settlement) -> None:
            self._settled(settlement)
            self._let_go(p, owner=True, held=True)  # the message id was taken until now

        self.settler.submit(settlement, settled)

    async def _wait_turn(self, p: Prepared, recipients: list[str]) -> list[str]:
        """Wait for the send of the same message id in hand here, then take the id and
        return the recipients it did not reach ([] when there is nothing left to do)."""
        while (busy := self._sending.get(p.ref.message_id)) is not None:
            await busy.wait()
        self._sending[p.ref.message_id] = asyncio.Event()
        try:
            [already] = await self.outcomes.already_sent([(p.ref.message_id, recipients)])
        except (RedisError, OSError) as exc:
            log.warning("idempotency_check_failed", error=str(exc))
            self._let_go(p, owner=True)
            return []
        remaining = [r for r in recipients if r not in already]
        if not remaining:
            self._settle(oc.Settlement(p.job.entry_id, p.ref.message_id))
            self._let_go(p, owner=True, held=True)
        return remaining

    async def _drain(self, lanes: list[asyncio.Task[None]]) -> None:
        """Let sends in flight finish up to ``shutdown_grace``; the rest stay pending."""
        while not self._ready.empty():  # not started: they stay pending for others
            send = self._ready.get_nowait()
            if send is not None:
                self._let_go(send[0], send[2])
                self._unfinished -= 1
        for _ in lanes:
            self._ready.put_nowait(None)
        if self._unfinished:
            log.info("draining", in_flight=self._unfinished, grace=self.config.shutdown_grace)
        _, unfinished = await asyncio.wait(lanes, timeout=self.config.shutdown_grace)
        for task in unfinished:
            task.cancel()
        if unfinished:
            log.warning("sends_abandoned_at_stop", count=len(unfinished))
            await asyncio.wait(unfinished)

    async def _promote_retries(self, stop: asyncio.Event) -> None:
        """Move due retries into the stream; any worker's promoter may take any retry."""
        interval = min(max(self.config.retry_base / 4, 0.05), 1.0)
        while not stop.is_set():
            try:
                moved = await self.outcomes.promote_due(time.time(), self.config.batch)
            except (RedisError, OSError) as exc:
                log.warning("retry_promotion_failed", error=str(exc))
                moved = 0
            if moved:
                log.debug("retries_due", count=moved)
            if moved < self.config.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)

    def _invalid(self, entry: StreamEntry, job: Job | None, exc: Exception) -> None:
        fields = entry.fields or {}
        ref = oc.MessageRef(
            (job.message_id if job else None) or entry.id,
            (job.source_id if job else None) or entry.id,
            fields.get(oc.FIELD_DATA.encode(), b""),
        )
        now = time.time()
        log.warning("invalid_entry", entry=entry.id, error=str(exc))
        recipients = _recipients_hint(ref.data)
        dead = oc.dead_letter(
            ref, reason="invalid", error=str(exc), recipients=recipients,
            attempts=job.attempts if job else 0, first_attempt=now, last_attempt=now,
        )  # fmt: skip
        failed = oc.event("failed", ref, recipients, None, now)
        self._settle(oc.Settlement(entry.id, ref.message_id, [], [dead], None, [failed]))
        DELIVERY_DEAD.inc()

    def _poison(self, p: Prepared, recipients: list[str]) -> None:
        now = time.time()
        error = f"handed to consumers {p.job.deliveries} times without an outcome"
        log.error("poison_entry", entry=p.job.entry_id, id=p.ref.message_id, error=error)
        dead = oc.dead_letter(
            p.ref, reason="poison", error=error, recipients=recipients, attempts=p.job.attempts,
            first_attempt=p.job.first_attempt or now, last_attempt=now,
        )  # fmt: skip
        failed = oc.event("failed", p.ref, recipients, None, now)
        self._settle(oc.Settlement(p.job.entry_id, p.ref.message_id, [], [dead], None, [failed]))
        DELIVERY_DEAD.inc()


def _recipients_hint(data: bytes) -> list[str]:
    """The ``to`` list of an entry that failed validation, when it can still be read."""
    try:
        to = unpack(data).get("to")
    except CodecError:
        return []
    return [r for r in to if isinstance(r, str)] if isinstance(to, list) else []


def settle_attempt(
    p: Prepared, result: SendResult, attempts: int, first_attempt: float, rng: random.Random
) -> oc.Settlement:
    """What one attempt's per-recipient answer means: records, dead letters, retry, events."""
    now = time.time()
    s = oc.Settlement(p.job.entry_id, p.ref.message_id, accepted=list(result.accepted))
    if result.accepted:
        s.events.append(oc.event("delivered", p.ref, result.accepted, result.accepted_reply, now))
        DELIVERY_SENT.inc()
        code = result.accepted_reply.code if result.accepted_reply else None
        log.info("delivered", id=p.ref.message_id, entry=p.job.entry_id,
                 recipients=len(result.accepted), code=code)  # fmt: skip
    if result.rejected:
        _add_dead(
            s,
            p,
            "rejected",
            result.rejected,
            attempts=attempts,
            first_attempt=first_attempt,
            now=now,
        )
    if result.deferred:
        due = p.policy.next_attempt(attempts, first_attempt, now, rng)
        if due is None:
            _add_dead(
                s,
                p,
                "expired",
                result.deferred,
                attempts=attempts,
                first_attempt=first_attempt,
                now=now,
            )
        else:
            s.retry = oc.Retry(
                due, _retry_fields(p, attempts, first_attempt, list(result.deferred))
            )
            reply = oc.first_reply(result.deferred)
            s.events.append(
                oc.event("deferred", p.ref, list(result.deferred), reply, now, next_attempt=due)
            )
            DELIVERY_DEFERRED.inc()
            log.info("deferred", id=p.ref.message_id, attempts=attempts, due_in=round(due - now, 3))
    return s


def _add_dead(
    s: oc.Settlement,
    p: Prepared,
    reason: str,
    replies: Mapping[str, oc.SmtpReply],
    *,
    attempts: int,
    first_attempt: float,
    now: float,
) -> None:
    recipients = list(replies)
    reply = oc.first_reply(replies)
    error = oc.describe_replies(replies)
    if reason == "expired":
        error = f"gave up after {attempts} attempts: {error}"
    letter = oc.dead_letter(
        p.ref, reason=reason, error=error, recipients=recipients, attempts=attempts,
        first_attempt=first_attempt, last_attempt=now, reply=reply,
    )  # fmt: skip
    s.dead_letters.append(letter)
    s.events.append(oc.event("failed", p.ref, recipients, reply, now))
    DELIVERY_DEAD.inc()
    log.warning("dead_letter", id=p.ref.message_id, reason=reason, recipients=recipients)


def _retry_fields(
    p: Prepared, attempts: int, first_attempt: float, recipients: Sequence[str]
) -> dict[str, str | bytes | int | float]:
    return {
        oc.FIELD_DATA: p.job.data,
        oc.FIELD_MESSAGE_ID: p.ref.message_id,
        oc.FIELD_SOURCE_ID: p.ref.source_id,
        oc.FIELD_ATTEMPTS: attempts,
        oc.FIELD_FIRST_ATTEMPT: repr(first_attempt),
        oc.FIELD_RECIPIENTS: oc.recipients_text(recipients),
    }


async def _ensure_group(consumer: GroupConsumer, stop: asyncio.Event) -> bool:
    """Create the group from id 0 (never ``$``); wait for Redis at start. False: stopped."""
    delay = 0.1
    while not stop.is_set():
        try:
            return await _unless_stopped(consumer.ensure_group(START_ALL), stop) is not None
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable_at_start", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, REDIS_BACKOFF_CAP)
    return False


async def _unless_stopped(work: Coroutine[object, object, T], stop: asyncio.Event) -> T | None:
    """The result of ``work``, or None when ``stop`` comes first (``work`` is cancelled): a
    command waiting on a stalled Redis must not hold up a stop."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))
        return None
    return task.result()


async def serve(config: DeliveryConfig, stop: asyncio.Event) -> None:
    url = resolve_redis_url(config.redis_url)
    redis = connect(url)
    keys = StreamKeys.from_config(config)
    outcomes = oc.Outcomes(
        redis, oc.OutcomeKeys.from_stream_keys(keys), group=config.group,
        sent_ttl=config.sent_ttl, events_maxlen=config.events_maxlen,
    )  # fmt: skip
    # The reads keep a connection of their own (a blocking XREADGROUP holds it anyway):
    # a pool checkout per read costs CPU on every batch.  No retries on it: redis-py would
    # send a read that timed out again, and Redis may run both; our loop retries instead
    # and then looks at our pending list for what the lost read handed us.
    reads = connect(url, retries=0)
    reader = reads.client()
    consumer = GroupConsumer(
        reader, keys.send, config.group, config.consumer,
        claim_after=config.claim_after, batch=config.batch, block=READ_BLOCK,
    )  # fmt: skip
    try:
        if not await _ensure_group(consumer, stop):
            return
        await oc.require_functions(redis)  # settle/promote are Redis functions: exit 2 if missing
        log.info("delivery_started", relay=_safe_relay(config.relay), consumer=config.consumer,
                 concurrency=config.concurrency)  # fmt: skip
        worker = DeliveryWorker(config, outcomes, config.open_transport())
        async with serving_health(config.http, redis, keys, lambda: not stop.is_set()):
            await worker.run(consumer, stop)
        log.info("delivery_stopped", consumer=config.consumer)
    finally:
        await outcomes.aclose()
        await reader.aclose()
        await reads.aclose()
        await redis.aclose()


def _safe_relay(relay: str | None) -> str:
    return mask_url_password(relay or "")


async def main(config: DeliveryConfig) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await serve(config, stop)
    return 0
