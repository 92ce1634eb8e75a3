"""Persistent SMTP connections to one relay (:class:`SmtpPool`), with transactions chained.

Connections are reused for the next message, replaced when broken or after
``messages_per_connection`` messages, closed when idle for ``idle_close`` seconds; at most
``size`` are open.  A send takes an idle connection, or opens one while fewer than ``size``
are open, or, to a relay that offers PIPELINING, *follows* the transaction of a connection
whose final dot is going out: its MAIL, RCPTs and DATA are written behind that dot, in the
same write when the send was already waiting (RFC 2920 section 3.1), and their replies come
back with the reply to the dot.  One round trip per message instead of two.

A follower reads its replies once the transaction ahead of it has its reply to the dot (its
*turn*; its ``--smtp-timeout`` starts then).  When that transaction leaves the connection
unfit (a 421, a timeout, the connection lost), nothing of the follower was sent but its
commands (no 354 came): it inherits the connection's slot and opens a new connection with
fresh budgets.  A follower whose group is void (refused at MAIL, or the connection ended
before that reply: :class:`workers.relay.TransactionResult`) goes out again unchained on the
same connection (or a new one in its slot) within what is left of its own ``--smtp-timeout``.
Neither waits for anyone else's place, so a send lasts at most one transaction's budgets
before its own starts, plus its own: ``--claim-after``'s derivation
(:meth:`workers.config.DeliveryConfig.longest_hold`).

``begin`` (the delivery loop's) is called once a send has a place, before anything of it is
written, and again before it goes out again; when it says no (the worker is stopping) the
send returns None: nothing of the message was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiosmtplib
import structlog

from workers import relay
from workers.codec.build import BuiltMessage
from workers.relay import (
    CONNECTION_ERRORS,
    Group,
    RelaySettings,
    Reply,
    SendResult,
    aiosmtplib_fence,
    begin_at_once,
    greet,
    pipeline_group,
    pipelined,
    pipelining,
)

log = structlog.get_logger("mailpool.relay")

Begin = Callable[[], bool]


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    uses: int = 0  # transactions given to it, the one in progress and a follower's included
    last_used: float = field(default_factory=time.monotonic)
    chain: pipelining.Chain | None = None  # while pipelined transactions run on it
    follower: _Follower | None = None  # written behind the transaction in progress
    closed: bool = False


@dataclass(eq=False, slots=True)
class _Follower:
    """A send whose group went out behind another transaction's dot on ``connection``."""

    connection: _Connection
    message: BuiltMessage
    group: Group
    result: SendResult
    # True: its turn on a fit connection.  False: the connection failed first, so its group
    # is void, and the connection's slot is the follower's now (to open another).
    # Cancelled: the follower is gone, and the connection goes once the one ahead is done.
    turn: asyncio.Future[bool]


@dataclass(eq=False, slots=True)
class _Waiting:
    """A send waiting for a place; resolved with a place, or None to look again."""

    message: BuiltMessage
    recipients: Sequence[str]
    begin: Begin
    place: asyncio.Future[_Place | None]


class _NotStarted:
    """``begin`` said no: nothing of the send was written."""


class _NewConnection:
    """A leader's place on a connection it opens (counted among the open ones)."""


NOT_STARTED = _NotStarted()
_NEW = _NewConnection()

# Where a send goes: lead a transaction on a connection (_NEW: one to open), follow one,
# a result without sending (nothing could go on a command line), or not at all.
_Place = _Connection | _NewConnection | _Follower | SendResult | _NotStarted


@dataclass(frozen=True, slots=True)
class _Again:
    """A follower to send again unchained: on ``place`` (the same connection, or _NEW: a
    slot of its own), within ``deadline`` (None: a budget of its own from now)."""

    place: _Connection | _NewConnection
    deadline: float | None


class _Link:
    """What the pool lends a transaction on ``connection`` (:class:`workers.relay.Link`)."""

    __slots__ = ("_connection", "_pool")

    def __init__(self, pool: SmtpPool, connection: _Connection) -> None:
        self._pool, self._connection = pool, connection

    def chain(self) -> pipelining.Chain:
        connection = self._connection
        if connection.chain is None:
            connection.chain = pipelining.Chain(connection.smtp)
        return connection.chain

    def dot_going_out(self) -> bytes:
        return self._pool.offer(self._connection)


