"""SMTP peers for the delivery tests: a recording sink on aiosmtpd and Postfix's smtp-sink.

``RecordingSink`` keeps every accepted transaction (envelope and bytes) and can be told to
answer particular recipients or the end of DATA with given replies (a number of times or
always), to stall before answering DATA, or to drop the connection after the final dot
without answering.  It runs on a free loopback port in its own thread (aiosmtpd's
Controller), can be stopped and started again on the same port (a relay going away and
coming back), and counts connections (EHLOs) so pooling can be checked.

``PostfixSink`` runs ``/usr/sbin/smtp-sink`` with its fault options (``-r`` soft 4xx,
``-f`` hard 5xx, ``-q`` disconnect, ``-Q`` 421 + disconnect per command) and dumps accepted
transactions to files so tests can count them.  The Postfix daemon is never started.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.harness import free_port, wait_for_port

SMTP_SINK = "/usr/sbin/smtp-sink"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...] = ()
    tls: bool = False  # the transaction ran inside TLS (STARTTLS or implicit)
    login: str | None = None  # the AUTH user, when the client authenticated

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def message_id(self) -> str:
        return str(self.message["message-id"] or "")


@dataclass
class _Replies:
    """A queue of scripted replies; ``None`` times = forever."""

    reply: str
    times: int | None


@dataclass
class RecordingSink:
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    dropped: list[Received] = field(default_factory=list)  # got the dot, never answered
    ehlo_count: int = 0
    stall_data: float = 0.0  # seconds to wait before answering the end of DATA
    size_limit: int = 0  # > 0: offer the SIZE extension with this limit
    pipelining: bool = False  # offer PIPELINING
    _rcpt: dict[str, list[_Replies]] = field(default_factory=lambda: defaultdict(list))
    rcpt_seen: Counter[str] = field(default_factory=Counter)  # RCPT TO per address
    _data: list[_Replies] = field(default_factory=list)
    _drop_after_dot: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None
    data_arrived: threading.Event = field(default_factory=threading.Event)
    # TLS and AUTH: a (cert.pem, key.pem) pair offers STARTTLS (or implicit TLS when
    # ``implicit_tls``); ``users`` requires AUTH (after TLS) with these user -> password.
    certificate: tuple[Path, Path] | None = None
    implicit_tls: bool = False
    users: dict[str, str] | None = None
    auth_in_clear: bool = False  # offer AUTH without TLS too
    logins_tried: list[str] = field(default_factory=list)  # every AUTH's user, even refused

    # --- scripting -------------------------------------------------------------------------
    def refuse_rcpt(self, address: str, reply: str, times: int | None = None) -> None:
        """Answer RCPT TO:<address> with ``reply`` (e.g. "550 5.1.1 no such user")."""
        with self._lock:
            self._rcpt[address.lower()].append(_Replies(reply, times))

    def refuse_data(self, reply: str, times: int | None = None) -> None:
        with self._lock:
            self._data.append(_Replies(reply, times))

    def drop_after_dot(self, times: int = 1) -> None:
        """Close the connection after the message's final dot without any reply."""
        with self._lock:
            self._drop_after_dot += times

    def clear_faults(self) -> None:
        with self._lock:
            self._rcpt.clear()
            self._data.clear()
            self._drop_after_dot = 0
            self.stall_data = 0.0

    @staticmethod
    def _take(queue: list[_Replies]) -> str | None:
        if not queue:
            return None
        head = queue[0]
        if head.times is not None:
            head.times -= 1
            if head.times <= 0:
                queue.pop(0)
        return head.reply

    # --- aiosmtpd hooks --------------------------------------------------------------------
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self._lock:
            self.ehlo_count += 1
        if self.pipelining:  # aiosmtpd reads pipelined commands in order (RFC 2920)
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self._lock:
            self.rcpt_seen[address.lower()] += 1
            reply = self._take(self._rcpt.get(address.lower(), []))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        record = Received(
            envelope.mail_from or "",
            tuple(envelope.rcpt_tos),
            bytes(envelope.original_content),
            tuple(envelope.mail_options),
            tls=session.ssl is not None
            or server.transport.get_extra_info("ssl_object") is not None,
            login=session.auth_data if session.authenticated else None,
        )
        self.data_arrived.set()
        if self.stall_data:
            await asyncio.sleep(self.stall_data)
        with self._lock:
            drop = self._drop_after_dot > 0
            if drop:
                self._drop_after_dot -= 1
            reply = None if drop else self._take(self._data)
        if drop:
            self.dropped.append(record)
            server.transport.abort()
            return "250 never seen"
        if reply is not None:
            return reply
        self.received.append(record)
        return "250 2.0.0 queued"

    # --- life cycle ------------------------------------------------------------------------
    def start(self) -> RecordingSink:
        options: dict[str, Any] = {}
        if self.certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, self.certificate))
            options["ssl_context" if self.implicit_tls else "tls_context"] = context
        if self.users is not None:
            options.update(authenticator=self._authenticate, auth_required=True)
            options.update(auth_require_tls=not self.auth_in_clear)
        self._controller = Controller(
            self, hostname=self.host, port=self.port, enable_SMTPUTF8=True, decode_data=False,
            data_size_limit=self.size_limit, ready_timeout=5.0, **options,
        )  # fmt: skip
        self._controller.start()
        return self

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        users = self.users or {}
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins_tried.append(login)
        return AuthResult(success=users.get(login) == password, auth_data=login)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    # --- reading ---------------------------------------------------------------------------
    def deliveries_to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]

    def recipient_counts(self) -> dict[tuple[str, str], int]:
        """(Message-ID, recipient) -> times accepted: more than 1 is a duplicate send."""
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for record in list(self.received):
            for rcpt in record.rcpt_tos:
                counts[(record.message_id, rcpt)] += 1
        return dict(counts)


