"""Transports of the delivery role: a pool of SMTP connections to a relay, or a maildir.

A transport takes one built message and the recipients still to send to, and answers per
recipient: accepted, rejected (permanent, 5xx) or deferred (transient: 4xx, connection
errors, timeouts).  It never raises for a relay's behaviour; the delivery loop turns the
answer into acks, retries and dead letters.

SMTP connections are persistent and pooled: reused for the next message, replaced when
broken or after ``messages_per_connection`` messages, closed when idle for ``idle_close``
seconds.  The transaction is driven command by command (MAIL, RCPT per recipient, DATA)
rather than with ``sendmail`` so that each recipient's own reply is known; what the
message's transfer uses of aiosmtplib beyond its documented API is in
:mod:`workers.relay.aiosmtplib_fence`.

The relay knows nothing of the command line: :class:`RelaySettings` is its own, and the
delivery role builds it (and the transport) from its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiosmtplib
import structlog

from workers.codec.build import BuiltMessage
from workers.relay import aiosmtplib_fence, pipelining

log = structlog.get_logger("mailpool.relay")


# Reply codes an SMTP server can give (RFC 5321 section 4.2: three digits, 2xx to 5xx).
SMTP_CODES = range(200, 600)


@dataclass(frozen=True)
class Reply:
    code: int | None  # None: no SMTP reply (connection error, timeout, unreadable reply)
    text: str

    @property
    def permanent(self) -> bool:
        return self.code is not None and 500 <= self.code < 600


def relay_reply(code: int, text: str) -> Reply:
    """A reply as the relay gave it.  A code that is no SMTP reply code is a local failure
    to read one: aiosmtplib reports a reply line too long or malformed with a code of its
    own (:func:`~workers.relay.aiosmtplib_fence.is_unreadable_reply`), and a relay may send
    digits outside 2xx-5xx.  Those have code None (a transient failure, like a timeout) and
    say what happened in the text."""
    if code in SMTP_CODES:
        return Reply(code, text)
    said = text if aiosmtplib_fence.is_unreadable_reply(code) else f"{code} {text}"
    return Reply(None, f"unreadable reply from the relay: {said}")


@dataclass
class SendResult:
    accepted: list[str] = field(default_factory=list)
    accepted_reply: Reply | None = None  # the reply to the end of DATA
    rejected: dict[str, Reply] = field(default_factory=dict)  # permanent: dead letter
    deferred: dict[str, Reply] = field(default_factory=dict)  # transient: retry later
    dsn_not_offered: bool = False  # the message asked for DSN; the relay does not offer it
    refused_at_rcpt: set[str] = field(default_factory=set)  # of rejected: refused at RCPT
    suppressed: dict[str, float] = field(default_factory=dict)  # not attempted: until when

    def refuse(self, recipients: Sequence[str], reply: Reply) -> None:
        target = self.rejected if reply.permanent else self.deferred
        for rcpt in recipients:
            target[rcpt] = reply


@dataclass(slots=True)  # not frozen: one per message (frozen __init__ costs 2x)
class TransactionResult:
    """What :func:`transaction` returns: the per-recipient result, and whether the
    connection may carry the next transaction (else it is closed)."""

    result: SendResult
    reusable: bool


class Transport(Protocol):
    async def send(self, message: BuiltMessage, recipients: Sequence[str]) -> SendResult: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int
    implicit_tls: bool  # smtps://
    starttls: bool | None  # None: when offered (auto), True: require, False: off
    verify: bool
    ca_file: str | None  # verify against these CAs instead of the system's
    username: str | None
    password: str | None = field(repr=False)  # never in a repr that reaches a log
    local_hostname: str
    timeout: float  # each reply before the final dot, and all of them together
    data_timeout: float  # the reply to the final dot


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    uses: int = 0
    last_used: float = field(default_factory=time.monotonic)


# Errors that mean the connection (not the message) failed: the recipients are deferred.
CONNECTION_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)


class SmtpPool:
    """Persistent SMTP connections to one relay, at most ``size`` open at a time."""

    def __init__(
        self, settings: RelaySettings, *, size: int, messages_per_connection: int, idle_close: float
    ) -> None:
        self.settings = settings
        self.messages_per_connection = messages_per_connection
        self.idle_close = idle_close
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)
        # Built once: loading a CA file for every new connection would cost a file read.
        self._tls_context = (
            ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else None
        )
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # QUITs of retired connections

    async def send(self, message: BuiltMessage, recipients: Sequence[str]) -> SendResult:
        """One message, in bounded time (RFC 5321 section 4.5.3.2 timeouts): each reply of
        the relay before the final dot within ``timeout``, and all of that together (connect,
        greeting, EHLO, TLS, AUTH, MAIL, RCPTs, DATA, the message's transfer) within
        ``timeout`` too; the reply to the final dot within ``data_timeout``.  So a send
        lasts at most ``timeout + data_timeout``, which ``--claim-after`` is derived from."""
        async with self._slots:
            self._start_reaper()
            deadline = asyncio.get_running_loop().time() + self.settings.timeout
            connection = self._idle_connection()
            if connection is None:  # a new one, within the send's budget
                try:
                    async with asyncio.timeout_at(deadline):
                        connection = await self._connect()
                except CONNECTION_ERRORS as exc:
                    result = SendResult()
                    result.refuse(recipients, _reply_of(exc))
                    log.warning("relay_connect_failed", host=self.settings.host, error=str(exc))
                    return result
            try:
                done = await transaction(
                    connection.smtp, message, recipients, deadline, self.settings.data_timeout
                )
            except BaseException:  # cancelled at shutdown: the connection is mid-transaction
                aiosmtplib_fence.abort(connection.smtp)  # nothing unsent may still go out
                raise
            self._release(connection, done.reusable)
            return done.result

    def _idle_connection(self) -> _Connection | None:
        """An open connection from the pool, or None: no timer needed for this one."""
        while self._idle:
            connection = self._idle.pop()  # most recently used first: least likely timed out
            if connection.smtp.is_connected:
                return connection
        return None

    async def _connect(self) -> _Connection:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host, port=s.port, local_hostname=s.local_hostname, timeout=s.timeout,
            use_tls=s.implicit_tls, start_tls=s.starttls, validate_certs=s.verify,
            tls_context=self._tls_context, username=s.username, password=s.password,
        )  # fmt: skip
        try:
            await smtp.connect()
            await greet(smtp)
        except BaseException:  # the send's time ran out (a cancellation) or the relay failed
            smtp.close()
            raise
        return _Connection(smtp)

    def _release(self, connection: _Connection, healthy: bool) -> None:
        """Back to the pool, or closed without delaying the send's outcome: the QUIT of a
        retired connection runs in the background, an unfit one is closed at once (after a
        timeout or an unreadable reply, a QUIT would only wait for a reply out of step)."""
        connection.uses += 1
        connection.last_used = time.monotonic()
        if healthy and connection.uses < self.messages_per_connection:
            self._idle.append(connection)
        elif healthy:
            self._close_later(connection.smtp)
        else:  # mid-transaction: what is unsent (a message given up on) must not go out
            aiosmtplib_fence.abort(connection.smtp)

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
                await _close(connection.smtp)

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle, self._idle = self._idle, []
        # QUIT on all at once: each waits up to a second for its reply.
        await asyncio.gather(
            *(_close(connection.smtp) for connection in idle), *list(self._closing)
        )


async def greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO (HELO when refused) right after connecting, if TLS or AUTH set-up has not
    already: the first MAIL's options depend on the extensions the relay offers."""
    if not smtp.is_ehlo_or_helo_needed:
        return
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


# What a send whose time before the final dot ran out says (asyncio's TimeoutError has no text).
SEND_TIMED_OUT = "TimeoutError: no final dot within --smtp-timeout (all replies before it)"


def _reply_of(exc: BaseException) -> Reply:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return relay_reply(aiosmtplib_fence.response_code(exc), exc.message)
    if isinstance(exc, TimeoutError) and not str(exc):
        return Reply(None, SEND_TIMED_OUT)
    return Reply(None, f"{type(exc).__name__}: {exc}")


def _mail_options(smtp: aiosmtplib.SMTP, message: BuiltMessage) -> list[bytes]:
    options = []
    if smtp.supports_extension("size"):
        options.append(b"SIZE=%d" % len(message.data))
    if message.smtputf8:
        options.append(b"SMTPUTF8")
    if message.eight_bit and smtp.supports_extension("8bitmime"):
        options.append(b"BODY=8BITMIME")
    if message.dsn_mail and smtp.supports_extension("dsn"):
        options.extend(param.encode() for param in message.dsn_mail)
    return options


def _rcpt_options(smtp: aiosmtplib.SMTP, message: BuiltMessage, rcpt: str) -> list[bytes]:
    params = message.dsn_rcpt.get(rcpt)
    if not params or not smtp.supports_extension("dsn"):
        return []
    return [param.encode() for param in params]


async def transaction(
    smtp: aiosmtplib.SMTP,
    message: BuiltMessage,
    recipients: Sequence[str],
    deadline: float,
    data_timeout: float,
) -> TransactionResult:
    """One MAIL/RCPT/DATA transaction: the result and whether the connection is fit.

    Everything up to the final dot runs by ``deadline`` (event loop time); the reply to the
    dot gets ``data_timeout`` of its own, from the moment the dot left.  Commands go through
    ``SMTP.execute_command`` with the addresses as the builder made them (already checked:
    no spaces, brackets or controls; aiosmtplib still refuses controls): ``SMTP.mail``/
    ``rcpt`` would parse each address again with the stdlib's ``parseaddr``, which costs
    the worker 9% of its messages per CPU-second (bench/relay_fence.py, ``commands``).
    """
    result = SendResult()
    if message.smtputf8 and not smtp.supports_extension("smtputf8"):
        # A property of the relay, not a passing fault: retrying would not help.
        result.rejected = dict.fromkeys(recipients, Reply(None, "relay does not offer SMTPUTF8"))
        return TransactionResult(result, reusable=True)
    # A relay without DSN gets none of the request; the delivered event says so.
    result.dsn_not_offered = message.asks_dsn and not smtp.supports_extension("dsn")
    if smtp.supports_extension("pipelining"):
        return await _pipelined(smtp, message, recipients, deadline, data_timeout, result)
    return await _one_by_one(smtp, message, recipients, deadline, data_timeout, result)


async def _one_by_one(  # noqa: PLR0917 - transaction's own arguments, passed on
    smtp: aiosmtplib.SMTP,
    message: BuiltMessage,
    recipients: Sequence[str],
    deadline: float,
    data_timeout: float,
    result: SendResult,
) -> TransactionResult:
    """:func:`transaction` one command per round trip (a relay without PIPELINING)."""
    encoding = "utf-8" if message.smtputf8 else "ascii"
    accepted: list[str] = []  # recipients the relay accepted in this transaction
    index = 0  # recipients[index:] have no answer of their own yet
    try:
        async with asyncio.timeout_at(deadline):
            sender = b"FROM:<" + message.mail_from.encode(encoding) + b">"
            reply = await smtp.execute_command(b"MAIL", sender, *_mail_options(smtp, message))
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, message.mail_from)
            for index, rcpt in enumerate(recipients):  # noqa: B007 - the except clauses read it
                try:
                    address = b"TO:<" + rcpt.encode(encoding) + b">"
                    options = _rcpt_options(smtp, message, rcpt)
                    reply = await smtp.execute_command(b"RCPT", address, *options)
                except ValueError as exc:  # an address aiosmtplib will not put on a command line
                    result.rejected[rcpt] = Reply(None, f"unsendable address: {exc}")
                    continue
                if reply.code in (250, 251):
                    accepted.append(rcpt)
                elif reply.code == 421:  # the relay is closing the connection: nobody else now
                    raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
                else:
                    result.refuse([rcpt], relay_reply(reply.code, reply.message))
                    result.refused_at_rcpt.add(rcpt)
            index = len(recipients)
            if not accepted:
                return TransactionResult(result, reusable=await _reset(smtp, deadline))
            await _send_data(smtp, message.data)
        reply = await _final_reply(smtp, data_timeout)
    except aiosmtplib.SMTPResponseException as exc:
        result.refuse(accepted + list(recipients[index:]), _reply_of(exc))
        code = aiosmtplib_fence.response_code(exc)
        fit = code in SMTP_CODES and code != 421 and smtp.is_connected
        return TransactionResult(result, reusable=fit and await _reset(smtp, deadline))
    except ValueError as exc:  # the sender: aiosmtplib will not put it on a command line
        result.rejected.update(dict.fromkeys(recipients, Reply(None, f"unsendable address: {exc}")))
        return TransactionResult(result, reusable=False)
    except CONNECTION_ERRORS as exc:
        # The connection failed: those accepted and those not yet asked are tried again.
        result.refuse(accepted + list(recipients[index:]), _reply_of(exc))
        return TransactionResult(result, reusable=False)
    return _ended(smtp, result, accepted, reply)


