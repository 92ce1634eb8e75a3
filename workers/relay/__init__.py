"""Transports of the delivery role: a pool of SMTP connections to a relay, or a maildir.

A transport takes one built message and the recipients still to send to, and answers per
recipient: accepted, rejected (permanent, 5xx) or deferred (transient: 4xx, connection
errors, timeouts).  It never raises for a relay's behaviour; the delivery loop turns the
answer into acks, retries and dead letters.

SMTP connections are persistent and pooled (:mod:`workers.relay.pool`, on top of this
module): reused for the next message, replaced when broken or after
``messages_per_connection`` messages, closed when idle for ``idle_close`` seconds, and to a
relay that offers PIPELINING one send may go out behind another's final dot.  The
transaction is driven command by command (MAIL, RCPT per recipient, DATA)
rather than with ``sendmail`` so that each recipient's own reply is known; what the
message's transfer uses of aiosmtplib beyond its documented API is in
:mod:`workers.relay.aiosmtplib_fence`.

The relay knows nothing of the command line: :class:`RelaySettings` is its own, and the
delivery role builds it (and the transport) from its config.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiosmtplib
import structlog

from workers.codec.build import BuiltMessage
from workers.codec.encode import utf8_text
from workers.relay import aiosmtplib_fence, pipelining

log = structlog.get_logger("mailpool.relay")


# Reply codes an SMTP server can give (RFC 5321 section 4.2: three digits, 2xx to 5xx).
SMTP_CODES = range(200, 600)


@dataclass(frozen=True)
class Reply:
    code: int | None  # None: no SMTP reply (connection error, timeout, unreadable reply)
    text: str  # valid UTF-8 always: it goes into events, dead letters and the log

    def __post_init__(self) -> None:
        # Reply lines are decoded with surrogateescape (aiosmtplib, ReplyChannel): a
        # relay's octet that is not UTF-8 (a Latin-1 "ç") became a lone surrogate, which
        # hiredis cannot pack: the settler stopped the worker, and the messages the relay
        # had taken were sent again after the claim.
        if not self.text.isascii():
            object.__setattr__(self, "text", utf8_text(self.text))

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

    def defer(self, recipients: Sequence[str], reply: Reply) -> None:
        """Retry later whatever the reply's code: a refusal of the session, not the message."""
        for rcpt in recipients:
            self.deferred[rcpt] = reply


@dataclass(slots=True)  # not frozen: one per message (frozen __init__ costs 2x)
class TransactionResult:
    """What :func:`transaction` returns: the per-recipient result, and whether the
    connection may carry the next transaction (else it is closed).

    ``void``: a group written behind another transaction's dot was refused at its MAIL, or
    the connection ended before that reply (not: its own time ran out).  Some relays
    refuse every command pipelined after the end of DATA (Haraka: 503, against SMTP
    smuggling), so the refusal may be of where the group went and not of the message:
    nothing is decided, and ``result`` is not the outcome.  The pool sends it again,
    unchained.
    """

    result: SendResult
    reusable: bool
    void: Reply | None = None


def begin_at_once() -> bool:
    """A send's ``begin`` when nothing needs to know that it starts."""
    return True


class Transport(Protocol):
    async def send(
        self, message: BuiltMessage, recipients: Sequence[str], begin: Callable[[], bool] = ...
    ) -> SendResult | None:
        """The outcome per recipient; None when ``begin`` (called once the send may start,
        before anything of it goes out, and again before it goes out again after a try
        that went nowhere) said no: nothing of the message was sent."""
        ...

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


# Errors that mean the connection (not the message) failed: the recipients are deferred.
CONNECTION_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)


class CredentialsNotSentInClear(aiosmtplib.SMTPException):
    """The relay did not encrypt the session: its credentials are not sent."""

    def __init__(self) -> None:
        super().__init__(
            "the relay offered no STARTTLS: the relay credentials are not sent unencrypted "
            "(--starttls off allows it)"
        )


async def log_in(smtp: aiosmtplib.SMTP, settings: RelaySettings) -> None:
    """AUTH with the relay's credentials, over TLS only, unless ``--starttls off`` asked
    for a session in clear: someone in the middle who strips STARTTLS from the relay's
    EHLO would otherwise be sent the password.  Over TLS whose certificate is not verified
    (``--starttls opportunistic``, ``--no-tls-verify``) they go to whoever answered the
    handshake: the operator's choice, which the worker logs at start."""
    if settings.username is None:
        return
    encrypted = smtp.get_transport_info("sslcontext") is not None
    if not encrypted and settings.starttls is not False:
        raise CredentialsNotSentInClear()
    await smtp.login(settings.username, settings.password or "")


