"""Every call mailpool makes below redis-py's command API, in one place.

Two hot paths talk to a connection instead of going through ``Redis.pipeline``:

* delivery settlements (:mod:`workers.streams.outcomes`): a batch of ``FCALL`` packed by
  hiredis (:mod:`workers.streams.hiredis_fence`), written at once on one connection of the
  pool's, the replies read one by one.  The public variant, a pipeline
  (``execute(raise_on_error=False)``), costs 10% more CPU per message (``bench/redis_fence.py
  --variant pipeline``: 0.90 and 0.90 msg/CPU-s in two runs of 4 and 6 alternated rounds,
  redis-py 8.2.0).  The connection is held across round trips (:class:`HeldConnection`):
  a checkout per round trip costs 19 us of CPU, about 6% of the worker's messages per
  CPU-second (figures there);
* ingest appends (:mod:`workers.streams.receive`): XADDs packed by hand and written in 1 MiB
  pieces on a connection the writer chose, so that it knows which batch left on which
  connection (one 250, one entry: nothing that left is sent again, README Guarantees), reads
  each reply as it comes, and never holds a second copy of a large message (the ingest
  memory budget).  A pipeline has none of the three, and is slower too: ``bench/ingest.py
  --quick --against`` a tree whose writer sends each batch as a pipeline
  (``execute(raise_on_error=False)`` on the same no-retry client), 7 alternated rounds of
  2 KB messages over 10 sessions: this code takes 1.09x (new connections) and 1.11x
  (reused) the messages per second.

Written against redis-py 8.2.0 and checked from 5.0.1 (pyproject's floor, the lowest-deps
run) to 8.x; ``tests/test_internals_redis.py`` fails on a release outside that range or one
that lacks a name used here.  What differs between those releases:

* ``read_response(timeout=math.inf)`` reads without a timer of its own from 8.1 on, and only
  from 8.2 does it raise a socket's own timeout (ETIMEDOUT) as a lost connection rather than
  return None for it.  :func:`read_replies` uses it from 8.2 and reads each reply with its
  own timer before.
* From 8.2, :func:`read_replies` takes the replies straight from the connection's hiredis
  parser (``_AsyncHiredisParser``: its ``_reader``, ``read_from_socket`` and
  ``handle_push_response``), every reply already buffered at once.
* ``ConnectionPool.get_connection`` requires a command name (which it ignores) before
  redis-py 5.3; from 5.3 the name is optional and passing one warns (DeprecationWarning).
* The liveness probe of an idle connection is ``can_read`` from 8.0, which deprecates the
  ``can_read_destructive`` of earlier releases (8.x runs the same code for both).
* ``redis.asyncio.sentinel.Sentinel`` closes the clients it keeps of each Sentinel with
  ``aclose`` in recent releases (8.2 has it); 5.x has no such method, and there each of its
  ``sentinels`` is closed in turn (:func:`close_sentinel`).
* ``Connection._connect`` (private) opens the socket to ``self.host``/``self.port`` in every
  release of that range; :class:`SlotConnection` sets those first (the primary that serves
  its cluster slot now).  ``ConnectionPool`` hands its keyword arguments to the connection
  class, which is how the slot and the topology reach it.
* The text of ``MasterNotFoundError`` (undocumented) is "No master found for 'm'" then, for
  each Sentinel that failed, its client's repr and its error: "<repr> - network:
  ConnectionError: Error 111 ..." in 8.2, "Redis<repr> - ConnectionError('Error 111 ...')"
  in 5.0.1.  :func:`readable_master_not_found` keeps the errors and drops the reprs: with
  one Sentinel down, 145 characters instead of 1 178 (8.2; every Sentinel adds another
  thousand) in the one line a worker logs or prints at start
  (test_internals_redis::test_redis_pys_no_master_error_reads_as_one_line, against a real
  Sentinel, in both the CI and the lowest-deps run).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import redis
from redis._parsers import hiredis as _redis_hiredis
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The releases this module was checked against (tests/test_internals_redis.py).
CHECKED_RELEASES = ">=5.0.1,<9"
# What redis-py 5.0-5.2 want as the (unused) command name of a checkout.
_CHECKOUT_COMMAND = "EVALSHA"


def needs_command_name(pool: ConnectionPool) -> bool:
    """True where the pool's ``get_connection`` still requires a command name (< 5.3)."""
    return _needs_command_name(type(pool))


@functools.cache  # inspect.signature takes ~34 us: once per pool class, not per checkout
def _needs_command_name(pool_class: type[ConnectionPool]) -> bool:
    parameter = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