_CONTROLS = re.compile(rb"[\x00-\x1f\x7f]")


def _command(verb: bytes, path: bytes, options: list[bytes]) -> bytes:
    """One command line; ValueError for a control character in it (aiosmtplib's own check
    on the one-by-one path; the builder lets none through: a last guard)."""
    line = b" ".join([verb + path, *options])
    if _CONTROLS.search(line):
        raise ValueError("control character in a command")
    return line + b"\r\n"


async def _pipelined(  # noqa: PLR0917 - transaction's own arguments, passed on
    smtp: aiosmtplib.SMTP,
    message: BuiltMessage,
    recipients: Sequence[str],
    deadline: float,
    data_timeout: float,
    result: SendResult,
) -> TransactionResult:
    """:func:`transaction` for a relay that offers PIPELINING (RFC 2920): MAIL, every RCPT
    and DATA in one write, then their replies in order (:mod:`.pipelining`).  A transaction
    that ends before the message goes out ends with RSET, as one sent command by command."""
    encoding = "utf-8" if message.smtputf8 else "ascii"
    try:
        group = _command(b"MAIL FROM:", b"<" + message.mail_from.encode(encoding) + b">",
                         _mail_options(smtp, message))  # fmt: skip
    except ValueError as exc:  # a sender that cannot go on a command line
        result.rejected.update(dict.fromkeys(recipients, Reply(None, f"unsendable address: {exc}")))
        return TransactionResult(result, reusable=True)
    asked: list[str] = []  # recipients in the group, in order
    for rcpt in recipients:
        try:
            path = b"<" + rcpt.encode(encoding) + b">"
            group += _command(b"RCPT TO:", path, _rcpt_options(smtp, message, rcpt))
            asked.append(rcpt)
        except ValueError as exc:  # this one only: the others are sent
            result.rejected[rcpt] = Reply(None, f"unsendable address: {exc}")
    if not asked:
        return TransactionResult(result, reusable=True)
    channel = pipelining.ReplyChannel()
    accepted: list[str] = []
    answered = 0  # recipients in the group whose outcome is known
    channel.expire_at(deadline, TimeoutError)  # all replies before the dot: --smtp-timeout
    try:
        with aiosmtplib_fence.OwnReplies(smtp, channel) as transport:
            transport.write(group + b"DATA\r\n")
            mail = await channel.reply()
            if mail.code != 250:  # every recipient by MAIL's reply, whatever follows
                result.refuse(asked, relay_reply(mail.code, mail.message))
                answered = len(asked)
                fit = await _end_refused(transport, channel, mail, len(asked) + 1)
                return TransactionResult(result, reusable=fit)
            for rcpt in asked:
                reply = await channel.reply()
                if reply.code == 421:  # closing: nobody else now
                    raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
                answered += 1
                if reply.code in (250, 251):
                    accepted.append(rcpt)
                else:
                    result.refuse([rcpt], relay_reply(reply.code, reply.message))
                    result.refused_at_rcpt.add(rcpt)
            data = await channel.reply()
            if data.code != 354 or not accepted:
                result.refuse(accepted, relay_reply(data.code, data.message))
                accepted = []  # decided: a failure from here on is not theirs
                fit = await _end_refused(transport, channel, data, 0)
                return TransactionResult(result, reusable=fit)
            reply = await _transfer(transport, channel, message.data, data_timeout)
    except CONNECTION_ERRORS as exc:  # SMTPResponseException too: a reply not SMTP, a 421
        result.refuse(accepted + asked[answered:], _reply_of(exc))
        return TransactionResult(result, reusable=False)
    finally:
        channel.stop_timer()
    return _ended(smtp, result, accepted, reply)