# What a new connection that was not ready in time says (asyncio's TimeoutError has no text).
SESSION_TIMED_OUT = (
    "TimeoutError: no session with the relay within --smtp-timeout "
    "(connect, greeting, EHLO, STARTTLS, AUTH)"
)


def session_refused(exc: BaseException) -> Reply:
    """Why a new connection failed, as the recipients' reply."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return Reply(None, SESSION_TIMED_OUT)
    return reply_of(exc)


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


def reply_of(exc: BaseException) -> Reply:
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


class Link(Protocol):
    """What a transaction on a pooled connection asks of the pool."""

    def chain(self) -> pipelining.Chain:
        """The connection's chain of pipelined transactions (started if there is none)."""
        ...

    def dot_going_out(self) -> bytes:
        """Called as the final dot is written: the group of a send that follows on this
        connection, written with the dot (RFC 2920 section 3.1), or b"" when none does."""
        ...


def _nothing_follows() -> bytes:
    return b""


async def transaction(  # noqa: PLR0917 - the transaction's budgets, and the pool's link
    smtp: aiosmtplib.SMTP,
    message: BuiltMessage,
    recipients: Sequence[str],
    deadline: float,
    data_timeout: float,
    link: Link | None = None,
) -> TransactionResult:
    """One MAIL/RCPT/DATA transaction: the result and whether the connection is fit.

    Everything up to the final dot runs by ``deadline`` (event loop time); the reply to the
    dot gets ``data_timeout`` of its own, from the moment the dot left.  Commands go through
    ``SMTP.execute_command`` with the addresses as the builder made them (already checked:
    no spaces, brackets or controls; aiosmtplib still refuses controls): ``SMTP.mail``/
    ``rcpt`` would parse each address again with the stdlib's ``parseaddr``, which costs
    the worker 9% of its messages per CPU-second (bench/relay_fence.py, ``commands``).

    ``link``: the pool's, for a pooled connection; its chain carries the transaction when
    the relay offers PIPELINING, and another send's group may go out with the final dot.
    """
    result = SendResult()
    if not smtp.supports_extension("pipelining"):
        if not _relay_can_take(smtp, message, recipients, result):
            return TransactionResult(result, reusable=True)
        return await _one_by_one(smtp, message, recipients, deadline, data_timeout, result)
    group = pipeline_group(smtp, message, recipients, result)
    if group is None:
        return TransactionResult(result, reusable=True)
    try:
        chain = pipelining.Chain(smtp) if link is None else link.chain()
    except CONNECTION_ERRORS as exc:
        result.refuse(group.asked, reply_of(exc))
        return TransactionResult(result, reusable=False)
    chain.transport.write(group.data)
    follow = _nothing_follows if link is None else link.dot_going_out
    try:
        return await pipelined(chain, message, group, result, deadline, data_timeout, follow)
    finally:
        if link is None:
            chain.end()


def _relay_can_take(
    smtp: aiosmtplib.SMTP, message: BuiltMessage, recipients: Sequence[str], result: SendResult
) -> bool:
    """False (and every recipient rejected) for a message this relay cannot take at all."""
    if message.smtputf8 and not smtp.supports_extension("smtputf8"):
        # A property of the relay, not a passing fault: retrying would not help.
        result.rejected = dict.fromkeys(recipients, Reply(None, "relay does not offer SMTPUTF8"))
        return False
    # A relay without DSN gets none of the request; the delivered event says so.
    result.dsn_not_offered = message.asks_dsn and not smtp.supports_extension("dsn")
    return True


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
            if not _positive(reply.code):
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, message.mail_from)
            for index, rcpt in enumerate(recipients):  # noqa: B007 - the except clauses read it
                try:
                    address = b"TO:<" + rcpt.encode(encoding) + b">"
                    options = _rcpt_options(smtp, message, rcpt)
                    reply = await smtp.execute_command(b"RCPT", address, *options)
                except ValueError as exc:  # an address aiosmtplib will not put on a command line
                    result.rejected[rcpt] = Reply(None, f"unsendable address: {exc}")
                    continue
                if _positive(reply.code):
                    accepted.append(rcpt)
                elif reply.code == 421:  # the relay is closing the connection: nobody else now
                    raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
                else:
                    result.refuse([rcpt], relay_reply(reply.code, reply.message))
                    result.refused_at_rcpt.add(rcpt)
            index = len(recipients)
            if not accepted:
                return TransactionResult(result, reusable=await _reset(smtp, deadline))
            chain = await _send_data(smtp, message.data)
        reply = await _final_reply(smtp, chain, data_timeout)
    except aiosmtplib.SMTPResponseException as exc:
        result.refuse(accepted + list(recipients[index:]), reply_of(exc))
        fit = _leaves_fit(aiosmtplib_fence.response_code(exc)) and smtp.is_connected
        return TransactionResult(result, reusable=fit and await _reset(smtp, deadline))
    except ValueError as exc:  # the sender: aiosmtplib will not put it on a command line
        result.rejected.update(dict.fromkeys(recipients, Reply(None, f"unsendable address: {exc}")))
        return TransactionResult(result, reusable=False)
    except CONNECTION_ERRORS as exc:
        # The connection failed: those accepted and those not yet asked are tried again.
        result.refuse(accepted + list(recipients[index:]), reply_of(exc))
        return TransactionResult(result, reusable=False)
    return _ended(result, accepted, reply, _leaves_fit(reply.code) and smtp.is_connected)


