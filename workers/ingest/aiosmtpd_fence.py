"""What the ingest role uses of aiosmtpd beyond its documented API, in one place.

Written against aiosmtpd 1.4.6 (``CHECKED_RELEASES``).  pyproject.toml allows 1.4.x, so that
a user can take a patch release; on any other release than 1.4.6 the sessions take
aiosmtpd's own constructor (``FAST_INIT``), and tests/test_internals_aiosmtpd.py fails,
naming this file, until someone has checked this file against that release's
``aiosmtpd/smtp.py`` and widened ``CHECKED_RELEASES``; it also fails when a name used here
is gone or aiosmtpd no longer behaves as relied on here.

The role code (server.py, handler.py, auth.py) keeps to what aiosmtpd documents: the
``SMTP`` constructor's arguments, ``event_handler``, ``data_size_limit``, ``hostname``,
``session``, ``envelope``, ``transport``, ``loop``, ``push()``, ``_create_envelope()``,
``smtp_<COMMAND>`` methods and ``@syntax``, the handler hooks, the ``Session`` and
``Envelope`` attributes, and the names in ``aiosmtpd.smtp.__all__``.  For the rest its
session class derives from :class:`FencedSMTP` and calls only the names defined here.

What each use buys.  Figures from ``bench/ingest.py --against`` (this use against a tree
without it, 2 KB messages over 10 sessions, medians of 7 alternated rounds) and from a loop
that constructs 2 000 sessions:

* ``FencedSMTP.__init__`` sets what 1.4.6's ``SMTP.__init__`` sets for our arguments, from
  tables computed once per listener (:class:`SessionArguments`, :class:`CommandTable`):
  4.6 us per session instead of 132 us (``dir()`` and ``inspect.getmembers`` of the
  session and the handler, again for every connection).  With aiosmtpd's constructor:
  0.80x the messages per second and 0.74x per CPU-second with one message per connection
  (unchanged with connections reused); with aiosmtpd's constructor and a short
  ``__dir__`` (the cheapest way to keep it): 0.91x and 0.87x.
* ``_getaddr``: a plain ``<local@domain>`` is split by one regex (:func:`simple_path`)
  instead of the stdlib's header parser (65 us per address, two per message).  Without:
  0.83x msg/s (0.77x per CPU-second) with a connection per message, 0.74x (0.66x) reused.
* the command table (``_smtp_methods``) asks :meth:`FencedSMTP.command_override` first:
  while the worker stops, commands outside a transaction get 421 at once
  (test_ingest_sigterm::test_sigterm_drains_sessions_and_exits_zero).
* ``_timeout_cb`` calls :meth:`FencedSMTP.command_timed_out`: 421 4.4.2 instead of a
  silent close (test_ingest_timeouts::test_idle_client_gets_421_after_the_command_timeout);
  ``_reset_timeout`` is :meth:`FencedSMTP.restart_command_timer`: the command timeout
  restarts with each chunk of DATA and while a message is being stored
  (test_ingest_timeouts::test_data_trickler_is_bounded_by_the_connection_timeout,
  ::test_a_store_slower_than_the_timeouts_still_gets_its_250).
* ``_reset_timeout`` keeps one command timer per session and moves its deadline, instead of
  1.4.6's cancel and new ``call_later`` at every command and chunk of DATA; and
  :func:`sanitized_log` replaces 1.4.6's module function of that name, skipping the
  sanitizing of each command line for log lines ``mail.log`` drops.  With handler.py's
  cheaper ids: 1.12x msg per CPU-second with reused connections, 1.07x with one message
  per connection (test_internals_aiosmtpd::test_the_command_timer_moves_its_deadline,
  ::test_a_shorter_timeout_moves_the_timer_earlier,
  ::test_dropped_command_lines_are_not_sanitized).
* ``_call_handler_hook`` asks :meth:`FencedSMTP.mail_refusal` before ``handle_MAIL``: a
  ``SIZE=`` the memory budget has no room for gets 452 4.3.1 after aiosmtpd checked the
  parameters (test_ingest_memory_budget::test_a_declared_size_with_no_room_is_refused_at_mail).
* ``_reader`` (:attr:`FencedSMTP.stream_reader`) and ``check_helo_needed`` /
  ``check_auth_needed`` (:meth:`FencedSMTP.refused_before_helo_or_auth`, undocumented)
  serve the session's own ``smtp_DATA``, whose chunked reader (data.py) keeps the memory
  budget (test_ingest_memory_budget) and, against aiosmtpd's line-by-line ``smtp_DATA``,
  gives 1.47x msg/s (1.19x per CPU-second) with connections reused.
* ``command_size_limits`` (undocumented) is aiosmtpd's per-command line limit, a dict on
  the class that every EHLO of any session raises and every new session clears; here each
  session has its own (test_ingest_replies::test_the_mail_line_limit_is_the_sessions_own),
  lengthened for RFC 3461's parameters and BDAT (:meth:`FencedSMTP.lengthen_command_line`).
* STARTTLS calls ``connection_made`` a second time, for the TLS transport, on the same
  session with ``transport`` already set (1.4.6 ``smtp_STARTTLS`` hands the connection to
  an ``SSLProtocol`` whose handshake calls back; ``connection_made`` tells the two calls
  apart the same way): :meth:`FencedSMTP.first_connection_made` says which call it is, so
  that the ingest session admits a connection against the caps and starts its session
  timer once, not again at STARTTLS
  (test_internals_aiosmtpd::test_starttls_makes_the_connection_a_second_time).
* ``smtp_STARTTLS`` first drops what the session's reader holds (plaintext pipelined
  behind the command) and resumes a transport that holding it had paused: the
  ``SSLProtocol`` 1.4.6 hands the transport to never resumes it, and the handshake waited
  for the command timeout
  (test_ingest_tls_auth::test_a_flood_pipelined_behind_starttls_ends_the_session_at_once).
* ``smtp_STARTTLS`` also refuses a STARTTLS inside TLS (``_tls_protocol`` set), which
  1.4.6 answered with 220 and a handshake inside the TLS session
  (test_ingest_tls_auth::test_starttls_inside_tls_is_refused_and_the_session_goes_on),
  and on the implicit-TLS listener, where 1.4.6 answered 454 "TLS not available"
  (test_ingest_tls_auth::test_implicit_tls_listener).
* ``eof_received`` (:meth:`FencedSMTP.end_of_input`) gives the end of the input to the
  reader without 1.4.6's cancel of the command loop: a client that half-closes after
  pipelining its message and QUIT gets its 250 and 221, where 1.4.6 stored the message
  and dropped its reply (the client sent it again); the loop ends at the end of the input
  (asyncio_fence.SessionReader.readuntil)
  (test_ingest_half_close::test_a_message_pipelined_before_a_half_close_is_answered_and_stored_once).
* :data:`REWRITTEN_REPLIES` matches 1.4.6's wording of three refusals to give them
  enhanced status codes (test_ingest_replies::test_552_over_the_size_limit,
  ::test_500_for_lines_and_commands_over_the_rfc_limits,
  test_ingest_tls_auth::test_require_tls_and_aiosmtplib_starttls).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, AnyStr, ClassVar

import aiosmtpd
from aiosmtpd import smtp
from aiosmtpd.smtp import SMTP, AuthenticatorType, _AuthMechAttr, login_always_fail

from workers.ingest.asyncio_fence import SessionReader, discard_held

CHECKED_RELEASES = "==1.4.6"
# FencedSMTP.__init__ copies this release's constructor; any other takes aiosmtpd's own
# (the same sessions, built the slow way).
FAST_INIT = aiosmtpd.__version__ == "1.4.6"

# 1.4.6's wording of three of its refusals, and the same replies with RFC 3463 enhanced
# status codes.
REWRITTEN_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "500 Command line too long": "500 5.5.2 Command line too long",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
}

REPLY_TLS_ACTIVE = "503 5.5.1 Error: TLS already active"

# The usual MAIL/RCPT argument: <dot-atom@domain> and maybe parameters.  A path in this
# strict form is split the way 1.4.6's _getaddr splits it; anything else goes to _getaddr.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:\s+(.*))?", re.DOTALL
)

Command = Callable[[str | None], Coroutine[Any, Any, None]]


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
AIOSMTPD_SANITIZED_LOG = smtp.sanitized_log


def sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """1.4.6's ``sanitized_log``, skipped when the logger would drop the line: its command
    loop sanitizes every command line for a debug and an info line that ``mail.log`` (set
    to ERROR by workers.logs) drops; 2% of ingest's time with reused sessions."""
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""), logging.CRITICAL)
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(level):
        return
    AIOSMTPD_SANITIZED_LOG(func, msg, *args, **kwargs)


