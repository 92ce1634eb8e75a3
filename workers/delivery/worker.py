"""The delivery loop: read, prepare, send, settle (:class:`DeliveryWorker`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from workers.config import DeliveryConfig
from workers.delivery.attempt import (
    Known,
    look_up,
    nothing_left,
    poison,
    prepare,
    settle_attempt,
)
from workers.delivery.held import HeldEntries, HeldEntry, Window
from workers.delivery.reading import READ_AWAY_MAX, READ_RETRY, READ_STALL, Reader
from workers.delivery.settler import Settler, SettlerCrashed
from workers.metrics import DELIVERY_IN_FLIGHT, DELIVERY_SMTP
from workers.relay import SendResult, Transport
from workers.streams import outcomes as oc
from workers.streams import suppression
from workers.streams.consumer import START_ALL, GroupConsumer, StreamEntry
from workers.streams.retry import RetryPolicy
from workers.streams.suppression import (
    REASON_REJECTED,
    Suppression,
    SuppressionList,
    SuppressionView,
)

log = structlog.get_logger("mailpool.delivery")

READ_BLOCK = 0.5  # seconds an idle XREADGROUP waits (shared out over the partitions)
# Seconds the outcomes of finished sends may take to reach Redis at stop, after the drain:
# shutdown grace + this + closing connections (1 s) stays inside the pod's grace period.
FLUSH_CAP = 10.0


@dataclass(frozen=True)
class Stream:
    """One partition's send stream, as a worker reads it and records its outcomes."""

    consumer: GroupConsumer
    outcomes: oc.Outcomes


@dataclass
class _Partition:
    """What the worker keeps per partition: its entries in hand (entry ids repeat across
    streams), its reads, and its settlements (each goes to the partition's own Redis)."""

    stream: Stream
    held: HeldEntries
    settler: Settler
    reader: Reader
    suppressions: SuppressionView  # this worker's copy of the partition's suppression list
    ready: bool = False  # its group exists and its Redis has our functions

    @property
    def consumer(self) -> GroupConsumer:
        return self.stream.consumer

    @property
    def outcomes(self) -> oc.Outcomes:
        return self.stream.outcomes


@dataclass(frozen=True, slots=True)
class _Work:
    """A queued entry and the partition it came from, for a lane to send."""

    partition: _Partition
    held: HeldEntry


