"""The aiosmtpd handler of ``mailpool ingest``: envelope checks and the end-of-DATA step.

At the end of DATA the handler verifies the message (SPF begun at MAIL FROM; DKIM, ARC and
DMARC now: workers.verify), prepends our ``Authentication-Results`` and ``Received`` fields,
parses the message with the codec, packs it and appends it to ``email.receive``.  The reply
is ``250`` with the stream entry id only after Redis acknowledged the entry; any failure on
our side (Redis down, out of memory, read-only, too few replicas, a bug of ours) is a
temporary ``451 4.3.0``, never a ``5xx`` and never a ``250``: the sender keeps the message
and retries.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from workers.codec.dsn import DsnRequest
from workers.codec.parse import HeaderBlock, parse_message, read_fields, read_header_block
from workers.codec.wire import DEFAULT_LIMITS, SPLICE_FROM, pack
from workers.metrics import INGEST_MESSAGES, INGEST_REJECTED, INGEST_TRANSACTION
from workers.streams.receive import Store, StoreError
from workers.verify.verifier import SpfChecks, Verified, Verifier

log = structlog.get_logger("mailpool.ingest")

KeepRaw = Literal["never", "defects", "always"]

# Replies of our own (the codes are part of the outside contract, see README).
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_DOMAIN_NOT_ACCEPTED = "550 5.7.1 Recipient domain not accepted here"
REPLY_BAD_ADDRESS = "553 5.1.3 Address has characters not allowed in SMTP"
REPLY_NULL_RECIPIENT = "501 5.1.3 Bad recipient address syntax: <> is no mailbox"
# RFC 6531 section 3.4: a non-ASCII address only in a transaction that declared SMTPUTF8
# (Postfix's wording).
REPLY_UTF8_UNDECLARED = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
REPLY_STORE_FAILED = "451 4.3.0 Temporary storage failure, try again later"
REPLY_INTERNAL_ERROR = "451 4.3.0 Temporary local error, try again later"
REPLY_ENTRY_TOO_BIG = "552 5.3.4 Message too big for this server once decoded"

# Messages this large are parsed off the event loop so other sessions keep being served.
PARSE_IN_THREAD_FROM = 1 << 19

# The HELO/EHLO name goes into our trace field; keep it one safe token (it is the client's
# claim, anything may be in it).
_UNSAFE_HELO = re.compile(r"[^\x21-\x27\x2a-\x7e]")


class IngestEnvelope(Envelope):
    """aiosmtpd's envelope plus what the sender asked of delivery status notifications
    (RFC 3461), stored in the entry's ``dsn`` key."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn = DsnRequest()
        self.spf: SpfChecks | None = None  # begun at MAIL FROM when verifying

    def end(self) -> None:
        """The transaction is over (a new envelope replaces this one): checks still
        running for it are dropped."""
        if self.spf is not None:
            self.spf.cancel()


@dataclass(frozen=True)
class HandlerSettings:
    hostname: str
    max_recipients: int
    accept_domains: frozenset[str]  # lower-case, no trailing dot; empty = accept all
    keep_raw: KeepRaw
    auth_enabled: bool


def received_id() -> str:
    """A new id for a received message: 128 random bits from the system as 32 hex digits,
    as ``uuid.uuid4().hex`` (without its UUID object: 0.67 against 3.2 us).  Not from the
    ``random`` module (0.44 us): any code in the process that seeds it (a library, a test
    framework) made ids repeat, and its output is predictable from earlier ids, which
    applications may show in links."""
    return os.urandom(16).hex()


def normalise_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def recipient_domain_accepted(address: str, accepted: frozenset[str]) -> bool:
    """Exact domain match, case-insensitive; ``postmaster`` without a domain is always taken
    (RFC 5321 section 4.5.1)."""
    if not accepted:
        return True
    _, at, domain = address.rpartition("@")
    if not at:
        return address.lower() == "postmaster"
    return normalise_domain(domain) in accepted