async def _transfer(
    transport: asyncio.WriteTransport,
    channel: pipelining.ReplyChannel,
    data: bytes,
    data_timeout: float,
) -> aiosmtplib.SMTPResponse:
    """After DATA's 354: the message with its end mark, then the reply to the dot, which
    has a budget of its own from the moment the dot left (``data_timeout``)."""
    if channel.expired is not None:  # the replies came, but after the deadline: a send
        raise channel.expired  # reported as deferred must not write its message
    transport.write(dot_stuffed(data))
    await channel.drained()
    channel.expire_at(asyncio.get_running_loop().time() + data_timeout, _no_reply_to_the_dot)
    return await channel.reply()


def _no_reply_to_the_dot() -> aiosmtplib.SMTPReadTimeoutError:
    return aiosmtplib.SMTPReadTimeoutError("no reply to the final dot within --smtp-data-timeout")


async def _end_refused(
    transport: asyncio.WriteTransport,
    channel: pipelining.ReplyChannel,
    refusal: aiosmtplib.SMTPResponse,
    unread: int,
) -> bool:
    """After a refused MAIL or DATA: read the group's ``unread`` replies, then RSET; True
    when the connection may carry the next transaction (RSET answered 250).  A 421, a 354
    (the relay waits for a message we will not send: closing the connection drops it) or
    any failure here: not fit, and the pool closes the connection."""
    if refusal.code in (354, 421):
        return False
    try:
        for _ in range(unread):
            if (await channel.reply()).code in (354, 421):
                return False
        transport.write(b"RSET\r\n")
        reset = await channel.reply()
    except CONNECTION_ERRORS:  # (a time-out of the send's budget ends the whole send)
        return False
    return reset.code == 250 and channel.lost is None