class DeliveryWorker:
    """Reads send entries, sends them over ``--concurrency`` connections, settles outcomes.

    With several partitions (``--partitions``), one worker reads them all in turn into one
    window and one set of lanes; each partition keeps its own entries in hand, reads and
    settler (its Redis may be another shard's primary).

    Each entry read is held as one :class:`~workers.delivery.held.HeldEntry` whose state
    says where it is (read, prepared, queued, waiting for its id, sending, settling,
    settled, handed back).  The invariants, checked in one place
    (:meth:`~workers.delivery.held.HeldEntries.check`, and ``check_drained`` at the stop):

    * at most 2 x ``--concurrency`` entries are in progress (prepared, and neither settling
      nor handed back), so an entry starts within one SMTP transaction of its read and
      ``--claim-after`` never hands a live worker's entry to another;
    * one entry at a time holds a message id, from its preparation (or its turn) until its
      outcome is recorded (sent) or decided (not sent): one lane sends it, and the next
      entry with that id re-checks what the first one's record says;
    * nothing is sent after the stop;
    * every entry ends settled or handed back (pending in the group, for a later read or a
      claim); only settlements the stop deadline cuts off stay settling (logged);
    * entries handed back at the stop before their send started are released for an
      immediate claim by the other workers; none whose send started is.
    """

    def __init__(
        self, config: DeliveryConfig, streams: Sequence[Stream], transport: Transport
    ) -> None:
        self.config = config
        self.transport = transport
        self.rng = random.Random()  # noqa: S311 - retry jitter, not cryptography
        self._policy = RetryPolicy(
            config.retry_base, config.retry_cap, config.max_attempts, config.max_age
        )
        self._stop = asyncio.Event()  # run() brings the process's: looked up at each check
        # An entry whose send has not started this long after its read is handed back (_Start).
        self._start_by = config.claim_after - config.longest_send()
        # One window and one set of lanes for all partitions: every read fills a whole
        # window's room, as with one stream (a window per partition made reads N x smaller
        # and N x as many: Redis's CPU per message rose by a third, bench/cluster.py --split).
        self._window = Window(config.concurrency)
        # A stream whose reads keep failing is passed over longer when others can be read.
        away_max = READ_RETRY if len(streams) == 1 else READ_AWAY_MAX
        self._partitions = [self._partition(stream, away_max) for stream in streams]
        self._turn = 0  # the partition read next
        # With several partitions each Redis step of the reader has a deadline: one waiting
        # on a stalled or failing shard must not hold up the others' reads for long.
        self._deadline = None if len(streams) == 1 else READ_BLOCK + READ_STALL
        # Queued entries wait here for one of 2 x --concurrency lanes (see run).
        self._queue: asyncio.Queue[_Work | None] = asyncio.Queue()
        # Recipients refused as addresses are added to every partition's copy of the list.
        self._suppression = SuppressionList([(s.outcomes.redis, s.outcomes.keys) for s in streams])

    def _partition(self, stream: Stream, away_max: float) -> _Partition:
        # The event is looked up at each check: run() replaces it with the process's.
        stopped = lambda: self._stop.is_set()  # noqa: E731, PLW0108
        held = HeldEntries(self.config.concurrency, stopped=stopped, window=self._window)
        settler = Settler(stream.outcomes, on_crash=self._stop_now, busy=self._sending)
        view = SuppressionView(stream.outcomes.redis, stream.outcomes.keys)
        return _Partition(stream, held, settler, Reader(held, away_max=away_max), view)

    def _sending(self) -> bool:
        """Entries are in progress: outcomes may come soon (the settlers' linger)."""
        return self._window.in_progress > 0

    async def run(self, stop: asyncio.Event) -> None:
        """Read, prepare and queue until ``stop``; 2 x ``--concurrency`` lanes send what is
        queued, over ``--concurrency`` connections (the transport's).

        Half the lanes wait for a connection at a time (read-ahead hides the read round
        trip), and to a relay that offers PIPELINING each of them goes out behind the
        final dot of a send in progress.  On stop: no more reads (one waiting on a stalled
        Redis is cancelled), sends in flight drain, entries not yet started are handed back
        and released for others.
        """
        self._stop = stop
        for partition in self._partitions:
            partition.settler.start()
        promoters = [
            asyncio.create_task(
                promote_retries(p.outcomes, self.config, stop), name=f"retry-promoter-{n}"
            )
            for n, p in enumerate(self._partitions)
        ]
        for promoter in promoters:
            promoter.add_done_callback(_log_crash)
        stopping = asyncio.create_task(stop.wait(), name="stop-watch")
        # One lane per entry the window may hold: --concurrency connections, and behind each
        # one a send whose commands go out with the final dot of the one ahead (the pool).
        lanes = [
            asyncio.create_task(self._lane(), name=f"send-lane-{n}")
            for n in range(2 * self.config.concurrency)
        ]
        reading = asyncio.create_task(self._read_until_stopped(stop), name="reader")
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._shut_down(reading, lanes, promoters, stopping)
        if any(p.settler.crashed for p in self._partitions):
            raise SettlerCrashed
        if not reading.cancelled() and (bug := reading.exception()) is not None:
            raise bug
        for partition in self._partitions:
            partition.held.check_drained()

    async def _read_until_stopped(self, stop: asyncio.Event) -> None:
        """The loop: read what the window has room for from the next partition in turn
        (passing over one whose last read failed), prepare it, queue it, repeat."""
        count, empty_reads = len(self._partitions), 0
        while not stop.is_set():
            room = self._window.room()
            if room < self.config.concurrency:
                # Read in batches of at least a window's half: --concurrency sends are
                # still in flight meanwhile, and one XREADGROUP serves many entries.
                await self._window.room_freed()
                continue
            partition = self._next_in_turn()
            if partition is None:
                await self._until_one_is_back(stop)
                continue
            if not partition.ready and not await self._make_ready(partition):
                continue
            partition.consumer.block_ms = read_block_ms(count, empty_reads)
            batch = min(room, self.config.batch)
            entries = await partition.reader.read(partition.consumer, batch, self._deadline)
            partition.ready = not partition.reader.group_lost
            empty_reads = 0 if entries else empty_reads + 1
            if stop.is_set():
                partition.held.read_at_stop(entries)  # released for another worker
                break
            if entries and partition.held.holds_all(entries):
                await self._pause()  # own pending entries still in hand
                continue
            for held in await self._prepare(partition, entries):
                self._queue.put_nowait(_Work(partition, held))

    async def _make_ready(self, partition: _Partition) -> bool:
        """Create the partition's group (from id 0, never ``$``) and check its Redis has
        our functions (missing: exit 2); False while its Redis cannot be used.  Done in
        turn, so a shard down at start holds up no other partition."""
        try:
            async with asyncio.timeout(self._deadline):
                await partition.consumer.ensure_group(START_ALL)
                await oc.require_functions(partition.outcomes.redis)
                await partition.outcomes.check_transactions()
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            partition.reader.pass_over("redis_unavailable_at_start", partition.consumer.stream, exc)
            return False
        partition.ready = True
        return True

    def _next_in_turn(self) -> _Partition | None:
        """The next partition whose last read did not fail lately; None if there is none."""
        now = time.monotonic()
        for _ in self._partitions:
            partition = self._partitions[self._turn]
            self._turn = (self._turn + 1) % len(self._partitions)
            if partition.reader.away_until <= now:
                return partition
        return None

    async def _until_one_is_back(self, stop: asyncio.Event) -> None:
        back = min(p.reader.away_until for p in self._partitions)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, back - time.monotonic()))

    async def _prepare(self, partition: _Partition, entries: list[StreamEntry]) -> list[HeldEntry]:
        """Take and build each entry not in hand; settle what needs no send; queue the rest
        with the recipients not accepted before (one idempotency round trip per batch)."""
        built: list[HeldEntry] = []
        for entry in entries:
            held = partition.held.take(entry)  # None: in hand already (own pending, re-read)
            if held is not None and self._build(partition, held):
                built.append(held)
        known = await self._look_up(partition, built) if built else None
        if known is None:
            return []
        queued: list[HeldEntry] = []
        for held, about in zip(built, known, strict=True):
            remaining = [r for r in held.prepared.recipients if r not in about.accepted]
            to_send = [r for r in remaining if r not in about.suppressed]
            held.sent_before = about.sent_before
            if not remaining:
                self._settle(partition, held, nothing_left(held.prepared, held.sent_before))
            elif held.job.deliveries > self.config.max_deliveries:
                self._settle(partition, held, poison(held.prepared, remaining))
            elif not to_send:  # every one left is suppressed: nothing to attempt
                self._settle_unsent(partition, held, about.suppressed)
            else:
                held.suppressed = {r: about.suppressed[r] for r in remaining if r not in to_send}
                held.queue(to_send)
                queued.append(held)
        return queued

    def _settle_unsent(
        self, partition: _Partition, held: HeldEntry, suppressed: dict[str, float]
    ) -> None:
        result = SendResult(suppressed=suppressed)
        job = held.job
        first_attempt = job.first_attempt or time.time()
        settlement = settle_attempt(
            held.prepared,
            result,
            job.attempts,
            first_attempt,
            self.rng,
            sent_before=held.sent_before,
        )
        self._settle(partition, held, settlement)

    def _build(self, partition: _Partition, held: HeldEntry) -> bool:
        """Decode and build; an entry that cannot be sent is settled at once (False)."""
        prepared = prepare(held.entry, self.config, self._policy)
        if isinstance(prepared, oc.Settlement):
            self._settle(partition, held, prepared)
            return False
        held.mark_prepared(prepared)
        return True

    async def _look_up(self, partition: _Partition, built: list[HeldEntry]) -> list[Known] | None:
        """Recipients already accepted and those suppressed, per entry, or None when Redis
        could not tell: the entries are handed back and come back as our own leftovers at
        the next read."""
        try:
            async with asyncio.timeout(self._deadline):
                view = await self._suppressions(partition)
                return await look_up(
                    partition.outcomes, [held.prepared for held in built],
                    reads_may_be_taken_back=self.config.min_replicas > 0, suppressions=view,
                )  # fmt: skip
        except BaseException as exc:
            for held in built:  # they stay pending (at stop: for others)
                held.hand_back()
            if not isinstance(exc, RedisError | OSError):  # TimeoutError is an OSError
                raise  # cancelled at stop, or a bug
            partition.reader.pass_over("idempotency_check_failed", partition.consumer.stream, exc)
            return None

    async def _lane(self) -> None:
        """Send queued entries one after another until told to stop (a None)."""
        while (work := await self._queue.get()) is not None:
            try:
                await self._send(work.partition, work.held)
            except Exception:  # a bug must not take a lane down; the entry stays pending
                log.exception("send_crashed", entry=work.held.entry_id)
            finally:
                if work.held.undecided:  # not sent (stopped, cancelled, Redis away, a bug)
                    work.held.hand_back()

    async def _send(self, partition: _Partition, held: HeldEntry) -> None:
        """One queued entry's SMTP transaction, once no other entry here holds its message
        id.  Returning before a step leaves the entry to the lane, which hands it back."""
        if self._stop.is_set():
            return  # not started: released for another worker
        recipients = held.recipients if held.holds_id else await self._take_turn(partition, held)
        if not recipients or self._stop.is_set():
            return  # nothing left to send (settled), or stopped while it waited its turn
        first_attempt = held.job.first_attempt or time.time()
        start = _Start(held, recipients, self._stop, self._start_by)
        try:
            result = await self.transport.send(held.prepared.built, recipients, start)
        finally:
            start.ended()
        if result is None:
            return  # stopped before it started: released for another worker
        result.suppressed.update(held.suppressed)
        # Before the settlement, which lets the next entry with this id look its recipients up.
        await self._suppress_refused(held, result)
        attempts = held.job.attempts + 1
        settlement = settle_attempt(
            held.prepared, result, attempts, first_attempt, self.rng, sent_before=held.sent_before
        )
        self._settle(partition, held, settlement)

    async def _suppress_refused(self, held: HeldEntry, result: SendResult) -> None:
        """Recipients the relay refused as addresses go on the suppression list (every
        partition's copy; a failure is logged: the list is advice, the outcome is settled)."""
        ttl = self.config.suppress_ttl
        if ttl <= 0 or not result.refused_at_rcpt:
            return
        now = time.time()
        entries = [
            Suppression(
                address=suppression.normalise(rcpt), until=now + ttl, reason=REASON_REJECTED,
                since=now, code=reply.code, text=reply.text[:200], message_id=held.message_id,
            )
            for rcpt, reply in result.rejected.items()
            if rcpt in result.refused_at_rcpt and suppression.refuses_the_address(reply)
        ]  # fmt: skip
        if not entries:
            return
        for each in self._partitions:  # in force here at once, whatever Redis says
            each.suppressions.added(entries)
        try:
            async with asyncio.timeout(READ_BLOCK + READ_STALL):
                await self._suppression.add(entries)
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            log.warning("suppression_not_recorded", id=held.message_id, error=str(exc))
            return
        log.info("recipients_suppressed", id=held.message_id,
                 recipients=[e.address for e in entries], days=round(ttl / 86400, 1))  # fmt: skip

    async def _suppressions(self, partition: _Partition) -> SuppressionView | None:
        """The partition's copy of the suppression list, refreshed when due (None: off)."""
        if self.config.suppress_ttl <= 0:
            return None
        view = partition.suppressions
        await view.refresh_if_due()
        return view

    async def _take_turn(self, partition: _Partition, held: HeldEntry) -> list[str]:
        """Wait for the entry here that sends the same message id, take the id, and return
        the recipients that one did not reach and that are not suppressed meanwhile ([] when
        there is nothing left to do: the entry is settled)."""
        await held.wait_for_id()
        try:
            view = await self._suppressions(partition)
            [known] = await look_up(
                partition.outcomes, [held.prepared], reads_may_be_taken_back=True,
                suppressions=view, only=held.recipients,
            )  # fmt: skip
        except (RedisError, OSError) as exc:
            log.warning("idempotency_check_failed", error=str(exc))
            return []
        held.suppressed.update(
            (r, end) for r, end in known.suppressed.items() if r not in known.accepted
        )
        held.sent_before += [r for r in known.sent_before if r not in held.sent_before]
        remaining = [
            r for r in held.recipients if r not in known.accepted and r not in held.suppressed
        ]
        if remaining:
            return remaining
        if held.suppressed:
            self._settle_unsent(partition, held, held.suppressed)
        else:
            self._settle(partition, held, nothing_left(held.prepared, held.sent_before))
        return []

    def _settle(self, partition: _Partition, held: HeldEntry, settlement: oc.Settlement) -> None:
        held.settle()
        partition.settler.submit(settlement, held.settled)

    async def _pause(self) -> None:
        """Wait a moment for a send or settlement to finish instead of re-reading at once."""
        if not self._window.in_progress:
            await asyncio.sleep(0.01)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._window.next_finish(), READ_BLOCK)

    async def _shut_down(
        self,
        reading: asyncio.Task[None],
        lanes: list[asyncio.Task[None]],
        promoters: list[asyncio.Task[None]],
        stopping: asyncio.Task[bool],
    ) -> None:
        # Whatever the reader waits for (a read, an idempotency check) may wait on a stalled
        # Redis: it must not hold up the stop.  What it would have handed us stays pending.
        reading.cancel()
        await asyncio.wait((reading,))
        await self._drain(lanes)
        stopping.cancel()
        for promoter in promoters:
            promoter.cancel()
        await asyncio.wait(promoters)
        grace = min(max(self.config.shutdown_grace, 1.0), FLUSH_CAP)
        await asyncio.gather(*(p.settler.close(grace=grace) for p in self._partitions))
        # After the flush: an entry released may share its message id with one just sent,
        # and the worker that claims it must find that send's record.  Both take at most
        # a second (the QUITs, the release).
        await asyncio.gather(self._release_unstarted(), self.transport.aclose())

    async def _release_unstarted(self) -> None:
        """Release the entries handed back at the stop that never started an SMTP
        transaction (read, prepared, queued, or waiting for their message id): any other
        worker's next claim pass takes them (:meth:`GroupConsumer.release`, one round trip
        of at most a second per partition).  Without it they would wait ``--claim-after``
        (half an hour by default) on a consumer that is gone: every rolling restart under
        load would hold back up to 2 x ``--concurrency`` messages per worker that long.

        Entries whose send started and was cut off are not released: the relay may have
        accepted them (its reply to DATA was never read), so they keep the ``--claim-after``
        wait, as a worker that died leaves them.  Entries handed back while running (an
        idempotency check that failed) come back to this consumer by its own pending list
        and are left alone.  A release that fails (Redis may be why we stop) is logged and
        only leaves them to ``--claim-after``.
        """
        await asyncio.gather(
            *(p.consumer.release(p.held.unstarted_at_stop) for p in self._partitions)
        )

    async def _drain(self, lanes: list[asyncio.Task[None]]) -> None:
        """Let sends in flight finish up to ``shutdown_grace``; the rest stay pending."""
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            if queued is not None:
                queued.held.hand_back()  # not started: released for others
        for _ in lanes:
            self._queue.put_nowait(None)
        if self._window.in_progress:
            in_flight = self._window.in_progress
            log.info("draining", in_flight=in_flight, grace=self.config.shutdown_grace)
        _, unfinished = await asyncio.wait(lanes, timeout=self.config.shutdown_grace)
        for task in unfinished:
            task.cancel()
        if unfinished:
            log.warning("sends_abandoned_at_stop", count=len(unfinished))
            await asyncio.wait(unfinished)

    def _stop_now(self) -> None:
        self._stop.set()  # the event run() was given, so the whole process stops