smtp.sanitized_log = sanitized_log


def simple_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a MAIL/RCPT argument in the strict common form, else None."""
    match = SIMPLE_PATH.fullmatch(arg)
    return (match.group(1), match.group(2) or "") if match else None


@dataclass(frozen=True)
class SessionArguments:
    """The ``SMTP`` constructor's arguments, the same for every session of one listener,
    and the table of handler hooks aiosmtpd 1.4.6 would build again for each session."""

    handler: Any
    hostname: str
    ident: str
    data_size_limit: int
    timeout: float
    tls_context: ssl.SSLContext | None
    require_starttls: bool
    auth_required: bool
    auth_require_tls: bool
    authenticator: AuthenticatorType | None
    enable_smtputf8: bool = True
    handle_hooks: dict[str, Callable[..., Any]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        hooks = {  # handle_XXX methods by command, as 1.4.6 looks them up
            name[7:]: getattr(self.handler, name)
            for name in dir(self.handler)
            if name.startswith("handle_")
        }
        object.__setattr__(self, "handle_hooks", hooks)

    def as_keywords(self) -> dict[str, Any]:
        """For ``SMTP.__init__``: without credentials, no AUTH mechanism is offered."""
        return {
            "data_size_limit": self.data_size_limit,
            "enable_SMTPUTF8": self.enable_smtputf8,
            "hostname": self.hostname,
            "ident": self.ident,
            "tls_context": self.tls_context,
            "require_starttls": self.require_starttls,
            "timeout": self.timeout,
            "auth_required": self.auth_required,
            "auth_require_tls": self.auth_require_tls,
            "authenticator": self.authenticator,
            "auth_exclude_mechanism": None if self.authenticator else ["PLAIN", "LOGIN"],
        }


class CommandTable:
    """1.4.6's ``_smtp_methods`` (command -> ``smtp_*`` method) resolved on lookup, so no
    table is built per session; a session's :meth:`FencedSMTP.command_override` comes first."""

    __slots__ = ("_session",)

    def __init__(self, session: FencedSMTP) -> None:
        self._session = session

    def get(self, name: str, default: Any = None) -> Any:
        session = self._session
        if name not in session.command_names:
            return default
        session.replying_to = name
        return session.command_override(name) or getattr(session, "smtp_" + name)

    def items(self) -> list[tuple[str, Any]]:  # for HELP
        session = self._session
        return [(name, getattr(session, "smtp_" + name)) for name in sorted(session.command_names)]