_CONTROLS = re.compile(rb"[\x00-\x1f\x7f]")


def _command(verb: bytes, path: bytes, options: list[bytes]) -> bytes:
    """One command line; ValueError for a control character in it (aiosmtplib's own check
    on the one-by-one path; the builder lets none through: a last guard)."""
    line = b" ".join([verb + path, *options])
    if _CONTROLS.search(line):
        raise ValueError("control character in a command")
    return line + b"\r\n"


@dataclass(slots=True)
class Group:
    """A pipelined transaction's first write (RFC 2920): MAIL, each RCPT and DATA."""

    data: bytes
    asked: list[str]  # the recipients in it, in order


def pipeline_group(
    smtp: aiosmtplib.SMTP, message: BuiltMessage, recipients: Sequence[str], result: SendResult
) -> Group | None:
    """The group for a relay that offers PIPELINING, or None when nothing can go out: the
    relay cannot take the message, or no address can go on a command line (``result``
    says so)."""
    if not _relay_can_take(smtp, message, recipients, result):
        return None
    encoding = "utf-8" if message.smtputf8 else "ascii"
    try:
        data = _command(b"MAIL FROM:", b"<" + message.mail_from.encode(encoding) + b">",
                        _mail_options(smtp, message))  # fmt: skip
    except ValueError as exc:  # a sender that cannot go on a command line
        result.rejected.update(dict.fromkeys(recipients, Reply(None, f"unsendable address: {exc}")))
        return None
    asked: list[str] = []
    for rcpt in recipients:
        try:
            path = b"<" + rcpt.encode(encoding) + b">"
            data += _command(b"RCPT TO:", path, _rcpt_options(smtp, message, rcpt))
            asked.append(rcpt)
        except ValueError as exc:  # this one only: the others are sent
            result.rejected[rcpt] = Reply(None, f"unsendable address: {exc}")
    return Group(data + b"DATA\r\n", asked) if asked else None


async def pipelined(  # noqa: PLR0917 - a transaction's parts and budgets
    chain: pipelining.Chain,
    message: BuiltMessage,
    group: Group,
    result: SendResult,
    deadline: float,
    data_timeout: float,
    follow: Callable[[], bytes],
    *,
    behind_a_dot: bool = False,
) -> TransactionResult:
    """The replies to a group written on ``chain`` (RFC 2920), read in order once it is
    this transaction's turn; then the message, with whatever ``follow`` gives written
    behind its dot.  A transaction that ends before the message goes out ends with RSET,
    as one sent command by command.  ``behind_a_dot``: the group went out behind another
    transaction's dot; a refusal of its MAIL voids it (:class:`TransactionResult`)."""
    channel, transport, asked = chain.channel, chain.transport, group.asked
    accepted: list[str] = []
    answered = 0  # recipients in the group whose outcome is known
    mail: aiosmtplib.SMTPResponse | None = None
    channel.expire_at(deadline, TimeoutError)  # all replies before the dot: --smtp-timeout
    try:
        mail = await channel.reply()
        if not _positive(mail.code):  # the group's other replies, then RSET
            fit = await _end_refused(transport, channel, mail, len(asked) + 1)
            refused = relay_reply(mail.code, mail.message)
            if behind_a_dot:
                return TransactionResult(result, reusable=fit, void=refused)
            result.refuse(asked, refused)  # every recipient by MAIL's reply
            return TransactionResult(result, reusable=fit)
        for rcpt in asked:
            reply = await channel.reply()
            if reply.code == 421:  # closing: nobody else now
                raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
            answered += 1
            if _positive(reply.code):
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
        reply = await _transfer(chain, message.data, data_timeout, follow)
    except CONNECTION_ERRORS as exc:  # SMTPResponseException too: a reply not SMTP, a 421
        if behind_a_dot and mail is None and channel.expired is None:  # not its own time
            return TransactionResult(result, reusable=False, void=reply_of(exc))
        result.refuse(accepted + asked[answered:], reply_of(exc))
        return TransactionResult(result, reusable=False)
    finally:
        channel.stop_timer()
    return _ended(result, accepted, reply, _leaves_fit(reply.code) and not chain.broken)