class _Start:
    """A send's ``begin`` (the transport calls it once the send has a connection, before
    anything of it goes out): the entry starts sending and counts as in flight, unless the
    worker is stopping (nothing is sent after the stop) or the entry came into hand more
    than ``start_by`` seconds ago.  ``mailpool_delivery_in_flight`` counts sends that have
    a connection, not those waiting for one: at most one per connection, and one more
    behind each while transactions are chained.

    ``start_by`` is --claim-after less one send's longest time: a send started later could
    still run when another worker claims the entry.  A live worker starts each send well
    within it (its entries wait for one send at most); one whose process was stopped or
    starved past it hands the entry back instead of sending what another worker may have
    claimed, sent and recorded meanwhile."""

    __slots__ = ("_held", "_recipients", "_start_by", "_started", "_stop")

    def __init__(
        self, held: HeldEntry, recipients: list[str], stop: asyncio.Event, start_by: float
    ) -> None:
        self._held, self._recipients, self._stop = held, recipients, stop
        self._start_by = start_by
        self._started: float | None = None

    def __call__(self) -> bool:
        """Called again before the send goes out again (its first try went nowhere)."""
        if self._stop.is_set():
            return False
        if self._started is None and time.monotonic() - self._held.read_at > self._start_by:
            log.warning("held_too_long", entry=self._held.entry_id, limit=self._start_by,
                        reason="not sent: another worker may have claimed it")  # fmt: skip
            return False
        if self._started is None:
            self._held.start_sending(self._recipients)
            DELIVERY_IN_FLIGHT.inc()
            self._started = time.perf_counter()
        return True

    def ended(self) -> None:
        if self._started is not None:
            DELIVERY_IN_FLIGHT.dec()
            DELIVERY_SMTP.observe(time.perf_counter() - self._started)