class SmtpPool:
    """Persistent SMTP connections to one relay, at most ``size`` open at a time."""

    def __init__(
        self, settings: RelaySettings, *, size: int, messages_per_connection: int, idle_close: float
    ) -> None:
        self.settings = settings
        self.size = size
        self.messages_per_connection = messages_per_connection
        self.idle_close = idle_close
        self.chaining = True  # off once the relay refused a group behind a dot
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened (a QUIT in the background: not)
        # Connections whose transaction wrote its dot with nobody waiting: one may follow.
        self._followable: set[_Connection] = set()
        self._waiting: deque[_Waiting] = deque()
        # Built once: loading a CA file for every new connection would cost a file read.
        self._tls_context = (
            ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else None
        )
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # QUITs of retired connections

    async def send(
        self, message: BuiltMessage, recipients: Sequence[str], begin: Begin = begin_at_once
    ) -> SendResult | None:
        """One message, in bounded time (RFC 5321 section 4.5.3.2 timeouts): each reply of
        the relay before the final dot within ``timeout``, and all of that together (connect,
        greeting, EHLO, TLS, AUTH, MAIL, RCPTs, DATA, the message's transfer) within
        ``timeout`` too; the reply to the final dot within ``data_timeout``.  A follower's
        budgets start at its turn.  None when ``begin`` said no: nothing was sent."""
        self._start_reaper()
        place = await self._find_place(message, recipients, begin)
        if isinstance(place, _Follower):
            again = await self._follow(place)
            if isinstance(again, SendResult):
                return again
            if not begin():  # stopped meanwhile: nothing of the message went out
                self._give_back(again.place)
                return None
            return await self._lead(again.place, message, recipients, again.deadline)
        if isinstance(place, _NotStarted):
            return None
        if isinstance(place, SendResult):
            return place
        return await self._lead(place, message, recipients, None)

    # -- places ---------------------------------------------------------------------------

    async def _find_place(
        self, message: BuiltMessage, recipients: Sequence[str], begin: Begin
    ) -> _Place:
        woken = False
        while True:
            place = self._place(message, recipients, begin)
            if place is None:  # woken and beaten to it: first in line again
                place = await self._wait(message, recipients, begin, first=woken)
            if place is not None:
                return place
            woken = True

    def _place(
        self, message: BuiltMessage, recipients: Sequence[str], begin: Begin
    ) -> _Place | None:
        """A place at once (None: none free): an idle connection, else room for a new one,
        else behind a connection whose dot is out."""
        connection = self._idle_connection()
        if connection is not None:
            if not begin():
                self._give_back(connection)
                return NOT_STARTED
            return connection
        if self._open < self.size:
            if not begin():
                self._wake_one()  # the room it was maybe woken for
                return NOT_STARTED
            self._open += 1
            return _NEW
        while self._followable:
            connection = self._followable.pop()
            if self._may_follow(connection):
                place = self._attach(connection, message, recipients, begin, write=True)
                if not isinstance(place, _Follower):
                    self._followable.add(connection)  # still open to another
                return place
        return None

    async def _wait(
        self, message: BuiltMessage, recipients: Sequence[str], begin: Begin, *, first: bool
    ) -> _Place | None:
        waiting = _Waiting(message, recipients, begin, asyncio.get_running_loop().create_future())
        if first:
            self._waiting.appendleft(waiting)
        else:
            self._waiting.append(waiting)
        try:
            return await waiting.place
        except BaseException:  # cancelled (the stop): what it was given meanwhile goes on
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiting)
            if waiting.place.done() and not waiting.place.cancelled():
                place = waiting.place.result()
                if isinstance(place, _Follower):
                    self._abandon(place)
                elif place is None:
                    self._wake_one()  # the wake-up it did not use
            raise

    def _give_back(self, place: _Connection | _NewConnection) -> None:
        """A place taken and not used: the connection back to the idle ones, or the slot."""
        if isinstance(place, _Connection):
            self._release(place)
        else:
            self._open -= 1
            self._wake_one()

    def _abandon(self, follower: _Follower) -> None:
        """A follower cancelled: its group is out, so its connection goes, but only once
        the transaction ahead of it has its reply (dropping it sooner could lose that reply
        to a message the relay accepted, and the message would be sent again)."""
        turn = follower.turn
        if not turn.done():
            turn.cancel()  # _finish of the one ahead drops the connection
        elif not turn.cancelled() and turn.result():
            self._abort(follower.connection)  # its turn had come: the connection is its own
        elif not turn.cancelled():
            self._give_back(_NEW)  # the slot it inherited

    def _wake_one(self) -> None:
        """A connection went idle or a slot came free: the first waiting send looks again."""
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.place.done():
                waiting.place.set_result(None)
                return

    def offer(self, connection: _Connection) -> bytes:
        """As ``connection``'s transaction writes its dot: the first waiting send follows it
        (its group, to write with the dot), or the connection stays open to follow."""
        if not self._may_follow(connection):
            return b""
        while self._waiting:
            waiting = self._waiting.popleft()
            if waiting.place.done():  # cancelled
                continue
            place = self._attach(
                connection, waiting.message, waiting.recipients, waiting.begin, write=False
            )
            waiting.place.set_result(place)
            if isinstance(place, _Follower):
                return place.group.data
        self._followable.add(connection)
        return b""

    def _may_follow(self, connection: _Connection) -> bool:
        chain = connection.chain
        return (
            self.chaining and chain is not None and not chain.broken
            and connection.follower is None and not connection.closed
            and connection.uses < self.messages_per_connection
        )  # fmt: skip

    def _attach(
        self,
        connection: _Connection,
        message: BuiltMessage,
        recipients: Sequence[str],
        begin: Begin,
        *,
        write: bool,
    ) -> _Place:
        """A follower of ``connection``'s transaction; its group is written here when
        ``write`` (else with the dot)."""
        chain = connection.chain
        if chain is None:  # _may_follow checked: a bug
            raise RuntimeError("a follower placed on a connection without a chain")
        if not begin():
            return NOT_STARTED
        result = SendResult()
        group = pipeline_group(connection.smtp, message, recipients, result)
        if group is None:
            return result
        turn = asyncio.get_running_loop().create_future()
        follower = _Follower(connection, message, group, result, turn)
        connection.follower = follower
        connection.uses += 1
        if write:
            chain.transport.write(group.data)
        return follower

    # -- transactions ---------------------------------------------------------------------

    async def _lead(
        self,
        place: _Connection | _NewConnection,
        message: BuiltMessage,
        recipients: Sequence[str],
        deadline: float | None,
    ) -> SendResult:
        """A transaction of its own on a connection (_NEW: one it opens), everything before
        the dot by ``deadline`` (None: ``timeout`` from now)."""
        s = self.settings
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + s.timeout
        if isinstance(place, _Connection):
            connection = place
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await self._connect()
            except BaseException as exc:
                self._give_back(_NEW)
                if not isinstance(exc, CONNECTION_ERRORS):
                    raise  # cancelled
                # A 5xx here (to the greeting, EHLO, STARTTLS, AUTH) refuses the session,
                # not the message: a wrong password or a relay's policy, for the operator
                # to fix.  Dead-lettered, every queued message would go within seconds.
                reply = relay.session_refused(exc)
                result = SendResult()
                result.defer(recipients, reply)
                log.warning("relay_connect_failed", host=s.host, code=reply.code, error=reply.text)
                return result
        connection.uses += 1
        link = _Link(self, connection)
        try:
            done = await relay.transaction(
                connection.smtp, message, recipients, deadline, s.data_timeout, link
            )
        except BaseException:  # cancelled at shutdown: the connection is mid-transaction
            self._abort(connection)  # nothing unsent may still go out
            raise
        self._finish(connection, done.reusable)
        return done.result

    async def _follow(self, follower: _Follower) -> SendResult | _Again:
        """A follower's transaction, from its turn; _Again when nothing of it was sent and
        it must go out unchained (module docstring)."""
        connection = follower.connection
        try:
            if not await follower.turn:
                return _Again(_NEW, None)  # the failed connection's slot is its own
        except BaseException:  # cancelled: the turn with it, see _abandon
            self._abandon(follower)
            raise
        chain = connection.chain
        if chain is None:  # a fit connection hands its turn on with its chain
            raise RuntimeError("a follower's turn on a connection without its chain")
        deadline = asyncio.get_running_loop().time() + self.settings.timeout
        try:
            done = await pipelined(
                chain, follower.message, follower.group, follower.result, deadline,
                self.settings.data_timeout, lambda: self.offer(connection), behind_a_dot=True,
            )  # fmt: skip
        except BaseException:  # cancelled at shutdown: mid-transaction
            self._abort(connection)
            raise
        if done.void is None:
            self._finish(connection, done.reusable)
            return done.result
        if done.void.permanent:
            self._stop_chaining(done.void)
        if done.reusable and connection.smtp.is_connected and not connection.closed:
            return _Again(connection, deadline)  # after its RSET: the connection is its own
        self._abort(connection, keep_slot=True)
        return _Again(_NEW, deadline)

    def _stop_chaining(self, refusal: Reply) -> None:
        """A group behind a dot was refused at its MAIL for good (5xx): from now on no
        transaction follows another on this pool's connections.  A relay may refuse that
        (Haraka: 503 to each command pipelined after the end of DATA); a refusal of the
        sender itself only costs the rest of this process the saved round trip, and the
        send now goes out unchained and is decided by its own replies."""
        if self.chaining:
            self.chaining = False
            log.warning(
                "relay_refused_chained_transactions", host=self.settings.host,
                reply=f"{refusal.code or ''} {refusal.text}".strip()[:200],
                fallback="one transaction at a time per connection",
            )  # fmt: skip

    def _finish(self, connection: _Connection, fit: bool) -> None:
        """The transaction in progress is over: its follower's turn, or the connection back
        to the pool (or closed)."""
        if connection.closed:
            return
        connection.last_used = time.monotonic()
        self._followable.discard(connection)
        follower, connection.follower = connection.follower, None
        gone = follower is not None and follower.turn.cancelled()
        if not fit or gone or not connection.smtp.is_connected:
            self._abort(connection, follower)
            return
        if follower is not None:
            follower.turn.set_result(True)
            return
        if connection.chain is not None:
            connection.chain.end()
            connection.chain = None
        self._release(connection)

    def _release(self, connection: _Connection) -> None:
        """A connection nobody uses: idle in the pool, or retired (QUIT in the background)."""
        if connection.uses < self.messages_per_connection:
            self._idle.append(connection)
            self._wake_one()
        else:
            self._retire(connection)
            self._close_later(connection.smtp)

    def _abort(
        self, connection: _Connection, follower: _Follower | None = None, *, keep_slot: bool = False
    ) -> None:
        """Drop the connection at once (what is unsent must not go out).  Its follower's
        group is void, and the follower takes the connection's slot (``keep_slot``: the
        caller does)."""
        follower = follower or connection.follower
        connection.follower = None
        if connection.closed:
            return
        chain, connection.chain = connection.chain, None
        if chain is not None:
            chain.transport.abort()  # first: the buffer's rest must not go out
            chain.channel.connection_lost(None)  # whoever waits on it learns it ended
            chain.end()
        aiosmtplib_fence.abort(connection.smtp)
        self._followable.discard(connection)
        handed_on = follower is not None and not follower.turn.done()
        self._retire(connection, free_slot=not (handed_on or keep_slot))
        if follower is not None and handed_on:
            follower.turn.set_result(False)

    def _retire(self, connection: _Connection, *, free_slot: bool = True) -> None:
        connection.closed = True
        if free_slot:
            self._open -= 1
            self._wake_one()

    # -- connections ----------------------------------------------------------------------

    def _idle_connection(self) -> _Connection | None:
        """An open connection from the pool, or None."""
        while self._idle:
            connection = self._idle.pop()  # most recently used first: least likely timed out
            if connection.smtp.is_connected:
                return connection
            connection.smtp.close()
            self._retire(connection)
        return None

    async def _connect(self) -> _Connection:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host, port=s.port, local_hostname=s.local_hostname, timeout=s.timeout,
            use_tls=s.implicit_tls, start_tls=s.starttls, validate_certs=s.verify,
            tls_context=self._tls_context,
        )  # fmt: skip
        try:
            await smtp.connect()
            await greet(smtp)
            await relay.log_in(smtp, s)
        except BaseException:  # the send's time ran out (a cancellation) or the relay failed
            smtp.close()
            raise
        return _Connection(smtp)

    def _close_later(self, smtp: aiosmtplib.SMTP) -> None:
        task = asyncio.create_task(_close(smtp), name="smtp-quit")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle(), name="smtp-idle-reaper")

    async def _reap_idle(self) -> None:
        """Close connections idle longer than ``idle_close`` (relays drop them anyway)."""
        while True:
            await asyncio.sleep(max(self.idle_close / 2, 0.05))
            cutoff = time.monotonic() - self.idle_close
            stale = [c for c in self._idle if c.last_used < cutoff]
            self._idle = [c for c in self._idle if c.last_used >= cutoff]
            for connection in stale:
                self._retire(connection)
                await _close(connection.smtp)

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle, self._idle = self._idle, []
        for connection in idle:
            self._retire(connection)
        # QUIT on all at once: each waits up to a second for its reply.
        await asyncio.gather(
            *(_close(connection.smtp) for connection in idle), *list(self._closing),
            return_exceptions=True,
        )  # fmt: skip


async def _close(smtp: aiosmtplib.SMTP) -> None:
    """QUIT, waited for a second at most; a cancellation closes the connection and goes
    on (swallowed, it kept the idle reaper looping and ``aclose`` waiting on it)."""
    try:
        await asyncio.wait_for(smtp.quit(), timeout=1.0)
    except CONNECTION_ERRORS:
        smtp.close()
    except asyncio.CancelledError:
        smtp.close()
        raise