def _peer_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def _ip_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def protocol_name(*, extended: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The ``with`` keyword of the Received field (RFC 3848, RFC 6531 section 3.7.3)."""
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


class _DateCache:
    """RFC 5322 date of the current second; formatting it costs more than the rest of the
    Received field, and a busy server stamps many messages per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def format(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._text = format_datetime(datetime.fromtimestamp(second, UTC))
            self._second = second
        return self._text


_dates = _DateCache()


def received_field(
    *,
    helo: str | None,
    peer_ip: str,
    hostname: str,
    protocol: str,
    message_id: str,
    recipients: Sequence[str],
    now: float,
) -> bytes:
    """Our trace field, RFC 5321 section 4.4; ``for`` only names a single recipient so that
    Bcc recipients do not learn about each other."""
    claimed = _UNSAFE_HELO.sub("?", helo or "unknown")[:255]
    for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    text = (
        f"Received: from {claimed} ({_ip_literal(peer_ip)})\r\n"
        f"\tby {hostname} with {protocol} id {message_id}{for_clause};\r\n"
        f"\t{_dates.format(now)}\r\n"
    )
    return text.encode("utf-8", "replace")


# RFC 5321 allows no control characters in a path, not even quoted; a CR or NUL that
# aiosmtpd's parser lets through in a quoted local part would end up in our trace field.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def address_allowed(address: str) -> bool:
    """No control characters, and valid UTF-8: aiosmtpd decodes SMTPUTF8 arguments with
    surrogateescape, and lone surrogates could never be stored as msgpack str."""
    if _CONTROL.search(address):
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class IngestHandler:
    """aiosmtpd handler hooks (``handle_EHLO``, ``handle_MAIL``, ``handle_RCPT``,
    ``handle_DATA``, ``handle_exception``)."""

    def __init__(
        self, settings: HandlerSettings, store: Store, verifier: Verifier | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.verifier = verifier  # None: --no-verify

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With a 5-argument hook aiosmtpd leaves recording the client's name to us.
        session.host_name = hostname
        extensions = [r for r in responses if self.settings.auth_enabled or "AUTH" not in r]
        # aiosmtpd reads pipelined commands in order and answers each in turn (RFC 2920);
        # every reply has an enhanced status code (RFC 2034, IngestSMTP.outgoing_reply); the
        # DSN parameters are taken and stored (RFC 3461, IngestSMTP.smtp_MAIL/smtp_RCPT);
        # BDAT is IngestSMTP.smtp_BDAT (RFC 3030).
        extensions[1:1] = [
            "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", "250-CHUNKING"
        ]  # fmt: skip
        return extensions

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not address_allowed(address):
            INGEST_REJECTED.labels("bad_address").inc()
            return REPLY_BAD_ADDRESS
        if not address.isascii() and not envelope.smtp_utf8:
            INGEST_REJECTED.labels("bad_address").inc()
            return REPLY_UTF8_UNDECLARED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        if self.verifier is not None and isinstance(envelope, IngestEnvelope):
            # SPF runs while the client sends its recipients and data (issue: never slow
            # the transaction down for it).
            envelope.end()
            envelope.spf = self.verifier.start(
                _peer_ip(session.peer), address, session.host_name or ""
            )
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            INGEST_REJECTED.labels("too_many_recipients").inc()
            return REPLY_TOO_MANY_RECIPIENTS
        if not address_allowed(address):
            INGEST_REJECTED.labels("bad_address").inc()
            return REPLY_BAD_ADDRESS
        if address == "<>":  # aiosmtpd's null path, a sender only (RFC 5321 section 4.1.1.3)
            INGEST_REJECTED.labels("bad_address").inc()
            return REPLY_NULL_RECIPIENT
        if not address.isascii() and not envelope.smtp_utf8:
            INGEST_REJECTED.labels("bad_address").inc()
            return REPLY_UTF8_UNDECLARED
        if not recipient_domain_accepted(address, self.settings.accept_domains):
            INGEST_REJECTED.labels("domain").inc()
            log.info(
                "recipient_rejected",
                peer=_peer_ip(session.peer),
                domain=address.rpartition("@")[2][:255],
                code=550,
            )
            return REPLY_DOMAIN_NOT_ACCEPTED
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        message_id = received_id()
        peer = _peer_ip(session.peer)
        now = time.time()
        # No reference to the message's octets here: the envelope holds them until
        # _with_trace, then ``raw`` alone (the ingest memory budget counts them once).
        verified, read = await self._verified(session, envelope, message_id, peer)
        # In a list that _parse_and_pack empties: the octets are freed once parsed (memory).
        raw, header_block = self._with_trace(
            server, session, envelope, message_id=message_id, peer=peer, now=now,
            above=verified.field if verified else b"", read=read,
        )  # fmt: skip
        # One size everywhere: the message as stored (our fields + what the client
        # sent), the entry's ``size`` and ``len(raw)``, so log lines and entries agree.
        size = len(raw[0])
        recipients = list(envelope.rcpt_tos)
        try:
            entry_id = await self._store(
                raw, envelope, message_id, now, verified=verified, header_block=header_block
            )
        except EntryTooLarge as exc:  # permanent: a retry would be just as large
            INGEST_MESSAGES.labels("rejected").inc()
            log.info(
                "message_rejected", id=message_id, peer=peer, size=size,
                recipients=len(recipients), code=552, reason="entry_too_large", error=str(exc),
            )  # fmt: skip
            return REPLY_ENTRY_TOO_BIG
        except StoreError as exc:
            INGEST_MESSAGES.labels("failed").inc()
            # "unknown": the XADD had left for Redis, which may still run it (README,
            # Guarantees); a later message_stored_after_deferral line then names the entry.
            log.warning(
                "message_deferred", id=message_id, peer=peer, size=size,
                recipients=len(recipients), code=451, reason=exc.reason, error=exc.detail,
                stored="unknown" if exc.maybe_stored else "no",
            )  # fmt: skip
            return REPLY_STORE_FAILED
        except Exception:  # a bug of ours must not turn into a 5xx for the sender
            INGEST_MESSAGES.labels("failed").inc()
            log.exception(
                "message_deferred", id=message_id, peer=peer, size=size,
                recipients=len(recipients), code=451, reason="internal",
            )  # fmt: skip
            return REPLY_INTERNAL_ERROR
        INGEST_MESSAGES.labels("accepted").inc()
        INGEST_TRANSACTION.observe(time.perf_counter() - started)
        log.info(
            "message_accepted", id=message_id, entry=entry_id, peer=peer, size=size,
            recipients=len(recipients), code=250, **_verdict_summary(verified),
        )  # fmt: skip
        return f"250 2.0.0 OK queued as {entry_id}"

    async def _verified(
        self,
        session: Session,
        envelope: Envelope,
        message_id: str,
        peer: str,
    ) -> tuple[Verified | None, HeaderBlock | None]:
        """The verdicts on the client's octets, which it replaces in ``envelope`` (forged
        Authentication-Results renamed), and their header block as the parser reads it:
        read once, for the verifier and the parser (None for a block of another kind, for
        a message parsed off the loop, and for content a renamed field changed).  (None,
        None) with --no-verify.  A failure of ours gives temperror verdicts: never a 451 or
        5xx for it."""
        if self.verifier is None:
            return None, None
        content = envelope.original_content or b""
        # A large message is parsed off the loop: its header block is not read on it either.
        read = read_header_block(content) if len(content) < PARSE_IN_THREAD_FROM else None
        checks = envelope.spf if isinstance(envelope, IngestEnvelope) else None
        try:
            if checks is None:
                checks = self.verifier.start(
                    peer, envelope.mail_from or "", session.host_name or ""
                )
            verified = await self.verifier.finish(checks, content, read)
        except Exception:
            log.exception("verify_failed", id=message_id, peer=peer)
            verified = self.verifier.failed(checks, content)
        envelope.original_content = verified.content
        return verified, read if verified.content is content else None

    def _with_trace(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        *,
        message_id: str,
        peer: str,
        now: float,
        above: bytes = b"",
        read: HeaderBlock | None = None,
    ) -> tuple[list[bytes], HeaderBlock | None]:
        """The message as stored, alone in a list: ``above`` (our Authentication-Results
        field), our Received field, then the octets the client sent; and its header block,
        when ``read`` (that of the client's octets) is given and our fields are common
        ones."""
        trace = received_field(
            helo=session.host_name,
            peer_ip=peer,
            hostname=self.settings.hostname,
            protocol=protocol_name(
                extended=session.extended_smtp,
                tls=bool(getattr(server, "is_tls", False)),
                authenticated=bool(session.authenticated),
                smtputf8=bool(envelope.smtp_utf8),
            ),
            message_id=message_id,
            recipients=envelope.rcpt_tos,
            now=now,
        )
        content = envelope.original_content or b""
        # From here on the message is held once, in what this returns (memory budget).
        envelope.content = envelope.original_content = None
        return [above + trace + content], _below(read, above, trace)

    async def _store(
        self,
        raw: list[bytes],
        envelope: Envelope,
        message_id: str,
        now: float,
        *,
        verified: Verified | None = None,
        header_block: HeaderBlock | None = None,
    ) -> str:
        arguments = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "message_id": message_id,
            "received_at": now,
            "keep_raw": self.settings.keep_raw,
            "dsn": envelope.dsn.as_entry() if isinstance(envelope, IngestEnvelope) else None,
            "auth": verified.verdicts.extension if verified is not None else None,
            "header_block": header_block,
        }
        if len(raw[0]) >= PARSE_IN_THREAD_FROM:
            data = await asyncio.to_thread(_parse_and_pack, raw, arguments)
        else:
            data = _parse_and_pack(raw, arguments)
        return await self.store.append(data, message_id)

    async def handle_exception(self, error: Exception) -> str:
        """Called by aiosmtpd for an exception in any command: our failure, so 451.

        A failed TLS handshake also lands here; aiosmtpd then closes without a reply."""
        if isinstance(error, TLSSetupException):
            log.info("tls_failed", error=str(error.__cause__ or error))
        else:
            log.error("session_error", error=f"{type(error).__name__}: {error}")
        return REPLY_INTERNAL_ERROR


def _below(read: HeaderBlock | None, above: bytes, trace: bytes) -> HeaderBlock | None:
    """The stored message's header block: ``read`` (the client's) below our two fields."""
    if read is None:
        return None
    ours = _our_fields(above)  # the same few Authentication-Results fields again and again
    trace_fields = read_fields(trace)
    if ours is None or trace_fields is None:
        return None
    return read.below(ours, trace_fields)


@functools.lru_cache(maxsize=256)
def _our_fields(above: bytes) -> HeaderBlock | None:
    return read_fields(above)


def _verdict_summary(verified: Verified | None) -> dict[str, str]:
    """The verdicts an operator reads in the message_accepted line."""
    if verified is None:
        return {}
    verdicts = verified.verdicts
    return {
        "spf": verdicts.spf_mailfrom.result if verdicts.spf_mailfrom else "none",
        "dmarc": verdicts.dmarc.result if verdicts.dmarc else "none",
    }


class EntryTooLarge(Exception):
    """The parsed message is over the entry size consumers accept (``unpack``'s limit)."""


def _parse_and_pack(raw: list[bytes], arguments: dict[str, Any]) -> bytes:
    """Parse the message taken out of ``raw`` (so it is freed once parsed, unless the entry
    keeps it) and pack it."""
    # No body decodes to more octets than its encoding: below SPLICE_FROM, so is each part.
    small = len(raw[0]) < SPLICE_FROM
    message = parse_message(raw.pop(), **arguments)
    data = pack(message, small=small)
    if len(data) <= DEFAULT_LIMITS.max_bytes:
        return data
    # Stored as is, no consumer could unpack it: keep the decoded form, drop the raw copy.
    if message.pop("raw", None) is not None:
        message.setdefault("defects", []).append("raw: not kept, entry over the size limit")
        data = pack(message)
    if len(data) > DEFAULT_LIMITS.max_bytes:
        raise EntryTooLarge(f"entry of {len(data)} octets")
    return data