def _ended(
    smtp: aiosmtplib.SMTP, result: SendResult, accepted: list[str], reply: aiosmtplib.SMTPResponse
) -> TransactionResult:
    """The outcome of the reply to the final dot.  Whatever it says, the transaction is over
    (RFC 5321 section 4.1.1.4): the connection needs no RSET to be used again."""
    if reply.code != 250:
        result.refuse(accepted, relay_reply(reply.code, reply.message))
        fit = reply.code in SMTP_CODES and reply.code != 421 and smtp.is_connected
        return TransactionResult(result, reusable=fit)
    result.accepted = accepted
    result.accepted_reply = Reply(reply.code, reply.message)
    return TransactionResult(result, reusable=True)


async def _send_data(smtp: aiosmtplib.SMTP, data: bytes) -> None:
    """DATA, then the dot-stuffed message and its end mark, until the last of it has gone
    out (a slow reader of a big message: the transfer is part of the command budget).

    Not ``SMTP.data``, which would rewrite every line end and dot-stuff with regular
    expressions (the fence module says what that costs): the builder's output has CRLF line
    ends only (its tests check that), so stuffing is one ``bytes.replace``.
    """
    reply = await smtp.execute_command(b"DATA")
    if reply.code != 354:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    await aiosmtplib_fence.write_message(smtp, dot_stuffed(data))


