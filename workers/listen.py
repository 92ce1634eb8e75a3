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
from collections.abc import Mapping
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
from workers.streams.connection import connect, first_reply_problem, resolve_redis_url
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

    async def ack(self) -> None:
        await self._listener.ack(self)


class Listener:
    """Async iterator of decoded ``email.receive`` messages of one consumer in one group."""

    def __init__(
        self,
        redis: aioredis.Redis,
        group: str,
        consumer: str | None = None,
        *,
        stream: str = layout.DEFAULT_RECEIVE,
        start: str = "new",
        claim_after: float = DEFAULT_CLAIM_AFTER,
        batch: int = 100,
        block: float = 1.0,
        limit: int | None = None,
    ) -> None:
        if start not in STARTS:
            raise ValueError(f"start must be 'new' or 'all', got {start!r}")
        self.redis = redis
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.stream = stream
        self.start = start
        # block bounds how long a stop request waits for a quiet XREADGROUP to return.
        self._reader = GroupConsumer(
            redis, stream, group, self.consumer, claim_after=claim_after, batch=batch, block=block
        )
        self.batch = batch
        # limit: hand out this many entries, then end; reads never fetch beyond it, so a
        # script that wants one message does not leave others pending on its consumer.
        self.limit = limit
        self.handed_out = 0
        self._buffer: deque[StreamEntry] = deque()
        self._group_ready = False
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> Listener:
        try:
            await self.ensure_group()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # Not fatal: the first read waits for Redis and creates the group then.
            log.warning("redis_unavailable", error=str(exc))
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
        if not self._group_ready:
            await self._reader.ensure_group(STARTS[self.start])
            self._group_ready = True

    async def next(self) -> ListenedMessage | None:
        """The next message, waiting as long as needed; None once :meth:`stop` was called."""
        while not self._stopped.is_set():
            if self.limit is not None and self.handed_out >= self.limit:
                return None
            if self._buffer:
                self.handed_out += 1
                return self._wrap(self._buffer.popleft())
            wanted = self.batch if self.limit is None else self.limit - self.handed_out
            self._reader.batch = min(self.batch, wanted)
            self._buffer.extend(await self._read_riding_out_outages())
        return None

    async def release_unread(self) -> None:
        """Make entries read but never handed out claimable by other consumers at once
        (:meth:`GroupConsumer.release <workers.streams.consumer.GroupConsumer.release>`):
        any consumer of the group claims them on its next claim pass instead of waiting
        ``claim_after``; a failure leaves them to ``claim_after``."""
        unread = list(self._buffer)
        self._buffer.clear()
        await self._reader.release(unread)

    async def remove_consumer_if_idle(self) -> bool:
        """Delete this consumer from the group unless entries are pending on it.

        True when it was removed.  A consumer with pending entries is kept (XGROUP
        DELCONSUMER would drop them from the group for good); they come back to a listener
        with the same consumer name at once, or to any other after ``claim_after``.
        """
        if not self._group_ready:
            return False  # never reached Redis: nothing was created under this name
        remove = functions.REMOVE_IDLE_CONSUMER  # one step: checks nothing is pending first
        try:
            reply = await functions.fcall(
                self.redis, remove, [self.stream], [self.group, self.consumer]
            )
            pending = int(reply)
        except RedisError as exc:  # e.g. a user without FCALL; housekeeping removes it later
            log.warning("consumer_not_removed", group=self.group, consumer=self.consumer,
                        error=str(exc))  # fmt: skip
            return False
        if pending:
            log.info("consumer_kept", group=self.group, consumer=self.consumer, pending=pending,
                     reason="entries are pending on it")  # fmt: skip
            return False
        log.info("consumer_removed", group=self.group, consumer=self.consumer)
        return True

    async def ack(self, *messages: ListenedMessage | str) -> int:
        """Acknowledge messages (or entry ids); returns how many were still pending."""
        ids = [m if isinstance(m, str) else m.id for m in messages]
        return await self._reader.ack(*ids)

    async def _read_riding_out_outages(self) -> list[StreamEntry]:
        delay = RETRY_DELAY_FIRST
        while not self._stopped.is_set():
            try:
                await self.ensure_group()
                return await self._reader.read()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis_unavailable", error=str(exc), retry_in=delay)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The group (or the stream) vanished, e.g. a Redis restarted without
                # persistence: create it again from the configured start.
                log.warning("group_missing", stream=self.stream, group=self.group)
                self._group_ready = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)
            delay = min(delay * 2, RETRY_DELAY_CAP)
        return []

    def _wrap(self, entry: StreamEntry) -> ListenedMessage:
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
                "undecodable_entry", stream=self.stream, group=self.group, id=entry.id, error=error
            )
        return ListenedMessage(entry.id, message, error, entry.deliveries, data, self)


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


def to_json_line(message: ListenedMessage) -> str:
    """One JSON object (no newline) for one entry.

    A good message: ``entry_id`` and ``deliveries``, then every key of the message as stored
    (spec keys ``from``, ``to``, ``headers``, ``content`` and the extensions).  In ``content``
    each ``body`` is accompanied by ``body_encoding``: ``"text"`` when the part is ``text/*``
    and its bytes decode with its charset (the body is then that text, line endings ``\\n``),
    else ``"base64"``.  The ``raw`` extension, when present, is base64 with
    ``raw_encoding: "base64"``.  An undecodable entry: ``entry_id``, ``deliveries``, ``error``
    and, when the entry still had one, its ``data`` field as base64 with
    ``data_encoding: "base64"``; it has no spec keys.
    """
    out: dict[str, Any] = {"entry_id": message.id, "deliveries": message.deliveries}
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


async def print_messages(listener: Listener, *, ack: bool) -> int:
    """Print entries until the listener ends (its limit, or stopped); returns how many."""
    printed = 0
    async for message in listener:
        write_line(to_json_line(message))
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


async def say_if_redis_is_missing(redis: aioredis.Redis, url: str) -> None:
    """One clear warning naming the URL when nothing answers there at start."""
    problem = await first_reply_problem(redis)
    if problem is not None:
        log.warning("redis_not_answering", redis_url=mask_url_password(url), error=problem,
                    hint=POOL_HINT)  # fmt: skip


async def main(config: ListenConfig) -> int:
    assert config.group is not None  # validate() insists
    url = resolve_redis_url(config.redis_url)
    redis = connect(url)
    listener = Listener(
        redis,
        config.group,
        config.consumer,
        stream=config.receive_stream,
        start=config.start,
        claim_after=config.claim_after,
        batch=config.batch,
        limit=config.count,
    )
    stop = asyncio.Event()
    install_stop_signals(stop)
    stopper = asyncio.create_task(_stop_when_set(stop, listener))
    log.info("listen_started", redis_url=mask_url_password(url), stream=config.receive_stream,
             group=config.group, consumer=config.consumer, start=config.start)  # fmt: skip
    try:
        await say_if_redis_is_missing(redis, url)
        async with listener:
            printed = await print_messages(listener, ack=config.ack)
    except BrokenPipeError:
        # The reader went away (`| head -1`): nothing more to print to, not an error.  The
        # entry being printed was not acknowledged, so no message is lost.
        _silence_stdout()
        return 0
    finally:
        stopper.cancel()
        await redis.aclose()
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
