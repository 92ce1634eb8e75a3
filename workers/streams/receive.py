"""Append received messages to ``email.receive``: the step after which ingest may answer 250.

``append`` returns the entry id only once Redis acknowledged the ``XADD`` (and, with
``min_replicas``, once ``WAIT`` saw that many replicas acknowledge it).  Every failure raises
:class:`StoreError`, which the SMTP side turns into a temporary ``451 4.3.0``: the sender
keeps the message and tries again later, so nothing is lost.

One 250, one entry: an XADD is never sent twice.  A client that sends a batch again after a
timeout (redis-py's ``Retry``) makes two entries, because Redis runs the first copy as well:
it waited in a socket buffer while Redis stalled.  So the batches go over connections that
never retry (:func:`~workers.streams.connection.connect_for_writes`), the replies are awaited
on the connection the batch went out on, and nothing that left is sent again.

A 451 therefore says "not stored" except in these cases (``StoreError.maybe_stored``):

* the message's wait ran out after its XADD had left (Redis stalled or unreachable for
  ``store_timeout`` plus the time its bytes need): Redis runs the XADD if it resumes.  The
  writer keeps waiting on that connection (LINGER) and logs each entry stored meanwhile
  (``message_stored_after_deferral``, with the entry id);
* the connection broke after the batch left: what Redis ran before it (or before it was
  killed: AOF) is kept;
* ``WAIT`` saw too few replicas: the entry is written, only not replicated as asked.

A message still queued when its wait runs out, a batch whose connection could not be set
up, and an XADD that Redis answered with an error leave nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ReadOnlyError, ResponseError

from workers.streams import layout, redis_fence
from workers.streams.connection import as_text

log = structlog.get_logger("mailpool.ingest")

# Most XADDs one pipeline carries (a 2 KB message makes a batch of 256 about 600 KB), and
# most octets of message data: one message larger than that goes out alone.
MAX_BATCH = 256
MAX_BATCH_BYTES = 8 << 20
# Pipelines on their way at once (each on its own pooled connection).  More than one lets a
# message go out while an earlier batch waits for Redis, which matters when Redis shares
# busy CPUs and its replies come late; a handful keeps batching effective under load.
MAX_IN_FLIGHT = 4
# Loop turns a writer lets pass before it takes its batch: the sessions whose data the loop
# read together with the one that started it append one or two turns later (their tasks
# wake, then run to the end of DATA), and join the batch.  Without them batches of 2 KB
# messages over 10 sessions were half as large, and Redis read each in twice as many
# pieces (bench/redis_floor.py: socket reads 0.40 per message instead of 0.20).
GATHERING_TURNS = 2
# How long a message waits for Redis before its 451 (``--store-timeout``), plus the time
# the octets queued or in flight ahead of it (its own included) take at SLOWEST_RATE: a
# burst of large messages is slow, not failed.
STORE_TIMEOUT = 30.0
SLOWEST_RATE = 8 << 20  # octets per second Redis takes in at the least (network and AOF)
# Setting up a connection (TCP, then AUTH/HELLO/SETINFO replies) before a batch goes out.
CONNECT_TIMEOUT = 5.0
# A batch whose senders all gave up is awaited this much longer (``store_timeout`` if that
# is longer): an entry Redis stores when it resumes is logged, and meanwhile this writer
# sends no further batch into a Redis that does not answer (the messages queued behind get
# a 451 that means "not stored").
LINGER = 60.0
# How long a partition whose store failed is passed over (then a batch tries it again),
# twice as long after each failure in a row, up to AWAY_MAX.
AWAY_FOR = 1.0
AWAY_MAX = 5.0


class StoreError(Exception):
    """The message was not (safely) stored; ``reason`` is one word for logs and metrics.

    ``maybe_stored``: the XADD left for Redis and its outcome is unknown or was not enough
    (see the module docstring); otherwise nothing was stored.
    """

    def __init__(self, reason: str, detail: str, *, maybe_stored: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.maybe_stored = maybe_stored


def _classify(exc: BaseException, *, maybe_stored: bool) -> StoreError:
    """Name the failure so an operator reading the log line knows where to look."""
    if isinstance(exc, StoreError):
        return exc
    text = str(exc)
    if isinstance(exc, ReadOnlyError) or text.startswith("READONLY"):
        return StoreError("readonly", text, maybe_stored=maybe_stored)
    if isinstance(exc, ResponseError) and text.startswith("OOM"):
        return StoreError("oom", text, maybe_stored=maybe_stored)
    if isinstance(exc, TimeoutError):
        return StoreError(
            "timeout", text or "Redis did not answer in time", maybe_stored=maybe_stored
        )
    return StoreError("unavailable", f"{type(exc).__name__}: {text}", maybe_stored=maybe_stored)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@dataclass(eq=False)
class _Pending:
    """One append: its data, the future its sender waits on, and whether it left the queue."""

    data: bytes
    message_id: str | None
    future: asyncio.Future[str]
    deadline: float  # event-loop time when its sender stops waiting
    # Out of the queue, into a batch: from here on it may be stored (or its batch failed
    # before anything was written, and the sender learns that at once).
    taken: bool = False
    # Its sender gave up while its batch holds it: counted in ``given_up_octets``.
    given_up: bool = False


@dataclass(eq=False)
class _Partition:
    """One receive stream a :class:`ReceiveStream` writes to: a client of the Redis that
    serves it, and until when it is passed over after a failure."""

    redis: aioredis.Redis
    stream: str
    away_until: float = 0.0  # monotonic time
    failures: int = 0  # passed over in a row: each time twice as long, up to AWAY_MAX
    writers: int = 0  # writers connecting to it or waiting for its replies
    # XADD <stream> * data <message>: all but the message, which follows as a bulk string.
    xadd_head: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.xadd_head = (
            b"*5\r\n$4\r\nXADD\r\n" + _bulk(self.stream.encode()) + b"$1\r\n*\r\n"
            + _bulk(layout.DATA_KEY)
        )  # fmt: skip

    async def connection(self) -> AbstractConnection:
        """A pooled connection, replaced when it died while idle (a Redis restart): a write
        on it would fail after some of the batch may have gone out."""
        pool = self.redis.connection_pool
        connection = await redis_fence.checkout(pool)
        try:
            if await redis_fence.is_stale(connection):
                # Connecting here, not in the write, keeps a failure to connect apart from
                # a failure after the batch left.
                await redis_fence.reconnect(connection)
        except BaseException:
            await redis_fence.release(pool, connection)
            raise
        return connection


class ReceiveStream:
    """The ``email.receive`` stream as the ingest role writes it: ``stream`` through
    ``redis``, and with ``more_partitions`` every partition's stream, a batch each in turn.

    Appends from all SMTP sessions of a worker are batched: while pipelines are on their way
    to Redis (at most ``max_in_flight``), the appends that arrive meanwhile queue up and go
    out together in the next one (at most ``max_batch`` messages and ``max_batch_bytes``).
    One connection then carries any number of concurrent sessions, and under load many
    XADDs share one round trip.  With ``min_replicas`` a single ``WAIT`` at the end of each
    pipeline covers the whole batch (WAIT counts the writes made on its own connection).

    ``redis`` should come from :func:`~workers.streams.connection.connect_for_writes`: the
    connections of its pool are used directly, with the deadlines set here.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        *,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        store_timeout: float = STORE_TIMEOUT,
        max_batch: int = MAX_BATCH,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_in_flight: int = MAX_IN_FLIGHT,
        more_partitions: Sequence[tuple[aioredis.Redis, str]] = (),
        away_for: float = AWAY_FOR,
    ) -> None:
        self.partitions = [_Partition(redis, stream)]
        self.partitions += [_Partition(client, name) for client, name in more_partitions]
        self.min_replicas = min_replicas
        self.replica_timeout_ms = max(1, round(replica_timeout * 1000))
        self.store_timeout = store_timeout
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_in_flight = max_in_flight
        self.away_for = away_for
        self._turn = 0  # the partition the next batch goes to, unless it is passed over
        self._wait = b"*3\r\n$4\r\nWAIT\r\n" + _bulk(b"%d" % min_replicas)
        self._wait += _bulk(b"%d" % self.replica_timeout_ms)
        self._waiting: deque[_Pending] = deque()
        self._octets_ahead = 0  # of the messages queued or waiting for their reply
        # Of those whose senders gave up (answered 451, or gone) while a batch still holds
        # them, waiting for Redis's reply: memory no session's budget share counts any more.
        self.given_up_octets = 0
        self._writers: set[asyncio.Task[None]] = set()  # strong references to running tasks
        self._running = 0  # writers not yet past their last look at the queue

    async def append(self, data: bytes, message_id: str | None = None) -> str:
        """XADD a receive entry (``data`` alone); return the entry id once stored as configured.

        No MAXLEN: trimming could drop entries a consumer group has not read yet; retention
        is the housekeeping role's job, which trims only what every group acknowledged.
        ``message_id`` names the message in the log line of a late store.
        """
        loop = asyncio.get_running_loop()
        self._octets_ahead += len(data)
        wait = self.store_timeout + self._octets_ahead / SLOWEST_RATE
        pending = _Pending(data, message_id, loop.create_future(), loop.time() + wait)
        self._waiting.append(pending)
        self._start_writer()
        try:
            return await asyncio.wait_for(pending.future, wait)
        except TimeoutError:
            raise StoreError(
                "timeout",
                f"Redis did not acknowledge the message within {wait:.0f} s",
                maybe_stored=pending.taken,
            ) from None
        finally:
            if pending.future.cancelled() and not pending.taken:
                # Given up (timeout, or the session went away) before it left: it never will.
                self._waiting.remove(pending)
                self._octets_ahead -= len(data)
            elif pending.future.cancelled():  # its batch holds it until Redis replies
                pending.given_up = True
                self.given_up_octets += len(data)

    def _start_writer(self) -> None:
        if self._running < self.max_in_flight:
            self._running += 1
            writer = asyncio.create_task(self._write_batches(), name="receive-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)

    async def _write_batches(self) -> None:
        try:
            await self._drain_queue()
        finally:
            # Synchronously with the last empty-queue check: an append after this point
            # sees the lower count and starts a writer of its own.
            self._running -= 1

    async def _drain_queue(self) -> None:
        while self._waiting:
            partition = self._next_partition()
            partition.writers += 1
            try:
                await self._write_next_batch(partition)
            finally:
                partition.writers -= 1

    async def _write_next_batch(self, partition: _Partition) -> None:
        try:
            # asyncio.timeout, not wait_for, which runs the coroutine in a task of its own
            # on Python 3.11 (here and below: 1% of ingest's instructions per message).
            # Its task's loop turns gathered the batch; GATHERING_TURNS does that now, on
            # every Python (3.12's wait_for makes no task).
            async with asyncio.timeout(CONNECT_TIMEOUT):
                connection = await partition.connection()
        except Exception as exc:
            # Nothing of the next batch was written: another partition may take it.
            problem = _classify(exc, maybe_stored=False)
            self._pass_over(partition, problem)
            if not self._another_usable(partition):
                self._finish(self._next_batch(), problem)
            return
        try:
            for _ in range(GATHERING_TURNS):
                await asyncio.sleep(0)
            batch = self._next_batch()  # taken only now: until here each may give up
            if batch:
                await self._store(partition, connection, batch)
        finally:
            await redis_fence.release(partition.redis.connection_pool, connection)

    def _next_partition(self) -> _Partition:
        """The next partition in turn with the fewest writers among those not passed over
        (among all when every one is).  Received mail goes out a batch per
        partition, so batches stay as large as with one stream, and over many batches each
        partition gets its share; a writer per partition keeps a partition that hangs (a
        stalled or cut-off primary) from holding every writer until their timeouts."""
        now = time.monotonic()
        count = len(self.partitions)
        in_turn = [self.partitions[(self._turn + step) % count] for step in range(count)]
        usable = [p for p in in_turn if p.away_until <= now] or in_turn
        partition = min(usable, key=lambda p: p.writers)  # the first with the fewest
        self._turn = (self.partitions.index(partition) + 1) % count
        return partition

    def _another_usable(self, partition: _Partition) -> bool:
        now = time.monotonic()
        return any(p.away_until <= now for p in self.partitions if p is not partition)

    def _pass_over(self, partition: _Partition, problem: StoreError) -> None:
        """With several partitions, one whose store failed is passed over for ``away_for``
        seconds (then a batch tries it again): while its shard is down or failing over,
        the others take the mail."""
        if len(self.partitions) == 1:
            return
        now = time.monotonic()
        if partition.away_until <= now:
            seconds = min(self.away_for * 2**partition.failures, AWAY_MAX)
            partition.failures += 1
            log.warning(
                "partition_passed_over", stream=partition.stream, reason=problem.reason,
                detail=problem.detail, seconds=seconds,
            )  # fmt: skip
            partition.away_until = now + seconds

    def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        octets = 0
        while self._waiting and len(batch) < self.max_batch:
            octets += len(self._waiting[0].data)
            if batch and octets > self.max_batch_bytes:
                break
            pending = self._waiting.popleft()
            pending.taken = True
            batch.append(pending)
        return batch

    async def _store(
        self, partition: _Partition, connection: AbstractConnection, batch: list[_Pending]
    ) -> None:
        """Send the batch and hand each reply to its sender as it comes.

        Replies are awaited until every sender of the batch has given up, and then LINGER
        longer.  A connection left with replies unread is closed.
        """
        loop = asyncio.get_running_loop()
        linger = max(LINGER, self.store_timeout)
        wait = max(p.deadline for p in batch) - loop.time() + linger
        try:
            async with asyncio.timeout(wait):
                await self._exchange(partition, connection, batch)
        except BaseException as exc:
            await redis_fence.drop(connection)
            if isinstance(exc, TimeoutError):
                log.warning(
                    "store_reply_missing", messages=len(batch), waited=round(wait, 1),
                    ids=[p.message_id for p in batch if not p.future.done()],
                )  # fmt: skip
            problem = _classify(exc, maybe_stored=True)
            self._pass_over(partition, problem)
            self._finish(batch, problem)
            if not isinstance(exc, Exception):
                raise  # cancelled: stop writing
        else:
            if partition.away_until <= time.monotonic():
                partition.failures = 0  # stored without a failure: passed over no more
            self._finish(batch, None)

    async def _exchange(
        self, partition: _Partition, connection: AbstractConnection, batch: list[_Pending]
    ) -> None:
        head = partition.xadd_head
        chunks: list[bytes] = []
        for pending in batch:
            chunks += (head, b"$%d\r\n" % len(pending.data), pending.data, b"\r\n")
        if self.min_replicas:
            chunks.append(self._wait)
        for piece in _pieces(chunks):
            await redis_fence.send_packed(connection, piece, check_health=False)
        written: list[tuple[_Pending, str]] = []
        for pending in batch:
            try:
                entry_id = as_text(await redis_fence.read_reply(connection))
            except ResponseError as exc:  # this XADD was refused; the others stand
                problem = _classify(exc, maybe_stored=False)
                self._pass_over(partition, problem)
                self._resolve(pending, None, problem)
                continue
            if self.min_replicas:
                written.append((pending, entry_id))
            else:
                self._resolve(pending, entry_id)
        if self.min_replicas:
            unreplicated = await self._replication_problem(connection)
            if unreplicated is not None:
                self._pass_over(partition, unreplicated)
            for pending, entry_id in written:
                self._resolve(pending, entry_id, unreplicated)

    async def _replication_problem(self, connection: AbstractConnection) -> StoreError | None:
        try:
            acked = int(await redis_fence.read_reply(connection))
        except ResponseError as exc:
            return _classify(exc, maybe_stored=True)
        if acked >= self.min_replicas:
            return None
        detail = (
            f"{acked} of {self.min_replicas} replicas acknowledged within "
            f"{self.replica_timeout_ms} ms"
        )
        return StoreError("replicas", detail, maybe_stored=True)

    def _resolve(
        self, pending: _Pending, entry_id: str | None, error: StoreError | None = None
    ) -> None:
        """Tell the sender: ``entry_id`` when stored, ``error`` (if any) when it fails."""
        future = pending.future
        if future.cancelled():  # its sender was answered 451 already, or went away
            if entry_id is not None:
                log.warning("message_stored_after_deferral", id=pending.message_id, entry=entry_id)
        elif not future.done():
            if error is not None:
                future.set_exception(error)
            elif entry_id is not None:
                future.set_result(entry_id)

    def _finish(self, batch: list[_Pending], error: StoreError | None) -> None:
        """The batch is done with: ``error`` for those without an outcome."""
        for pending in batch:
            if error is not None:
                self._resolve(pending, None, error)
            self._octets_ahead -= len(pending.data)
            if pending.given_up:
                pending.given_up = False
                self.given_up_octets -= len(pending.data)


class Store(Protocol):
    """Where ingest stores received mail: one receive stream, or all partitions' in turn."""

    async def append(self, data: bytes, message_id: str | None = None) -> str: ...

    @property
    def given_up_octets(self) -> int:
        """Octets of messages whose senders gave up while the store still holds them."""
        ...


# Octets handed to the socket at once.  asyncio joins what one write gets into a single
# buffer and copies what the socket does not take at once into another: sent whole, a
# batch of large messages costs two more copies of it (the ingest memory budget).
WRITE_PIECE = 1 << 20


def _pieces(chunks: list[bytes], size: int = WRITE_PIECE) -> Iterator[list[bytes]]:
    """``chunks`` in order, in groups of about ``size`` octets (a larger chunk cut up)."""
    group: list[bytes] = []
    octets = 0
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            part = chunk[start : start + size]  # the chunk itself when it is not larger
            group.append(part)
            octets += len(part)
            if octets >= size:
                yield group
                group, octets = [], 0
    if group:
        yield group