class FencedSMTP(SMTP):
    """aiosmtpd's ``SMTP`` protocol with the private parts mailpool uses behind names of
    its own; a subclass overrides the hooks below, never aiosmtpd's private methods."""

    command_names: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.command_names = frozenset(
            name[5:] for name in dir(cls) if name.startswith("smtp_") and name[5:].isupper()
        )

    def __init__(self, arguments: SessionArguments) -> None:
        if FAST_INIT:
            self._init_as_1_4_6(arguments)
        else:  # pragma: no cover - test_internals_aiosmtpd runs sessions with FAST_INIT off
            super().__init__(arguments.handler, **arguments.as_keywords())
        # One dict per session, not aiosmtpd's on the class (see the module docstring).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._smtp_methods = CommandTable(self)  # type: ignore[assignment]  # get, items
        # The command being answered: None before the first (the greeting's turn).
        self.replying_to: str | None = None
        # The command timer (_reset_timeout): when it is due, and whether it is set.
        self._command_deadline = 0.0
        self._command_timer_set = False

    def _init_as_1_4_6(self, arguments: SessionArguments) -> None:
        """What 1.4.6's ``SMTP.__init__`` sets for these arguments, its tables taken from
        ``arguments`` (tests/test_internals_aiosmtpd.py compares the two)."""
        self.__ident__ = arguments.ident
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            SessionReader(limit=self.line_length_limit, loop=self.loop),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = arguments.handler
        self.data_size_limit = arguments.data_size_limit
        self.enable_SMTPUTF8 = arguments.enable_smtputf8
        self._decode_data = False
        self.hostname = arguments.hostname
        self.tls_context = arguments.tls_context
        self.require_starttls = bool(arguments.tls_context) and arguments.require_starttls
        self._timeout_duration = arguments.timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = arguments.auth_require_tls
        self._proxy_timeout = None
        self._authenticator = arguments.authenticator
        self._auth_callback = None if arguments.authenticator else login_always_fail
        self._auth_required = arguments.auth_required
        self._auth_methods = (
            {
                "LOGIN": _AuthMechAttr(self.auth_LOGIN, True),
                "PLAIN": _AuthMechAttr(self.auth_PLAIN, True),
            }
            if arguments.authenticator
            else {}
        )
        self._handle_hooks = arguments.handle_hooks
        self._ehlo_hook_ver = "new" if "EHLO" in arguments.handle_hooks else None
        self._enforce_call_limit = False

    # -- hooks for the subclass -----------------------------------------------------------

    def command_override(self, name: str) -> Command | None:
        """What to run instead of ``smtp_<name>`` for this command now, or None."""
        return None

    def command_timed_out(self) -> None:
        """The command timeout passed; aiosmtpd closes the connection without a word."""
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def mail_refusal(self, mail_options: list[str]) -> str | None:
        """A reply refusing a MAIL FROM that aiosmtpd found well-formed, or None to go on
        to the handler's ``handle_MAIL``."""
        return None

    def outgoing_reply(self, status: str) -> str:
        """Every text reply on its way out (aiosmtpd's and ours), after the rewrites of
        :data:`REWRITTEN_REPLIES`; :attr:`replying_to` names the command it answers."""
        return status

    # -- for the subclass to call ---------------------------------------------------------

    def first_connection_made(self) -> bool:
        """In ``connection_made``: True for the connection's own call, False for the one
        1.4.6's STARTTLS makes again for the TLS transport (``transport`` is set by then)."""
        return self.transport is None

    @property
    def stream_reader(self) -> asyncio.StreamReader:
        """The reader the command loop reads from, for a DATA reader of the subclass."""
        reader: asyncio.StreamReader = self._reader
        return reader

    def restart_command_timer(self) -> None:
        self._reset_timeout()

    def stop_reading(self) -> None:
        """Nothing more of the input is read: what the client sent and the command loop
        has not read yet is dropped, and the loop ends at its next read (the end of the
        input, :meth:`SessionReader.readuntil`).  For a session's last reply: 1.4.6's loop
        reads on while the transport closes, and ran commands (a whole message, stored)
        pipelined behind a reply that said the connection was closing."""
        discard_held(self._reader)
        self._reader.feed_eof()

    def end_of_input(self) -> bool:
        """``eof_received`` without 1.4.6's cancel of the command loop: the end of the
        input goes to the reader, the loop answers every command received before it (a
        client may half-close once it sent QUIT, pipelined after its message's dot) and
        ends there (:meth:`SessionReader.readuntil`).  1.4.6 cancels the loop at once,
        dropping the reply to a message being stored, which the client then sends again.
        True: the transport keeps its writing half open.  Not over TLS, which has no
        half-close (the connection closes, as with 1.4.6)."""
        if self.session is not None and self.session.ssl is not None:
            return bool(super().eof_received())
        return bool(asyncio.StreamReaderProtocol.eof_received(self))  # False on implicit TLS

    def lengthen_command_line(self, command: str, octets: int) -> None:
        """Let ``command``'s line be ``octets`` longer in an extended (EHLO) session, as
        aiosmtpd's EHLO does for MAIL's SIZE= and SMTPUTF8."""
        self.command_size_limits[command] += octets

    async def refused_before_helo_or_auth(self, command: str) -> bool:
        """True (and the 503 or 530 sent) when ``command`` needs a HELO/EHLO or AUTH first."""
        return bool(await self.check_helo_needed() or await self.check_auth_needed(command))

    # -- aiosmtpd 1.4.6's methods, overridden --------------------------------------------

    async def smtp_STARTTLS(self, arg: str) -> None:
        # 1.4.6 hands the raw transport to an SSLProtocol, which never resumes a transport
        # paused before it took over: plaintext pipelined behind STARTTLS that filled the
        # reader past its flow limit left the handshake without the client's hello, and the
        # session sat until its command timeout.  That plaintext is never to be read (RFC
        # 3207 section 4.2; 1.4.6 clears the reader once the handshake is done): dropped
        # here, before the 220, and the transport reads again.
        if not arg and self._tls_is_on():
            # After STARTTLS 1.4.6 would answer 220 and start a handshake inside TLS, and on
            # the implicit-TLS listener 454 "not available", as if later it might be (RFC
            # 3207 section 4.2: STARTTLS is not offered again, and a client that sends it
            # is refused).
            await self.push(REPLY_TLS_ACTIVE)
            return
        if not arg and self.tls_context:
            discard_held(self._reader)
        await super().smtp_STARTTLS(arg)

    def _tls_is_on(self) -> bool:
        """The session is encrypted: by STARTTLS, or from the start (implicit TLS)."""
        if self._tls_protocol is not None:
            return True
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def _timeout_cb(self) -> None:
        self.command_timed_out()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # 1.4.6 cancels its timer and schedules a new one for every command and (server.py)
        # every chunk of DATA: 3% of ingest's time with reused sessions.  One timer instead,
        # whose deadline moves on: when it fires early, it is set again for the deadline.
        self._command_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if self._command_timer_set and handle is not None and not handle.cancelled():
            if handle.when() <= self._command_deadline:
                return  # it fires early and is set again for the deadline
            handle.cancel()  # a shorter duration than before (1.4.6's PROXY wait)
        self._set_command_timer()

    def _set_command_timer(self) -> None:
        self._command_timer_set = True
        self._timeout_handle = self.loop.call_at(self._command_deadline, self._command_timer_due)

    def _command_timer_due(self) -> None:
        self._command_timer_set = False
        if self.loop.time() < self._command_deadline:
            self._set_command_timer()
        else:
            self._timeout_cb()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return simple_path(arg) or super()._getaddr(arg)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "MAIL":
            refusal = self.mail_refusal(args[1])
            if refusal is not None:
                return refusal
        return await super()._call_handler_hook(command, *args)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = self.outgoing_reply(REWRITTEN_REPLIES.get(status, status))
        await super().push(status)