async def _final_reply(smtp: aiosmtplib.SMTP, wait: float) -> aiosmtplib.SMTPResponse:
    """The reply to the final dot, waited for ``wait`` seconds (RFC 5321 section 4.5.3.2.6:
    the relay may be scanning the message; giving up early means sending it twice)."""
    try:
        return await aiosmtplib_fence.read_reply(smtp, wait)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()  # a reply we gave up on must not be read as the next command's
        raise


def dot_stuffed(data: bytes) -> bytes:
    """The DATA payload of CRLF-terminated message lines (RFC 5321 4.5.2 and 4.1.1.4):
    a line that starts with "." gets another one; the end mark follows."""
    if data[:1] == b".":
        data = b"." + data
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


async def _reset(smtp: aiosmtplib.SMTP, deadline: float) -> bool:
    """RSET after a transaction refused before its end, within the send's time; False when
    the connection is no longer usable."""
    try:
        async with asyncio.timeout_at(deadline):
            await smtp.rset()
    except CONNECTION_ERRORS:
        return False
    return True


async def _close(smtp: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(smtp.quit(), timeout=1.0)
    except (*CONNECTION_ERRORS, asyncio.CancelledError):
        smtp.close()


class MaildirTransport:
    """Local delivery into a maildir (``maildir:PATH``): one file per message, tmp -> new.

    The file is written and fsynced in ``tmp/`` and renamed into ``new/`` (atomic on one
    file system), so a reader never sees half a message.  Every recipient is accepted; the
    envelope goes into ``Return-Path`` and ``X-Original-To`` fields at the top.
    """

    def __init__(self, path: str) -> None:
        """Creates the maildir itself (OSError when it cannot), not its parent."""
        self.root = Path(path)
        for folder in (self.root, self.root / "tmp", self.root / "new", self.root / "cur"):
            folder.mkdir(exist_ok=True)

    async def send(self, message: BuiltMessage, recipients: Sequence[str]) -> SendResult:
        try:
            name = await asyncio.to_thread(self._write, message, recipients)
        except OSError as exc:
            result = SendResult()
            result.refuse(recipients, Reply(None, f"maildir write failed: {exc}"))
            return result
        return SendResult(
            accepted=list(recipients),
            accepted_reply=Reply(250, f"maildir {name}"),
            dsn_not_offered=message.asks_dsn,  # a maildir sends no notifications
        )

    def _write(self, message: BuiltMessage, recipients: Sequence[str]) -> str:
        trace = f"Return-Path: <{message.mail_from}>\nX-Original-To: {', '.join(recipients)}\n"
        body = trace.encode() + message.data.replace(b"\r\n", b"\n")
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.{socket.gethostname()}"
        tmp, new = self.root / "tmp" / name, self.root / "new" / name
        with open(tmp, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, new)
        return name

    async def aclose(self) -> None:
        return None