@dataclass(frozen=True)
class Span:
    """One DATA at the relay: from the end of the message to the reply."""

    recipients: tuple[str, ...]
    began: float
    ended: float

    def overlaps(self, other: Span) -> bool:
        return self.began < other.ended and other.began < self.ended


def most_at_once(spans: list[Span]) -> int:
    """The most DATA phases the relay had in progress at one time."""
    starts_and_ends = sorted([(s.began, 1) for s in spans] + [(s.ended, -1) for s in spans])
    most = now = 0
    for _, change in starts_and_ends:  # an end before a start at the same instant
        now += change
        most = max(most, now)
    return most


@dataclass
class TimedSink(RecordingSink):
    """A recording sink that also notes when each DATA began and was answered."""

    spans: list[Span] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        began = time.monotonic()
        reply = await super().handle_DATA(server, session, envelope)
        self.spans.append(Span(tuple(envelope.rcpt_tos), began, time.monotonic()))
        return reply


class PostfixSink:
    """``smtp-sink`` on a free port, with fault options; accepted mail dumped to files."""

    def __init__(self, *options: str, port: int | None = None) -> None:
        # smtp-sink writes as the postfix user, which cannot enter pytest's private tmp_path.
        self.dump_dir = Path(tempfile.mkdtemp(prefix="mailpool-smtp-sink-"))
        self.options = list(options)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self, *options: str) -> PostfixSink:
        """Start (again) on the same port; ``options`` replace the fault options if given."""
        if options:
            self.options = list(options)
        self.dump_dir.chmod(0o777)  # smtp-sink drops to the postfix user before writing
        args = [SMTP_SINK, "-u", "postfix", "-d", f"{self.dump_dir}/m.", *self.options,
                f"127.0.0.1:{self.port}", "100"]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dump_dir.glob("m.*"))]

    def wait_for_dumps(self, count: int, timeout: float = 10.0) -> list[bytes]:
        # not wait_until_blocking: async tests call this, and it returns what came when time is up
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.dumps()
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.dumps()
