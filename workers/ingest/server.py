"""The SMTP listener of ``mailpool ingest``: aiosmtpd sessions on the worker's own event loop.

:class:`IngestSMTP` is aiosmtpd's ``SMTP`` protocol with the operational behaviour an
internet-facing MTA needs and aiosmtpd leaves out: a per-connection time limit, a DATA
timeout that runs between received chunks instead of over the whole transfer, ``421`` on
time-outs and during shutdown, HTTP requests refused at once, enhanced status codes on
aiosmtpd's own refusals, and the worker's memory budget (:mod:`.memory`: ``452 4.3.1`` at
``MAIL FROM`` with a ``SIZE=`` that does not fit, or after the final dot of a message that
did not).  :class:`IngestServer` owns the listeners, caps concurrent connections per worker
and per client address (``421 4.7.0`` beyond) and drains sessions gracefully on stop.

Three hot-path replacements keep a transaction cheaper than in stock aiosmtpd (measured by
``bench/ingest.py``): DATA is read in chunks (:mod:`.data`), a session is built from tables
computed once per listener, and plain ``<a@b>`` paths skip the stdlib header parser.  What
this needs of aiosmtpd beyond its documented API is in :mod:`.aiosmtpd_fence`, with what
each use buys; this module uses aiosmtpd's documented API and the fence's names only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiosmtpd.smtp import AuthenticatorType, Envelope, syntax

from workers.codec.dsn import DsnError, DsnRequest, take_mail_parameters, take_rcpt_parameters
from workers.config import ConfigError, parse_host_port
from workers.ingest.aiosmtpd_fence import Command, FencedSMTP, SessionArguments
from workers.ingest.auth import take_auth_parameter
from workers.ingest.chunking import (
    REPLY_BDAT_SYNTAX,
    REPLY_DATA_AFTER_BDAT,
    BdatCommand,
    ChunkedMessage,
    parse_bdat,
    read_chunk,
)
from workers.ingest.data import DataRefusal, read_data
from workers.ingest.handler import IngestEnvelope
from workers.ingest.memory import (
    REPLY_NO_MEMORY,
    HeapTrimmer,
    MemoryBudget,
    Reservation,
    declared_size,
)
from workers.ingest.replies import with_enhanced_code
from workers.metrics import INGEST_CONNECTIONS, INGEST_MESSAGES, INGEST_REJECTED

log = structlog.get_logger("mailpool.ingest")
_T = TypeVar("_T")

IDENT = "ESMTP mailpool"
REPLY_SHUTTING_DOWN = "421 4.3.2 {host} Service shutting down, try again later"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Too many connections, try again later"
REPLY_TOO_MANY_FROM_CLIENT = (
    "421 4.7.0 {host} Too many connections from your address, try again later"
)
REPLY_TIMEOUT = "421 4.4.2 {host} Timeout exceeded, closing connection"
REPLY_SESSION_TOO_LONG = "421 4.4.2 {host} Session time limit exceeded, closing connection"
REPLY_HTTP = "521 5.7.0 {host} This is an SMTP server, not HTTP; closing connection"
# Seconds a closing session's last replies may wait to be read before it is cut off.
CLOSE_LINGER = 2.0
REPLY_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
# RFC 3207 section 4: what a server requiring TLS still takes before STARTTLS (aiosmtpd's
# set; HELO is not in it).
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
# Command lines beyond RFC 5321's 512 octets, once EHLO made the session extended: RFC 3461's
# parameters (RCPT: NOTIFY up to 30 and ORCPT up to 506 octets, so up to the reader's line
# limit of 1001; MAIL: RET 9, ENVID 106), and BDAT up to that limit too, so that any BDAT
# line reaches smtp_BDAT, which reads its chunk.
# MAIL also takes RFC 4954's AUTH=, up to 500 octets more, where AUTH is offered.
READER_LINE_LIMIT = 1001
LONGER_LINES = {"RCPT": READER_LINE_LIMIT - 512, "MAIL": 120, "BDAT": READER_LINE_LIMIT - 512}
AUTH_PARAMETER_OCTETS = 506  # " AUTH=" and 500 octets of xtext

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")  # in reply text: anything but printable ASCII

# An argument that opens a <path> and never closes it (RFC 5321 section 4.1.2): refused,
# where aiosmtpd's parser would take the rest of the line, parameters and all, as a quoted
# local part.
REPLY_BAD_SENDER_SYNTAX = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_RECIPIENT_SYNTAX = "501 5.1.3 Bad recipient address syntax"
REPLY_RCPT_AFTER_BDAT = "503 5.5.1 Error: RCPT after BDAT; RSET to start again"
REPLY_BDAT_NEEDS_EHLO = "503 5.5.1 Error: BDAT needs an EHLO session (CHUNKING)"
REPLY_NO_AUTH = "503 5.5.1 Error: authentication not enabled"

REPLY_TOO_BIG = "552 5.3.4 Message too big for this server"
REPLY_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
REPLIES_TO_REFUSED_DATA = {
    DataRefusal.TOO_BIG: REPLY_TOO_BIG,
    DataRefusal.LINE_TOO_LONG: REPLY_LINE_TOO_LONG,
    DataRefusal.NO_MEMORY: REPLY_NO_MEMORY,
}
# During shutdown, how often sessions that finished their transaction are told 421.
IDLE_SWEEP = 0.25
# After the grace period, sessions still storing a message get this long to finish the XADD.
STORE_FINISH = 5.0


@dataclass(frozen=True)
class SessionLimits:
    hostname: str
    max_size: int
    command_timeout: float
    connection_timeout: float
    require_tls: bool
    auth_required: bool


def client_of(peer: Any) -> str:
    """Whom the per-client cap counts: an IPv4 address, or the /64 of an IPv6 address
    (one site's network: a single host may have any number of addresses in it)."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        address = ipaddress.ip_address(str(host).partition("%")[0])
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class SessionRegistry:
    """Open sessions of one worker, per client, and whether it is shutting down.

    A session is admitted (and counted) in one step when its connection is made, so a burst
    of connections accepted together can never pass the caps between check and count.
    """

    def __init__(self, max_connections: int = 1000, max_per_client: int | None = None) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client or max_connections
        self.sessions: set[IngestSMTP] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self.stopping = False
        self.emptied = asyncio.Event()
        self.emptied.set()

    def admit(self, session: IngestSMTP) -> str | None:
        """Count ``session`` in; or the refusal (a reply template) when a cap is reached."""
        if len(self.sessions) >= self.max_connections:
            INGEST_REJECTED.labels("connections").inc()
            return REPLY_TOO_MANY_CONNECTIONS
        if self.per_client[session.client] >= self.max_per_client:
            INGEST_REJECTED.labels("connections_per_client").inc()
            return REPLY_TOO_MANY_FROM_CLIENT
        self.sessions.add(session)
        self.per_client[session.client] += 1
        self.emptied.clear()
        INGEST_CONNECTIONS.inc()
        return None

    def discard(self, session: IngestSMTP) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            self.per_client[session.client] -= 1
            if not self.per_client[session.client]:
                del self.per_client[session.client]
            INGEST_CONNECTIONS.dec()
        if not self.sessions:
            self.emptied.set()


@dataclass(frozen=True)
class SessionShared:
    """What every session of one listener shares, computed once instead of per connection."""

    smtp: SessionArguments
    limits: SessionLimits
    registry: SessionRegistry
    implicit_tls: bool
    budget: MemoryBudget
    trimmer: HeapTrimmer
    # --require-tls on a STARTTLS listener: checked by IngestSMTP.command_override, not by
    # aiosmtpd (whose 530 comes before any command runs: a BDAT's chunk would not be read).
    starttls_first: bool = False


class IngestSMTP(FencedSMTP):
    """One SMTP session (aiosmtpd protocol instance) with mailpool's session rules."""

    def __init__(self, shared: SessionShared) -> None:
        # First: aiosmtpd's constructor may create an envelope (see _create_envelope).
        self.budget = shared.budget
        self._reservation: Reservation | None = None
        self._chunks: ChunkedMessage | None = None  # a BDAT transfer under way
        super().__init__(shared.smtp)
        self.limits = shared.limits
        self.registry = shared.registry
        self.trimmer = shared.trimmer
        self.implicit_tls = shared.implicit_tls
        self.starttls_first = shared.starttls_first
        for command, octets in LONGER_LINES.items():
            self.lengthen_command_line(command, octets)
        self.auth_offered = shared.smtp.authenticator is not None
        # MAIL's parameters taken out before aiosmtpd's check: AUTH= where AUTH is offered.
        self._mail_parameters: Callable[[list[str]], tuple[DsnRequest, list[str]]]
        self._mail_parameters = take_mail_parameters
        if self.auth_offered:
            self.lengthen_command_line("MAIL", AUTH_PARAMETER_OCTETS)
            self._mail_parameters = self._mail_and_auth_parameters
        self.client = ""  # client_of(peer), known once the connection is made
        self._refused = False  # over a connection cap: told 421, never a session
        self._in_data = False
        self._storing = False
        self._session_timer: asyncio.TimerHandle | None = None

    # -- state ------------------------------------------------------------------------

    @property
    def is_tls(self) -> bool:
        # aiosmtpd sets the session's ssl once a STARTTLS handshake succeeded.
        return self.implicit_tls or (self.session is not None and self.session.ssl is not None)

    def transaction_open(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def _say_and_close(self, template: str) -> None:
        """Send a final reply outside the command loop (RFC 5321 section 3.8) and hang up:
        nothing the client sent after it is read.  A client that does not read its replies
        (they wait in our write buffer) is cut off CLOSE_LINGER seconds later: a graceful
        close waits for them to be read, and held its session slot and its share of the
        memory budget for ever."""
        transport = self.transport
        if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            return
        self.stop_reading()
        if template:
            transport.write(template.format(host=self.hostname).encode() + b"\r\n")
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(CLOSE_LINGER, transport.abort)

    # -- connection life cycle --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.first_connection_made()  # not the call STARTTLS makes again
        if first and not self._admitted(transport):
            return
        super().connection_made(transport)
        if first:
            self._session_timer = self.loop.call_later(
                self.limits.connection_timeout, self._session_expired
            )

    def _admitted(self, transport: asyncio.BaseTransport) -> bool:
        """Within the connection caps: counted in.  Else told 421 and hung up on."""
        self.client = client_of(transport.get_extra_info("peername"))
        refusal = self.registry.admit(self)
        if refusal is None:
            return True
        self._refused = True
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(refusal.format(host=self.hostname).encode() + b"\r\n")
        transport.close()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # aiosmtpd never saw this connection
        if self._session_timer is not None:
            self._session_timer.cancel()
        self.registry.discard(self)
        self._release_budget()
        self._end_transaction()
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # During DATA the command timeout restarts with every chunk received, like RFC 5321
        # section 4.5.3.2.5's data block timeout; the session limit still bounds a trickler.
        if self._in_data and not self._storing:
            self.restart_command_timer()
        super().data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._refused else self.end_of_input()

    # -- memory budget ----------------------------------------------------------------

    def _create_envelope(self) -> Any:
        # Every way a transaction ends makes a new envelope (reply to DATA, RSET, EHLO,
        # STARTTLS): what it held of the budget is given back here.
        self._release_budget()
        self._chunks = None
        self._end_transaction()
        return IngestEnvelope()

    def _end_transaction(self) -> None:
        envelope = getattr(self, "envelope", None)  # None before the first
        if isinstance(envelope, IngestEnvelope):
            envelope.end()

    def _release_budget(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def _transaction_reservation(self) -> Reservation:
        if self._reservation is None:
            self._reservation = self.budget.reservation(self.client)
        return self._reservation

    def command_timed_out(self) -> None:
        if self._storing:  # never cut a session off between XADD and its reply
            self.restart_command_timer()
            return
        INGEST_REJECTED.labels("timeout").inc()
        log.info("session_timeout", peer=self._peer_ip(), limit="command")
        self._say_and_close(REPLY_TIMEOUT)

    def _session_expired(self) -> None:
        if self._storing:
            self._session_timer = self.loop.call_later(1.0, self._session_expired)
            return
        INGEST_REJECTED.labels("timeout").inc()
        log.info("session_timeout", peer=self._peer_ip(), limit="connection")
        self._say_and_close(REPLY_SESSION_TOO_LONG)

    def _peer_ip(self) -> str:
        peer: Any = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)

    # -- shutdown ---------------------------------------------------------------------

    def close_if_idle(self) -> None:
        """During shutdown: a session between transactions is told 421 now."""
        if not (self._in_data or self._storing or self.transaction_open()):
            self._say_and_close(REPLY_SHUTTING_DOWN)

    def abort(self) -> None:
        """Grace period over: 421 and close, unless the message is being stored right now."""
        if not self._storing:
            self._say_and_close(REPLY_SHUTTING_DOWN)

    async def refuse_shutting_down(self, arg: str | None) -> None:
        self._say_and_close(REPLY_SHUTTING_DOWN)

    def command_override(self, name: str) -> Command | None:
        """While the worker stops, any command but QUIT outside a transaction gets 421.
        With --require-tls, any command but those RFC 3207 allows gets 530 before STARTTLS."""
        if self.registry.stopping and name != "QUIT" and not self.transaction_open():
            return self.refuse_shutting_down
        if self.starttls_first and not self.is_tls and name not in ALLOWED_BEFORE_STARTTLS:
            return functools.partial(self._refuse_before_starttls, name)
        return None

    async def _refuse_before_starttls(self, name: str, arg: str | None) -> None:
        if name == "BDAT" and not await self._drop_chunk(arg):
            return
        INGEST_REJECTED.labels("tls_required").inc()
        await self.push(REPLY_STARTTLS_FIRST)

    async def _drop_chunk(self, arg: str | None) -> bool:
        """Read and drop a refused BDAT's chunk; False when the session ended instead (a
        size that cannot be read, or the client hung up)."""
        command = await self._bdat_command(arg)
        return command is not None and await self._read_chunk(command.size, None)

    async def _bdat_command(self, arg: str | None) -> BdatCommand | None:
        """BDAT's size and LAST; None (refused and closed) when the size cannot be read:
        where the chunk's octets end is unknown, so nothing after it can be read."""
        command = parse_bdat(arg)
        if command is None:
            INGEST_REJECTED.labels("syntax").inc()
            await self.push(REPLY_BDAT_SYNTAX)
            self._say_and_close("")
        return command

    async def _read_chunk(self, size: int, into: ChunkedMessage | None) -> bool:
        """Read a chunk of ``size`` octets (kept in ``into``, or dropped); False, and the
        session closed, when the client hung up in the middle."""
        self._in_data = True
        try:
            complete = await read_chunk(self.stream_reader, size, into)
        finally:
            self._in_data = False
        if not complete:
            self._say_and_close("")
        return complete

    # -- replies ----------------------------------------------------------------------

    def outgoing_reply(self, status: str) -> str:
        """An enhanced status code on every reply but the greeting and the 250 lines
        answering HELO/EHLO (RFC 2034 section 3; :mod:`.replies`).  Reply text is printable
        ASCII (RFC 5321 section 4.2): what echoes the client's octets (aiosmtpd's 500 names
        the unknown command) gets "?" for NUL, CR, LF and the rest."""
        if not (status.isascii() and status.isprintable()):
            status = _UNPRINTABLE.sub("?", status)
        if self.replying_to is None and status.startswith("220"):
            return status
        if self.replying_to in ("EHLO", "HELO") and status.startswith("250"):
            return status
        return with_enhanced_code(status)

    # -- commands ---------------------------------------------------------------------

    def mail_refusal(self, mail_options: list[str]) -> str | None:
        """MAIL FROM with a ``SIZE=`` the budget has no room for now: RFC 1870's 452
        (checked, not reserved: see :mod:`.memory`)."""
        size = declared_size(mail_options)
        if not size or self.budget.has_room(size, self.client):
            return None
        INGEST_REJECTED.labels("memory").inc()
        log.info(
            "sender_deferred", peer=self._peer_ip(), size=size, code=452, reason="memory",
            budget_used=self.budget.used, budget=self.budget.capacity,
        )  # fmt: skip
        return REPLY_NO_MEMORY

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, with RFC 3461's ``RET`` and ``ENVID`` taken out of the parameters
        first (aiosmtpd refuses any it does not know, and upper-cases the rest), checked,
        and kept in the envelope once the sender is accepted."""
        envelope = self.envelope
        taken = await self._dsn_parameters("MAIL", arg, self._mail_parameters)
        if taken is None:
            return
        request, arg = taken
        if not isinstance(envelope, IngestEnvelope) or envelope.mail_from is not None:
            await super().smtp_MAIL(arg)  # a nested MAIL: aiosmtpd's 503
            return
        await super().smtp_MAIL(arg)
        if request is not None and envelope is self.envelope and self.transaction_open():
            envelope.dsn = request

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT, with RFC 3461's ``NOTIFY`` and ``ORCPT`` taken out first and
        kept for the recipient once accepted (the first time it is named)."""
        envelope = self.envelope
        if self._chunks is not None:  # the message is on its way: its recipients are set
            await self.push(REPLY_RCPT_AFTER_BDAT)
            return
        taken = await self._dsn_parameters("RCPT", arg, take_rcpt_parameters)
        if taken is None:
            return
        wanted, arg = taken
        count = len(envelope.rcpt_tos) if envelope is not None else 0
        await super().smtp_RCPT(arg)
        if isinstance(envelope, IngestEnvelope) and len(envelope.rcpt_tos) > count:
            recipient = envelope.rcpt_tos[-1]
            # Named before, with parameters or without: its first naming stands.
            if wanted and recipient not in envelope.rcpt_tos[:-1]:
                envelope.dsn.recipients[recipient] = wanted

    async def _refuse_path(self, command: str) -> None:
        """The 501 to a MAIL or RCPT whose argument opens a path it never closes."""
        if not await self.refused_before_helo_or_auth(command):
            INGEST_REJECTED.labels("syntax").inc()
            bad = REPLY_BAD_SENDER_SYNTAX if command == "MAIL" else REPLY_BAD_RECIPIENT_SYNTAX
            await self.push(bad)

    @staticmethod
    def _mail_and_auth_parameters(params: list[str]) -> tuple[DsnRequest, list[str]]:
        """RFC 3461's RET and ENVID, and RFC 4954's AUTH= (checked, then dropped: a
        client's claim of who submitted the message is not trusted)."""
        request, rest = take_mail_parameters(params)
        return request, take_auth_parameter(rest)

    async def _dsn_parameters(
        self, command: str, arg: str | None, take: Callable[[list[str]], tuple[_T, list[str]]]
    ) -> tuple[_T | None, str | None] | None:
        """(what ``take`` found, ``arg`` without it) for aiosmtpd to go on with; None when
        the path is not closed or a DSN parameter was refused (the 501 sent).  Before EHLO
        or AUTH, and in a HELO session (no parameters allowed), ``arg`` goes to aiosmtpd
        untouched but for that check."""
        session = self.session
        if arg is None or session is None or not session.extended_smtp:
            if arg is not None and "<" in arg and path_end(arg) is None:
                await self._refuse_path(command)
                return None
            return None, arg
        if await self.refused_before_helo_or_auth(command):
            return None
        end = path_end(arg)
        if end is None and "<" in arg:
            await self._refuse_path(command)
            return None
        path, params = (arg, []) if end is None else (arg[:end], arg[end:].split())
        try:
            found, rest = take(params)
        except DsnError as exc:
            INGEST_REJECTED.labels("dsn").inc()
            await self.push(exc.reply)
            return None
        return found, " ".join([path, *rest])

    @syntax("AUTH <mechanism>", when="auth_offered")
    async def smtp_AUTH(self, arg: str) -> None:
        """aiosmtpd's AUTH, which without credentials configured (AUTH never offered)
        would answer 538 "encryption required" as if TLS would help."""
        session = self.session
        if not self.auth_offered and session is not None and session.extended_smtp:
            await self.push(REPLY_NO_AUTH)
            return
        await super().smtp_AUTH(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA command with the chunked reader of :mod:`.data`."""
        if await self.refused_before_helo_or_auth("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if self._chunks is not None:
            await self.push(REPLY_DATA_AFTER_BDAT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            received = await read_data(
                self.stream_reader, self.data_size_limit, self._transaction_reservation()
            )
        finally:
            self._in_data = False
        if received is None:  # the client hung up in the middle
            self._say_and_close("")
            return
        size = received.size
        try:
            if received.refusal is not None:
                await self._refuse_data(received.refusal, size)
                return
            # The envelope holds the one copy of the message the handler reads.
            envelope.content = envelope.original_content = received.content
            del received
            await self.push(await self._stored(envelope))
        finally:
            self.trimmer.after_message(size)

    @syntax("BDAT chunk-size [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING (:mod:`.chunking`): the chunk is read whatever the reply."""
        command = await self._bdat_command(arg)
        if command is None:
            return
        envelope = self.envelope
        extended = self.session is not None and self.session.extended_smtp
        open_ = (
            extended and envelope is not None and envelope.mail_from is not None
            and bool(envelope.rcpt_tos)
        )  # fmt: skip
        if open_ and self._chunks is None:
            self._chunks = ChunkedMessage(self.data_size_limit, self._transaction_reservation())
        chunks = self._chunks if open_ else None
        if not await self._read_chunk(command.size, chunks):
            return
        if chunks is None or envelope is None:
            await self._refuse_bdat()
        elif chunks.refusal is not None:
            self.trimmer.after_message(chunks.size)
            await self._refuse_data(chunks.refusal, chunks.size)
        elif not command.last:
            await self.push(f"250 2.0.0 {command.size} octets received")
        else:
            await self._store_chunks(envelope, chunks)

    async def _refuse_bdat(self) -> None:
        """No transaction to add the chunk to (it was read and dropped): why not."""
        if await self.refused_before_helo_or_auth("BDAT"):
            return
        envelope = self.envelope
        if self.session is None or not self.session.extended_smtp:
            await self.push(REPLY_BDAT_NEEDS_EHLO)  # CHUNKING was never offered
        elif envelope is None or envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
        else:
            await self.push("503 5.5.1 Error: need RCPT command")

    async def _store_chunks(self, envelope: Envelope, chunks: ChunkedMessage) -> None:
        size = chunks.size
        try:
            envelope.content = envelope.original_content = chunks.content()
            self._chunks = None
            del chunks
            await self.push(await self._stored(envelope))
        finally:
            self.trimmer.after_message(size)

    async def _stored(self, envelope: Envelope) -> str:
        """The handler's reply to the message in ``envelope``; the command timer is held
        while it runs (see :meth:`command_timed_out`)."""
        self._storing = True
        try:
            reply: str = await self.event_handler.handle_DATA(self, self.session, envelope)
        finally:
            self._storing = False
            self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
        return reply

    async def _refuse_data(self, refusal: DataRefusal, size: int) -> None:
        envelope = self.envelope
        assert envelope is not None
        reply = REPLIES_TO_REFUSED_DATA[refusal]
        if refusal is DataRefusal.NO_MEMORY:
            INGEST_MESSAGES.labels("failed").inc()
            INGEST_REJECTED.labels("memory").inc()
            log.info(
                "message_deferred", peer=self._peer_ip(), size=size,
                recipients=len(envelope.rcpt_tos), code=452, reason="memory",
                budget_used=self.budget.used, budget=self.budget.capacity, stored="no",
            )  # fmt: skip
        else:
            INGEST_MESSAGES.labels("rejected").inc()
            log.info(
                "message_rejected", peer=self._peer_ip(), size=size,
                recipients=len(envelope.rcpt_tos), code=int(reply[:3]), reason=refusal.value,
            )  # fmt: skip
        self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
        await self.push(reply)

    async def _refuse_http(self, arg: str | None) -> None:
        INGEST_REJECTED.labels("http").inc()
        log.info("http_refused", peer=self._peer_ip())
        self._say_and_close(REPLY_HTTP)

    # An HTTP client that found our port (or an attacker trying cross-protocol tricks) gets
    # one refusal and a closed connection instead of five "command not recognized" rounds.
    smtp_GET = smtp_POST = smtp_HEAD = smtp_PUT = smtp_DELETE = _refuse_http
    smtp_OPTIONS = smtp_CONNECT = smtp_PATCH = smtp_TRACE = _refuse_http


def path_end(arg: str) -> int | None:
    """Index just past the ``>`` that closes MAIL's or RCPT's ``<path>`` (quoted strings and
    escapes in the local part skipped), after which its parameters come; None without one."""
    start = arg.find("<")
    if start < 0:
        return None
    close = arg.find(">", start)
    if close > 0 and '"' not in arg[start:close] and "\\" not in arg[start:close]:
        return close + 1  # the usual path: nothing quoted or escaped in it
    quoted, index = False, start + 1
    while index < len(arg):
        char = arg[index]
        if char == "\\":
            index += 1
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index + 1
        index += 1
    return None


def load_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """Server-side TLS context; a bad certificate or key is a start-up configuration error."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load {cert}, {key}: {exc}") from None
    return context


class IngestServer:
    """The listeners of one ingest worker and its open sessions."""

    def __init__(
        self,
        handler: Any,
        limits: SessionLimits,
        *,
        listen: str,
        tls_listen: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        authenticator: AuthenticatorType | None = None,
        max_connections: int = 1000,
        max_connections_per_client: int | None = None,
        memory_budget: int = 256 << 20,
        held_elsewhere: Callable[[], int] = lambda: 0,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.listen = listen
        self.tls_listen = tls_listen
        self.tls_context = tls_context
        self.authenticator = authenticator
        self.max_connections = max_connections
        self.registry = SessionRegistry(max_connections, max_connections_per_client)
        # One client holds at most the budget less one largest message: another sender's
        # always fits (but never less than one largest message).
        share = max(memory_budget - limits.max_size, min(limits.max_size, memory_budget))
        self.budget = MemoryBudget(memory_budget, held_elsewhere, client_share=share)
        self.trimmer = HeapTrimmer()
        self._servers: list[asyncio.Server] = []
        self.port = 0
        self.tls_port: int | None = None

    def _factory(self, implicit_tls: bool) -> Callable[[], asyncio.BaseProtocol]:
        limits = self.limits
        # On the implicit-TLS listener the socket is already encrypted: no STARTTLS.
        starttls = None if implicit_tls else self.tls_context
        smtp = SessionArguments(
            handler=self.handler,
            hostname=limits.hostname,
            ident=IDENT,
            data_size_limit=limits.max_size,
            timeout=limits.command_timeout,
            tls_context=starttls,
            require_starttls=False,  # IngestSMTP.command_override (starttls_first)
            auth_required=limits.auth_required,
            auth_require_tls=not implicit_tls,
            authenticator=self.authenticator,
        )
        shared = SessionShared(
            smtp=smtp,
            limits=limits,
            registry=self.registry,
            implicit_tls=implicit_tls,
            budget=self.budget,
            trimmer=self.trimmer,
            starttls_first=limits.require_tls and starttls is not None,
        )
        # The caps are applied when the connection is made (IngestSMTP._admitted), not
        # here: asyncio creates the protocols of a burst before any of them is counted.
        return lambda: IngestSMTP(shared)

    async def _bind(self, address: str, *, implicit_tls: bool) -> int:
        host, port = parse_host_port(address, "--tls-listen" if implicit_tls else "--listen")
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                self._factory(implicit_tls),
                host,
                port,
                ssl=self.tls_context if implicit_tls else None,
                backlog=max(128, self.max_connections),
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.port = await self._bind(self.listen, implicit_tls=False)
        if self.tls_listen:
            self.tls_port = await self._bind(self.tls_listen, implicit_tls=True)
        log.info("ingest_listening", port=self.port, tls_port=self.tls_port)

    def is_listening(self) -> bool:
        return bool(self._servers) and all(s.is_serving() for s in self._servers)

    async def _drain(self, grace: float) -> None:
        """Wait for sessions to end; those that finished their transaction get 421."""
        deadline = asyncio.get_running_loop().time() + grace
        while self.registry.sessions:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.emptied.wait(), min(left, IDLE_SWEEP))
            for session in list(self.registry.sessions):
                session.close_if_idle()

    async def stop(self, grace: float) -> None:
        """No new connections; sessions may finish their transaction within ``grace``."""
        for server in self._servers:
            server.close()
        self.registry.stopping = True
        for session in list(self.registry.sessions):
            session.close_if_idle()
        if self.registry.sessions:
            log.info("ingest_draining", sessions=len(self.registry.sessions), grace=grace)
            await self._drain(grace)
        for session in list(self.registry.sessions):
            session.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.emptied.wait(), STORE_FINISH)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        self.trimmer.cancel()
        log.info("ingest_stopped", sessions_left=len(self.registry.sessions))
