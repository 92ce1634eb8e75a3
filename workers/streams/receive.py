"""Append received messages to ``email.receive``: the step after which ingest may answer 250.

``append`` returns only once Redis acknowledged the ``XADD`` (and, with ``min_replicas``, once
``WAIT`` saw that many replicas acknowledge it).  Every way this can fail (Redis down, out of
memory, read-only replica, too few replicas in time, a timeout) raises :class:`StoreError`,
which the SMTP side turns into a temporary ``451 4.3.0``: the sender keeps the message and
tries again later, so nothing is lost.

The price of that rule is at-least-once: when the connection drops after Redis executed the
``XADD`` but before the reply arrived, or ``WAIT`` times out on an entry already written, the
sender retries and the stream holds the message twice.  Consumers deduplicate on the message
``id`` (or Message-ID) if they need exactly-once effects.
"""

from __future__ import annotations

import asyncio
from collections import deque

import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError, ResponseError

from workers.streams.connection import as_text

# Most XADDs one pipeline carries; a 2 KB message makes a batch of 256 about 600 KB.
MAX_BATCH = 256
# Pipelines on their way at once (each on its own pooled connection).  More than one lets a
# message go out while an earlier batch waits for Redis, which matters when Redis shares
# busy CPUs and its replies come late; a handful keeps batching effective under load.
MAX_IN_FLIGHT = 4


class StoreError(Exception):
    """The message was not (safely) stored; ``reason`` is one word for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _classify(exc: BaseException) -> StoreError:
    """Name the failure so an operator reading the log line knows where to look."""
    text = str(exc)
    if isinstance(exc, ReadOnlyError) or text.startswith("READONLY"):
        return StoreError("readonly", text)
    if isinstance(exc, ResponseError) and text.startswith("OOM"):
        return StoreError("oom", text)
    if isinstance(exc, TimeoutError):
        return StoreError("timeout", text or "Redis did not answer in time")
    return StoreError("unavailable", f"{type(exc).__name__}: {text}")


class ReceiveStream:
    """The ``email.receive`` stream as the ingest role writes it.

    Appends from all SMTP sessions of a worker are batched: while pipelines are on their way
    to Redis (at most ``max_in_flight``), the appends that arrive meanwhile queue up and go
    out together in the next one.
    One connection then carries any number of concurrent sessions (a pool of one connection
    per waiting session runs into the client's connection cap, and costs a round trip and
    two system calls per message), and under load many XADDs share one round trip.  With
    ``min_replicas`` a single ``WAIT`` at the end of each pipeline covers the whole batch
    (WAIT counts the writes made on its own connection before it).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        *,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.min_replicas = min_replicas
        self.replica_timeout_ms = max(1, round(replica_timeout * 1000))
        self.max_batch = max_batch
        self._waiting: deque[tuple[bytes, asyncio.Future[str]]] = deque()
        self.max_in_flight = max_in_flight
        self._writers: set[asyncio.Task[None]] = set()  # strong references to running tasks
        self._running = 0  # writers not yet past their last look at the queue

    async def append(self, data: bytes) -> str:
        """XADD ``{"data": data}``; return the entry id once stored as configured.

        No MAXLEN: trimming could drop entries a consumer group has not read yet; retention
        is the housekeeping role's job, which trims only what every group acknowledged.
        """
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((data, future))
        if self._running < self.max_in_flight:
            self._running += 1
            writer = asyncio.create_task(self._write_batches(), name="receive-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await future

    async def _write_batches(self) -> None:
        try:
            await self._drain_queue()
        finally:
            # Synchronously with the last empty-queue check: an append after this point
            # sees the lower count and starts a writer of its own.
            self._running -= 1

    async def _drain_queue(self) -> None:
        while self._waiting:
            count = min(len(self._waiting), self.max_batch)
            batch = [self._waiting.popleft() for _ in range(count)]
            try:
                results = await self._send(batch)
            except BaseException as exc:  # the futures must learn, whatever happened
                failure = exc if isinstance(exc, StoreError) else _classify(exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise  # cancelled: stop writing
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[str]]]) -> list[str | StoreError]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for data, _ in batch:
                pipe.xadd(self.stream, {"data": data})
            if self.min_replicas:
                pipe.wait(self.min_replicas, self.replica_timeout_ms)
            replies = await pipe.execute(raise_on_error=False)
        results: list[str | StoreError] = [
            _classify(r) if isinstance(r, BaseException) else as_text(r)
            for r in replies[: len(batch)]
        ]
        if self.min_replicas:
            acked = replies[-1]
            if isinstance(acked, BaseException):
                raise _classify(acked)
            if int(acked) < self.min_replicas:
                raise StoreError(
                    "replicas",
                    f"{acked} of {self.min_replicas} replicas acknowledged within "
                    f"{self.replica_timeout_ms} ms",
                )
        return results