async def checkout(pool: ConnectionPool) -> AbstractConnection:
    """A connected connection of ``pool``'s, the caller's until :func:`release`."""
    # redis-py's deprecation decorator leaves get_connection untyped.
    get_connection: Callable[..., Awaitable[AbstractConnection]] = pool.get_connection
    if needs_command_name(pool):
        return await get_connection(_CHECKOUT_COMMAND)
    return await get_connection()


async def release(pool: ConnectionPool, connection: AbstractConnection) -> None:
    await pool.release(connection)


@contextlib.asynccontextmanager
async def borrowed(pool: ConnectionPool) -> AsyncIterator[AbstractConnection]:
    """A connection for one exchange: closed when the block fails (replies may be left
    unread on it), given back to the pool either way."""
    connection = await checkout(pool)
    try:
        yield connection
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


class HeldConnection:
    """One connection of ``pool``'s kept across round trips (the settlements' hot path).

    A checkout per round trip costs 19 us of CPU (a PING on a loopback Redis: 97 us
    borrowed, 78 us held, redis-py 8.2.0), which a settlement batch of one or two messages
    pays in full: bench/delivery.py --quick, two alternated runs each, the worker's messages
    per CPU-second were 3679 and 3695 with a checkout per batch, 4010 and 3856 held.
    After an idle spell the connection is probed (:func:`is_stale`): the server may have
    closed it meanwhile (Redis ``timeout``), which nothing else notices.  A Sentinel pool is
    never held: a held connection reconnects to the address it had, which after a failover
    is a replica; each round trip checks one out so that the pool asks the Sentinels.
    """

    def __init__(self, pool: ConnectionPool, *, idle_check: float = 5.0) -> None:
        self.pool = pool
        self.idle_check = idle_check
        self._held = not isinstance(pool, SentinelConnectionPool)
        self._connection: AbstractConnection | None = None
        self._used = 0.0  # monotonic time of its last round trip
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AbstractConnection]:
        """The connection for one exchange, one user at a time; dropped when the exchange
        fails (replies may be left unread on it)."""
        if not self._held:
            async with borrowed(self.pool) as connection:
                yield connection
            return
        async with self._lock:
            connection = await self._checked()
            try:
                yield connection
            except BaseException:
                await self._give_back(disconnect=True)
                raise

    async def _checked(self) -> AbstractConnection:
        now = time.monotonic()
        connection = self._connection
        if connection is None:
            connection = self._connection = await checkout(self.pool)
        elif now - self._used > self.idle_check and await is_stale(connection):
            await connection.disconnect()  # the next command connects again
        self._used = now
        return connection

    async def _give_back(self, *, disconnect: bool) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            if disconnect:
                await connection.disconnect()
            await self.pool.release(connection)

    async def aclose(self) -> None:
        """Give the connection back to the pool."""
        async with self._lock:
            await self._give_back(disconnect=False)


async def is_stale(connection: AbstractConnection) -> bool:
    """True when a connection that sat idle is at EOF or holds unread data, so the next
    command would fail or read someone else's reply.  The probe may consume that data; a
    stale connection is disconnected anyway."""
    has_can_read = hasattr(connection, "can_read")  # redis-py >= 8.0
    probe = connection.can_read if has_can_read else connection.can_read_destructive
    try:
        return bool(await probe())
    except RedisConnectionError:  # closed by the server, or never connected
        return True


async def reconnect(connection: AbstractConnection) -> None:
    """Close and connect again now, so a failure to connect is told apart from a failure
    after a write left."""
    await connection.disconnect()
    # redis-py leaves connect untyped.
    connect: Callable[[], Awaitable[None]] = connection.connect
    await connect()


async def drop(connection: AbstractConnection) -> None:
    """Close at once, without waiting for the socket (a stalled peer)."""
    await connection.disconnect(nowait=True)