async def _transfer(
    chain: pipelining.Chain, data: bytes, data_timeout: float, follow: Callable[[], bytes]
) -> aiosmtplib.SMTPResponse:
    """After DATA's 354: the message with its end mark (and the group of the transaction
    that follows, if any), then the reply to the dot, which has a budget of its own from
    the moment the dot left (``data_timeout``)."""
    channel = chain.channel
    if channel.expired is not None:  # the replies came, but after the deadline: a send
        raise channel.expired  # reported as deferred must not write its message
    chain.transport.write(dot_stuffed(data) + follow())
    await channel.drained()
    return await _reply_to_the_dot(channel, data_timeout)


async def _reply_to_the_dot(
    channel: pipelining.ReplyChannel, wait: float
) -> aiosmtplib.SMTPResponse:
    """The reply to the final dot, with a budget of ``wait`` seconds from now (the dot has
    just left), on either path."""
    channel.expire_at(asyncio.get_running_loop().time() + wait, _no_reply_to_the_dot)
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
    return _positive(reset.code) and channel.lost is None


def _positive(code: int) -> bool:
    """A 2yz reply: the command was done (RFC 5321 section 4.2.1).  250 is what section
    4.3.2 lists for MAIL, RCPT (with 251) and the final dot, but a relay's 251 or 252 to the
    dot still means it took the message: read as a refusal, the message was sent again."""
    return 200 <= code < 300


def _leaves_fit(code: int) -> bool:
    """Whether a reply leaves the connection fit for the next transaction: an SMTP reply
    and not a 421 (the relay is closing it)."""
    return code in SMTP_CODES and code != 421


def _ended(
    result: SendResult, accepted: list[str], reply: aiosmtplib.SMTPResponse, fit: bool
) -> TransactionResult:
    """The outcome of the reply to the final dot.  Whatever it says, the transaction is over
    (RFC 5321 section 4.1.1.4): the connection needs no RSET to be used again, and is fit
    for the next one unless the reply was not SMTP or a 421, or the connection ended."""
    if not _positive(reply.code):
        result.refuse(accepted, relay_reply(reply.code, reply.message))
        return TransactionResult(result, reusable=fit)
    result.accepted = accepted
    result.accepted_reply = Reply(reply.code, reply.message)
    return TransactionResult(result, reusable=fit)


async def _send_data(smtp: aiosmtplib.SMTP, data: bytes) -> pipelining.Chain:
    """DATA, then the dot-stuffed message and its end mark, until the last of it has gone
    out (a slow reader of a big message: the transfer is part of the command budget).

    Not ``SMTP.data``, which would rewrite every line end and dot-stuff with regular
    expressions (the fence module says what that costs): the builder's output has CRLF line
    ends only (its tests check that), so stuffing is one ``bytes.replace``.

    From the 354 on, the connection is read by a channel of our own, as on the pipelined
    path, until :func:`_final_reply` ends it: its time limit looks at the socket once more
    before it counts (pipelining.ReplyChannel), where aiosmtplib's timeout dropped a reply
    that came while the worker's process was stopped past it.
    """
    reply = await smtp.execute_command(b"DATA")
    if reply.code != 354:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    chain = pipelining.Chain(smtp)
    try:
        chain.transport.write(dot_stuffed(data))
        await chain.channel.drained()
    except BaseException:
        chain.end()
        raise
    return chain


async def _final_reply(
    smtp: aiosmtplib.SMTP, chain: pipelining.Chain, wait: float
) -> aiosmtplib.SMTPResponse:
    """The reply to the final dot, waited for ``wait`` seconds (RFC 5321 section 4.5.3.2.6:
    the relay may be scanning the message; giving up early means sending it twice)."""
    try:
        return await _reply_to_the_dot(chain.channel, wait)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        chain.end()
        smtp.close()  # a reply we gave up on must not be read as the next command's
        raise
    finally:
        chain.end()  # (again: it ends once)


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

    async def send(
        self,
        message: BuiltMessage,
        recipients: Sequence[str],
        begin: Callable[[], bool] = begin_at_once,
    ) -> SendResult | None:
        if not begin():
            return None
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