def _log_crash(task: asyncio.Task[None]) -> None:
    """A side task that died of a bug says so (its partition's retries wait for another
    worker's promoter, or housekeeping's)."""
    if not task.cancelled() and (bug := task.exception()) is not None:
        log.error("task_crashed", task=task.get_name(), error=repr(bug))


def read_block_ms(partitions: int, empty_reads: int) -> int | None:
    """How long the next read waits for new entries: READ_BLOCK on one stream; with more,
    not at all until a whole turn of reads came back empty, then a share of READ_BLOCK (a
    read waiting on an empty partition holds up the others' entries)."""
    if partitions == 1:
        return round(READ_BLOCK * 1000)
    if empty_reads < partitions:
        return None
    return max(1, round(READ_BLOCK * 1000 / partitions))


async def promote_retries(
    outcomes: oc.Outcomes, config: DeliveryConfig, stop: asyncio.Event
) -> None:
    """Move due retries into the stream; any worker's promoter may take any retry."""
    interval = min(max(config.retry_base / 4, 0.05), 1.0)
    while not stop.is_set():
        try:
            moved = await outcomes.promote_due(time.time(), config.batch)
        except (RedisError, OSError) as exc:
            log.warning("retry_promotion_failed", error=str(exc))
            moved = 0
        if moved:
            log.debug("retries_due", count=moved)
        if moved < config.batch:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