async def close_sentinel(sentinel: Sentinel) -> None:
    """Close the clients ``sentinel`` keeps of each Sentinel (not those of the masters)."""
    aclose: Callable[[], Awaitable[None]] | None = getattr(sentinel, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    for client in sentinel.sentinels:  # redis-py < 8: no Sentinel.aclose
        await client.aclose()


# redis-py 8.2 and 5.0.1's MasterNotFoundError text (see the module docstring).
_REPR = re.compile(r"<[^<>]*>")  # innermost <...>: removed until none is left
# 8.2 writes "<repr> - error", 5.x "Redis<repr> - error", joined by ", ".
_EACH = re.compile(r"(?:^|,)\s*(?:Redis\s*)?-\s")


def readable_master_not_found(message: str, master: str) -> str:
    """redis-py's MasterNotFoundError text without object reprs (nested ``<...>``): what
    each Sentinel answered, in one line."""
    previous = None
    while previous != message:
        previous, message = message, _REPR.sub("", message)
    # What is left: "No master found for 'm' :  - error,  - error" (one per Sentinel).
    answers = [" ".join(part.split()) for part in _EACH.split(message.partition(" : ")[2])]
    said = "; ".join(a for a in answers if a) or "none of them watches it or it is down"
    return f"no Sentinel names a master {master!r} ({said})"


# The two calls of the hot paths return redis-py's own awaitable: no coroutine of ours
# in between, once per message.


def send_packed(
    connection: AbstractConnection, packed: bytes | Iterable[bytes], *, check_health: bool = True
) -> Awaitable[None]:
    """Write commands already in the Redis protocol; ``check_health=False`` skips redis-py's
    PING of a connection idle past ``health_check_interval`` (the caller probed it)."""
    return connection.send_packed_command(packed, check_health=check_health)


def read_reply(connection: AbstractConnection) -> Awaitable[Any]:
    """The next reply on ``connection``; a Redis error reply is raised (ResponseError)."""
    return connection.read_response()


async def read_replies(connection: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies on ``connection``, each Redis error reply in its place (a
    ResponseError); a wait of ``socket_timeout`` for the next one fails the read, as with
    ``read_response``, while a batch that keeps answering is never cut short.

    One timer for them all: ``read_response`` arms one per reply (``socket_timeout``), and
    a plain delivery's settlement has seven replies (MULTI, five QUEUED, EXEC); with a timer
    each the worker delivers 0.874x the messages per CPU-second (bench/redis_fence.py
    --variant per-reply, median of 8 alternated rounds, redis-py 8.2.0).  The shared timer
    is pushed back (``socket_timeout`` from the latest reply) whenever less than half of it
    is left: a gap under half of ``socket_timeout`` never fails, one over it always does.
    """
    if not _READS_WITHOUT_TIMER:
        return [await _reply_or_error(connection.read_response()) for _ in range(count)]
    parser = hiredis_parser(connection)
    if parser is not None:
        return await _unless_moved(connection, await _parsed_replies(connection, parser, count))
    loop = asyncio.get_running_loop()
    limit = connection.socket_timeout
    replies: list[Any] = []
    async with asyncio.timeout(limit) as timer:
        for _ in range(count):
            replies.append(await _reply_or_error(connection.read_response(timeout=math.inf)))
            if limit is not None:
                now, deadline = loop.time(), timer.when()
                if deadline is not None and deadline - now < limit / 2:
                    timer.reschedule(now + limit)
    return replies


def hiredis_parser(connection: AbstractConnection) -> Any | None:
    """The connection's hiredis parser, when :func:`_parsed_replies` can read from it: that
    of redis-py 8.2 and later (``_reader``, a ``hiredis.Reader``; ``read_from_socket``;
    ``handle_push_response`` for RESP3's push replies, redis-py 8's default protocol)."""
    parser = getattr(connection, "_parser", None)
    return parser if type(parser) is _HIREDIS_PARSER else None


_HIREDIS_PARSER: type | None = getattr(_redis_hiredis, "_AsyncHiredisParser", None)
_NOT_ENOUGH_DATA: object = getattr(_redis_hiredis, "NOT_ENOUGH_DATA", False)


async def _parsed_replies(connection: AbstractConnection, parser: Any, count: int) -> list[Any]:
    """:func:`read_replies` straight from the hiredis reader: every reply already in the
    buffer at once, the socket read only when it has none.  ``read_response`` costs three
    coroutine calls and its checks per reply, and a plain delivery's settlement has seven
    (with ``read_response``, bench/redis_fence.py --variant read-response: 0.976x the
    worker's messages per CPU-second, median of 8 alternated rounds, redis-py 8.2.0).
    What redis-py does around a read is done here too: a failed read disconnects and
    raises redis-py's own ConnectionError or TimeoutError, an error reply stays in its
    place, push replies go to the parser's handler, and the next health check is due
    ``health_check_interval`` after the last reply."""
    loop = asyncio.get_running_loop()
    limit = connection.socket_timeout
    reader = parser._reader  # see hiredis_parser
    push = getattr(parser, "_hiredis_PushNotificationType", None)  # None: hiredis < 3.2
    replies: list[Any] = []
    answered = 0  # replies when the timer was last pushed back
    try:
        async with asyncio.timeout(limit) as timer:
            while True:
                while len(replies) < count:
                    reply = reader.gets()
                    if reply is _NOT_ENOUGH_DATA:
                        break
                    if isinstance(reply, RedisConnectionError):
                        raise reply
                    if push is not None and isinstance(reply, push):
                        await parser.handle_push_response(reply)  # not a reply: as redis-py
                        continue
                    replies.append(reply)
                if len(replies) == count:
                    break
                if limit is not None and len(replies) > answered:  # from the latest reply
                    answered = len(replies)
                    now, deadline = loop.time(), timer.when()
                    if deadline is not None and deadline - now < limit / 2:
                        timer.reschedule(now + limit)
                await parser.read_from_socket()
    except BaseException as exc:
        await connection.disconnect(nowait=True)  # half a batch read: not reusable
        translated = _as_read_error(exc, connection)
        if translated is exc:
            raise
        raise translated from exc
    if connection.health_check_interval:
        connection.next_health_check = loop.time() + connection.health_check_interval
    return replies


async def _unless_moved(connection: AbstractConnection, replies: list[Any]) -> list[Any]:
    """``replies``, unless one says this node no longer serves them (a failover moved the
    slot, or demoted a Sentinel's master: MOVED, READONLY, ...).  Then, as
    :meth:`SlotConnection.read_response` does for a reply it reads: the topology is marked
    stale, the connection dropped, and ConnectionError raised, so that the caller's next
    try goes to the new primary.  Read from the hiredis reader, these replies bypassed
    that, and a settler retried down the same connection to the old primary for ever."""
    for reply in replies:
        if isinstance(reply, ResponseError) and (
            isinstance(reply, MOVED_ERRORS) or str(reply).startswith(MOVED_REPLIES)
        ):
            topology: SlotRouter | None = getattr(connection, "topology", None)
            if topology is not None:
                topology.stale()
            await connection.disconnect()
            raise RedisConnectionError(f"{_where(connection)} moved ({reply})") from reply
    return replies


def _as_read_error(exc: BaseException, connection: AbstractConnection) -> BaseException:
    """What redis-py's ``read_response`` raises for ``exc``: its TimeoutError for the read's
    time running out, its ConnectionError for a socket error (the socket's own ETIMEDOUT
    included: a dead connection); anything else as it is."""
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return RedisTimeoutError(f"Timeout reading from {_where(connection)}")
    if isinstance(exc, OSError):
        return RedisConnectionError(f"Error while reading from {_where(connection)}: {exc}")
    return exc


def _where(connection: AbstractConnection) -> str:
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return f"{host}:{port}" if host is not None else "redis"


async def _reply_or_error(reply: Awaitable[Any]) -> Any:
    try:
        return await reply
    except ResponseError as exc:
        return exc


def _reads_without_timer(version: str) -> bool:
    """``read_response(timeout=math.inf)`` reads without a timer of its own from redis-py
    8.1, and from 8.2 it also raises a socket's own ETIMEDOUT as a lost connection; before
    8.2 that error came back as a None reply for any caller-given timeout."""
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return (major, minor) >= (8, 2)


_READS_WITHOUT_TIMER = _reads_without_timer(redis.__version__)


# Replies that say a cluster slot's primary is elsewhere now (or about to be); redis-py
# raises most of them as their own classes, whose text leaves the reply's first word out.
MOVED_REPLIES = ("MOVED", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "ASK")
MOVED_ERRORS = (MovedError, AskError, TryAgainError, ClusterDownError, ReadOnlyError)


class SlotRouter(Protocol):
    """Where a cluster slot is served (:class:`workers.streams.cluster.ClusterTopology`)."""

    async def primary_of(self, slot: int) -> tuple[str, int]: ...

    def stale(self) -> None: ...


class SlotConnection(Connection):
    """A connection to whichever primary serves ``slot`` when it connects (redis-py's
    ``_connect`` asks ``topology`` first).  A reply saying the slot lives elsewhere now,
    and a failed connect, mark the topology stale; the reply becomes a ConnectionError
    (the connection is dropped), which every role treats as "Redis away, try again"."""

    def __init__(self, *, topology: SlotRouter, slot: int, **options: Any) -> None:
        self.topology = topology
        self.slot = slot
        super().__init__(**options)

    async def _connect(self) -> None:
        self.host, self.port = await self.topology.primary_of(self.slot)
        try:
            await super()._connect()  # type: ignore[no-untyped-call]
        except (OSError, RedisError):
            self.topology.stale()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not isinstance(exc, MOVED_ERRORS) and not str(exc).startswith(MOVED_REPLIES):
                raise
            self.topology.stale()
            await self.disconnect()
            raise RedisConnectionError(f"slot {self.slot} moved ({exc})") from exc


class SlotSSLConnection(SlotConnection, SSLConnection):
    pass
