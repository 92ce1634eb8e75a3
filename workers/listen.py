"""Listeners: consume ``email.receive`` in a consumer group, and ``mailpool listen``.

Python API::

    async with Listener(redis, "billing", start="all") as listener:
        async for msg in listener:
            if msg.error is None:
                handle(msg.message)      # a ReceiveMessage (spec keys + extensions)
            await msg.ack()              # explicit: unacked entries come back (see below)

Semantics (Redis consumer groups, see ``workers.streams.consumer``):

* Every group sees every message; the consumers of one group share them.
* The group is created on first use: ``start="new"`` sees messages added after that moment,
  ``start="all"`` also all retained history.  An existing group keeps its position.
* An entry read but not acknowledged stays pending on its consumer.  A consumer restarted
  under the same name gets its own pending entries first; entries pending longer than
  ``claim_after`` seconds on any consumer (a dead one, or this one when the caller never
  acks) are claimed and handed out again with ``deliveries`` increased.
* An entry that cannot be decoded (not msgpack, schema violation, no ``data`` field, or
  trimmed from the stream while pending) never stops the iteration: it is yielded with
  ``message = None`` and ``error`` set.  Acknowledging it is the caller's choice; one that is
  left pending comes back after ``claim_after`` with a higher ``deliveries`` count.
* Leaving ``async with`` without an exception removes the consumer from the group when it
  has nothing pending (so short runs do not pile up consumers); with entries pending it
  stays, so that they come back to it, and says so in the log.
* Partitioned (``--partitions N`` or a cluster URL): every partition's receive stream,
  ``email.receive{0}`` .. ``{N-1}``, in the same group; the entries ready are handed out in
  turn, one per partition, so a busy partition never starves another.  Order holds within
  a partition, not across them (see :class:`Listener`); ``ack`` goes to the entry's own
  stream, and ``mailpool listen`` adds ``stream`` to each line.

``mailpool listen`` prints one JSON line per entry; see :func:`to_json_line` for the format.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.codec.errors import CodecError
from workers.codec.types import ReceiveMessage
from workers.codec.validate import decode_receive
from workers.config import (
    CommonConfig,
    ConfigError,
    default_consumer_name,
    mask_url_password,
    option,
    positive,
)
from workers.lifecycle import install_stop_signals
from workers.streams import functions, layout
from workers.streams.connection import (
    close_all,
    connect,
    first_reply_problem,
    partition_clients,
    resolve_redis_url,
)
from workers.streams.consumer import START_ALL, START_NEW, GroupConsumer, StreamEntry

log = structlog.get_logger("mailpool.listen")

STARTS = {"new": START_NEW, "all": START_ALL}
DEFAULT_CLAIM_AFTER = 300.0
# Back-off while Redis is away: the listener keeps trying instead of dying with it.
RETRY_DELAY_FIRST = 0.1
RETRY_DELAY_CAP = 5.0


@dataclass
class ListenedMessage:
    """One entry of the receive stream as a listener hands it out."""

    id: str  # stream entry id (what is acknowledged), not the message's own "id"
    message: ReceiveMessage | None  # None when the entry could not be decoded
    error: str | None  # why it could not be decoded; None for a good message
    deliveries: int  # 1 on first delivery, more when claimed again after claim_after
    data: bytes | None  # the entry's raw `data` field (None when missing or trimmed)
    _listener: Listener = field(repr=False)
    # The stream it came from (entry ids are per stream: partitions may repeat one).
    stream: str = layout.DEFAULT_RECEIVE

    async def ack(self) -> None:
        await self._listener.ack(self)


class _Partition:
    """One stream of a listener: its consumer, its read in flight (at most one) and the
    entries read but not handed out yet, in stream order."""

    def __init__(self, reader: GroupConsumer) -> None:
        self.reader = reader
        self.buffer: deque[StreamEntry] = deque()
        self.reading: asyncio.Task[list[StreamEntry]] | None = None
        self.asked = 0  # how many entries the read in flight may return
        self.group_ready = False
        self.retry_delay = RETRY_DELAY_FIRST  # after a failed read, doubling up to the cap

    @property
    def stream(self) -> str:
        return self.reader.stream

    def harvest(self) -> None:
        """Move the entries of a finished read into the buffer (its error, if any, raises)."""
        if self.reading is not None and self.reading.done():
            reading, self.reading, self.asked = self.reading, None, 0
            self.buffer.extend(reading.result())


class Listener:
    """Async iterator of decoded ``email.receive`` messages of one consumer in one group,
    over one stream or over every partition's stream (``redis`` and ``stream`` as
    sequences, or one client for all streams).

    With several streams (``email.receive{0}`` .. ``{N-1}`` of a partitioned deployment)
    the consumer has the same name in the group of each; each stream has its own read in
    flight, and the entries ready are handed out in turn, one per stream, so a busy
    partition never starves another.  Order guarantees: within one stream, entries are
    handed out in stream order (an entry handed out again, claimed after ``claim_after`` or
    released, may come after newer ones of its stream, as with one stream); across streams
    there is no order (ingest spreads received mail round robin over the partitions).
    Acknowledgements go to the stream each message came from.
    """

    def __init__(
        self,
        redis: aioredis.Redis | Sequence[aioredis.Redis],
        group: str,
        consumer: str | None = None,
        *,
        stream: str | Sequence[str] = layout.DEFAULT_RECEIVE,
        start: str = "new",
        claim_after: float = DEFAULT_CLAIM_AFTER,
        batch: int = 100,
        block: float = 1.0,
        limit: int | None = None,
    ) -> None:
        if start not in STARTS:
            raise ValueError(f"start must be 'new' or 'all', got {start!r}")
        streams = [stream] if isinstance(stream, str) else list(stream)
        clients = list(redis) if isinstance(redis, Sequence) else [redis] * len(streams)
        if not streams or len(clients) != len(streams):
            raise ValueError("one Redis client per stream, or one client for all streams")
        self.redis, self.stream, self.streams = clients[0], streams[0], tuple(streams)
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.start = start
        # block bounds how long a stop request waits for a quiet XREADGROUP to return.
        self._parts = [
            _Partition(GroupConsumer(client, name, group, self.consumer,
                                     claim_after=claim_after, batch=batch, block=block))
            for client, name in zip(clients, streams, strict=True)
        ]  # fmt: skip
        self._block_ms = int(block * 1000)
        self.batch = batch
        # limit: hand out this many entries, then end; reads never fetch beyond it, so a
        # script that wants one message does not leave others pending on its consumer.
        self.limit = limit
        self.handed_out = 0
        self._hand_turn = 0  # the stream whose entry goes out next, when it has one
        self._read_turn = 0  # the stream that reads next, when the limit lets few read
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> Listener:
        for part in self._parts:
            try:
                await self._ensure_group(part)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Not fatal: the first read waits for Redis and creates the group then.
                log.warning("redis_unavailable", stream=part.stream, error=str(exc))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        await self.release_unread()
        if exc_type is None:
            await self.remove_consumer_if_idle()

    def __aiter__(self) -> Listener:
        return self

    async def __anext__(self) -> ListenedMessage:
        message = await self.next()
        if message is None:
            raise StopAsyncIteration
        return message

    def stop(self) -> None:
        """End the iteration after the read in progress (at most ``block`` seconds).

        Entries already read but not yet handed out stay pending on this consumer; leaving
        ``async with`` (or calling :meth:`release_unread`) makes them claimable by the other
        consumers at once, and a listener with the same consumer name gets them first.
        """
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    async def ensure_group(self) -> None:
        for part in self._parts:
            await self._ensure_group(part)

    async def _ensure_group(self, part: _Partition) -> None:
        if not part.group_ready:
            await part.reader.ensure_group(STARTS[self.start])
            part.group_ready = True

    async def next(self) -> ListenedMessage | None:
        """The next message, waiting as long as needed; None once :meth:`stop` was called."""
        while not self._stopped.is_set():
            if self.limit is not None and self.handed_out >= self.limit:
                return None
            for part in self._parts:
                part.harvest()
            self._start_reads()
            taken = self._take_in_turn()
            if taken is not None:
                self.handed_out += 1
                return self._wrap(*taken)
            await self._wait_for_a_read()
        return None

    def _take_in_turn(self) -> tuple[_Partition, StreamEntry] | None:
        count = len(self._parts)
        for step in range(count):
            index = (self._hand_turn + step) % count
            part = self._parts[index]
            if part.buffer:
                self._hand_turn = (index + 1) % count
                return part, part.buffer.popleft()
        return None

    def _start_reads(self) -> None:
        """A read for every stream with nothing in hand and no read in flight, as far as
        ``limit`` allows: while fewer entries are wanted than such streams, the first ones
        in turn read one entry each, with ``block`` divided by the stream count so that
        the others soon get their turn."""
        count = len(self._parts)
        in_turn = (self._parts[(self._read_turn + step) % count] for step in range(count))
        idle = [part for part in in_turn if not part.buffer and part.reading is None]
        wanted = self._wanted(len(idle))
        if not idle or wanted <= 0:
            return
        share = min(self.batch, max(1, wanted // len(idle)))
        block_ms = self._block_ms if wanted >= len(idle) else max(1, self._block_ms // count)
        for part in idle[:wanted]:
            part.asked = share
            part.reader.batch, part.reader.block_ms = share, block_ms
            part.reading = asyncio.create_task(self._read_riding_out_outages(part))
            self._read_turn = (self._parts.index(part) + 1) % count

    def _wanted(self, idle: int) -> int:
        """How many more entries reads may fetch: without a limit, a batch per idle stream;
        with one, what is left of it beyond what was handed out, read or asked for."""
        if self.limit is None:
            return self.batch * idle
        in_hand = sum(len(p.buffer) + p.asked for p in self._parts)
        return self.limit - self.handed_out - in_hand

    async def _wait_for_a_read(self) -> None:
        reads = [p.reading for p in self._parts if p.reading is not None]
        stopping = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([*reads, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()

    async def release_unread(self) -> None:
        """Make entries read but never handed out claimable by other consumers at once
        (:meth:`GroupConsumer.release <workers.streams.consumer.GroupConsumer.release>`):
        any consumer of the group claims them on its next claim pass instead of waiting
        ``claim_after``; a failure leaves them to ``claim_after``.  Once stopped, the reads
        still in flight are waited for (at most ``block``) and their entries released too."""
        if self._stopped.is_set():
            reads = [p.reading for p in self._parts if p.reading is not None]
            if reads:
                await asyncio.wait(reads)
        for part in self._parts:
            with contextlib.suppress(RedisError, OSError):  # a read that failed: nothing read
                part.harvest()
            unread = list(part.buffer)
            part.buffer.clear()
            await part.reader.release(unread)

    async def remove_consumer_if_idle(self) -> bool:
        """Delete this consumer from the group of each stream unless entries are pending on
        it there.

        True when it was removed everywhere.  A consumer with pending entries is kept
        (XGROUP DELCONSUMER would drop them from the group for good); they come back to a
        listener with the same consumer name at once, or to any other after
        ``claim_after``.
        """
        removed = [await self._remove_if_idle(part) for part in self._parts if part.group_ready]
        if removed and all(removed):
            log.info("consumer_removed", group=self.group, consumer=self.consumer)
            return True
        return False

    async def _remove_if_idle(self, part: _Partition) -> bool:
        remove = functions.REMOVE_IDLE_CONSUMER  # one step: checks nothing is pending first
        try:
            reply = await functions.fcall(
                part.reader.redis, remove, [part.stream], [self.group, self.consumer]
            )
            pending = int(reply)
        except RedisError as exc:  # e.g. a user without FCALL; housekeeping removes it later
            log.warning("consumer_not_removed", group=self.group, consumer=self.consumer,
                        stream=part.stream, error=str(exc))  # fmt: skip
            return False
        if pending:
            log.info("consumer_kept", group=self.group, consumer=self.consumer, pending=pending,
                     stream=part.stream, reason="entries are pending on it")  # fmt: skip
            return False
        return True

    async def ack(self, *messages: ListenedMessage | str, stream: str | None = None) -> int:
        """Acknowledge messages (or entry ids of ``stream``, which one stream alone may
        leave out); returns how many were still pending."""
        ids: dict[int, list[str]] = {}
        for m in messages:
            entry_id, source = (m, stream) if isinstance(m, str) else (m.id, m.stream)
            ids.setdefault(self._index_of(source), []).append(entry_id)
        return sum([await self._parts[index].reader.ack(*group) for index, group in ids.items()])

    def _index_of(self, stream: str | None) -> int:
        if stream is None:
            if len(self._parts) > 1:
                raise ValueError("an entry id alone is ambiguous over several streams: "
                                 "acknowledge the message, or name its stream")  # fmt: skip
            return 0
        try:
            return self.streams.index(stream)
        except ValueError:
            raise ValueError(f"{stream!r} is not a stream of this listener") from None

    async def _read_riding_out_outages(self, part: _Partition) -> list[StreamEntry]:
        """A read of ``part``, waiting out Redis outages.  With several streams a failed
        read waits its delay and returns nothing, so that the turn passes to the others (a
        ``limit`` smaller than the stream count lets few read at once)."""
        while not self._stopped.is_set():
            try:
                await self._ensure_group(part)
                entries = await part.reader.read()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis_unavailable", stream=part.stream, error=str(exc),
                            retry_in=part.retry_delay)  # fmt: skip
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The group (or the stream) vanished, e.g. a Redis restarted without
                # persistence: create it again from the configured start.
                log.warning("group_missing", stream=part.stream, group=self.group)
                part.group_ready = False
            else:
                part.retry_delay = RETRY_DELAY_FIRST
                return entries
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), part.retry_delay)
            part.retry_delay = min(part.retry_delay * 2, RETRY_DELAY_CAP)
            if len(self._parts) > 1:
                return []
        return []

    def _wrap(self, part: _Partition, entry: StreamEntry) -> ListenedMessage:
        data = entry.data
        message: ReceiveMessage | None = None
        error: str | None = None
        if entry.fields is None:
            error = "entry was trimmed from the stream before it was acknowledged"
        elif data is None:
            error = "entry has no 'data' field"
        else:
            try:
                message = decode_receive(data)
            except CodecError as exc:
                error = f"not a valid email.receive message: {exc}"
        if error is not None:
            log.warning(
                "undecodable_entry", stream=part.stream, group=self.group, id=entry.id, error=error
            )
        return ListenedMessage(entry.id, message, error, entry.deliveries, data, self, part.stream)


# ---------------------------------------------------------------------------------------------
# JSON lines for `mailpool listen`


def text_charset(content_type: str) -> str | None:
    """The charset to decode a body with when it is text, else None.

    ``text/*`` without a charset parameter is read as UTF-8 (a superset of the RFC 2046
    default us-ascii that also accepts the many senders that omit the parameter).
    """
    header = Message()
    header["content-type"] = content_type
    if header.get_content_maintype() != "text":
        return None
    return header.get_content_charset() or "utf-8"


def body_to_json(body: bytes, content_type: str) -> tuple[str, str]:
    """(body, body_encoding): the decoded text and "text", or base64 and "base64"."""
    charset = text_charset(content_type)
    if charset is not None:
        try:
            return body.decode(charset), "text"
        except (LookupError, UnicodeDecodeError):
            pass  # unknown charset or bytes that do not match it: keep them exact
    return base64.b64encode(body).decode("ascii"), "base64"


def content_to_json(content: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in content.items():
        if key == "parts":
            out["parts"] = [content_to_json(part) for part in value]
        elif key == "body" and isinstance(value, bytes):
            out["body"], out["body_encoding"] = body_to_json(value, content["content-type"])
        else:
            out[key] = jsonable(value)
    return out


def jsonable(value: Any) -> Any:
    """Plain JSON values; bytes outside ``content`` (the ``raw`` extension) become base64."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def to_json_line(message: ListenedMessage, *, stream: bool = False) -> str:
    """One JSON object (no newline) for one entry.

    A good message: ``entry_id`` and ``deliveries``, then every key of the message as stored
    (spec keys ``from``, ``to``, ``headers``, ``content`` and the extensions).  In ``content``
    each ``body`` is accompanied by ``body_encoding``: ``"text"`` when the part is ``text/*``
    and its bytes decode with its charset (the body is then that text, line endings ``\\n``),
    else ``"base64"``.  The ``raw`` extension, when present, is base64 with
    ``raw_encoding: "base64"``.  An undecodable entry: ``entry_id``, ``deliveries``, ``error``
    and, when the entry still had one, its ``data`` field as base64 with
    ``data_encoding: "base64"``; it has no spec keys.  With ``stream`` (partitioned), the
    entry's stream follows ``entry_id`` (``"stream": "email.receive{3}"``): an entry id
    names an entry of one stream only.
    """
    out: dict[str, Any] = {"entry_id": message.id}
    if stream:
        out["stream"] = message.stream
    out["deliveries"] = message.deliveries
    if message.message is None:
        out["error"] = message.error
        if message.data is not None:
            out["data"], out["data_encoding"] = jsonable(message.data), "base64"
    else:
        fields: Mapping[str, Any] = message.message
        for key, value in fields.items():
            if key == "content":
                out["content"] = content_to_json(value)
            elif key == "raw" and isinstance(value, bytes):
                out["raw"], out["raw_encoding"] = jsonable(value), "base64"
            else:
                out[key] = jsonable(value)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# `mailpool listen`


@dataclass
class ListenConfig(CommonConfig):
    """``mailpool listen``: print the messages of one consumer group as JSON lines."""

    group: str | None = option(None, "consumer group (one per application; required)")
    consumer: str = option(default_consumer_name, "consumer name in the group")
    start: str = option("new", "where a new group starts: new (from now) or all (history)")
    claim_after: float = option(
        DEFAULT_CLAIM_AFTER, "take over entries pending this long on a silent consumer, seconds"
    )
    count: int | None = option(None, "stop after printing this many entries (default: run on)")
    ack: bool = option(True, "acknowledge each entry after printing it (--no-ack: leave pending)")
    batch: int = option(100, "entries read per XREADGROUP")

    def validate(self) -> None:
        super().validate()
        if not self.group:
            raise ConfigError("--group is required (one consumer group per application)")
        if self.start not in STARTS:
            raise ConfigError(f"--start: {self.start!r} is not new or all")
        if not self.consumer:
            raise ConfigError("--consumer must not be empty")
        positive("claim_after", self.claim_after)
        positive("batch", self.batch)
        if self.count is not None:
            positive("count", self.count)


def write_line(line: str) -> None:
    """Write and flush at once, so a pipe reader has the line before we acknowledge it."""
    sys.stdout.buffer.write(line.encode("utf-8", "replace") + b"\n")
    sys.stdout.buffer.flush()


async def print_messages(listener: Listener, *, ack: bool, stream: bool = False) -> int:
    """Print entries until the listener ends (its limit, or stopped); returns how many.
    ``stream``: each line names its entry's stream (see :func:`to_json_line`)."""
    printed = 0
    async for message in listener:
        write_line(to_json_line(message, stream=stream))
        if ack:
            await message.ack()
        printed += 1
    return printed


# What `mailpool listen` says when no Redis answers at start.  It keeps waiting: it is a
# long-running consumer, often started before (or beside) the pool it listens to.
POOL_HINT = (
    "waiting for it (Ctrl-C to stop). To listen to a running pool, give --redis-url or "
    "MAILPOOL_REDIS_URL, or start listen in the directory where `mailpool run` runs "
    "(it finds the pool's Redis through .mailpool/redis.url)"
)


async def say_if_redis_is_missing(clients: Sequence[aioredis.Redis], url: str) -> None:
    """One clear warning naming the URL when nothing answers there at start (on a cluster:
    the first partition whose primary does not answer)."""
    for client in {id(c): c for c in clients}.values():
        problem = await first_reply_problem(client)
        if problem is None:
            continue
        log.warning("redis_not_answering", redis_url=mask_url_password(url), error=problem,
                    hint=POOL_HINT)  # fmt: skip
        return


async def main(config: ListenConfig) -> int:
    assert config.group is not None  # validate() insists
    url = resolve_redis_url(config.redis_url)
    partitions = config.partition_keys()
    # Partitioned: every partition's receive stream, each through the client of its slot.
    clients = partition_clients(url, partitions, connect)
    listener = Listener(
        clients,
        config.group,
        config.consumer,
        stream=[keys.receive for keys in partitions],
        start=config.start,
        claim_after=config.claim_after,
        batch=config.batch,
        limit=config.count,
    )
    stop = asyncio.Event()
    install_stop_signals(stop)
    stopper = asyncio.create_task(_stop_when_set(stop, listener))
    log.info("listen_started", redis_url=mask_url_password(url), stream=config.receive_stream,
             partitions=len(partitions), group=config.group, consumer=config.consumer,
             start=config.start)  # fmt: skip
    try:
        await say_if_redis_is_missing(clients, url)
        async with listener:
            printed = await print_messages(listener, ack=config.ack, stream=config.partitioned)
    except BrokenPipeError:
        # The reader went away (`| head -1`): nothing more to print to, not an error.  The
        # entry being printed was not acknowledged, so no message is lost.
        _silence_stdout()
        return 0
    finally:
        stopper.cancel()
        await close_all(clients)
    log.info("listen_stopped", group=config.group, printed=printed)
    return 0


async def _stop_when_set(stop: asyncio.Event, listener: Listener) -> None:
    await stop.wait()
    listener.stop()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
