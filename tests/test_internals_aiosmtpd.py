"""What the ingest role uses of aiosmtpd beyond its documented API, checked against the
installed release: workers/ingest/aiosmtpd_fence.py.

Each test fails loudly, naming that file, when the installed aiosmtpd is not the release
the fence was written for, lacks a name the fence uses, or no longer calls what the fence
overrides: a session class that uses every hook of the fence runs on real sockets, with
the fence's copy of the constructor and with aiosmtpd's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import aiosmtpd
import pytest
from aiosmtpd import smtp
from aiosmtpd.smtp import syntax

from tests.ingest_util import SMTPConn, client_tls, ingest, message
from tests.internals_util import check_release
from workers.ingest import aiosmtpd_fence, server
from workers.ingest.aiosmtpd_fence import Command, FencedSMTP, SessionArguments, simple_path
from workers.ingest.asyncio_fence import SessionReader

FENCE = "workers/ingest/aiosmtpd_fence.py"


def test_the_installed_aiosmtpd_is_the_release_the_fence_was_written_for() -> None:
    installed = check_release("aiosmtpd", aiosmtpd_fence.CHECKED_RELEASES, FENCE)
    assert aiosmtpd.__version__ == str(installed), f"{FENCE}: FAST_INIT reads __version__"
    assert aiosmtpd_fence.FAST_INIT, f"{FENCE}: FAST_INIT is off for aiosmtpd {installed}"


def test_aiosmtpd_still_has_what_the_fence_uses() -> None:
    overridden_or_called = [
        "_getaddr", "_call_handler_hook", "_reset_timeout", "_timeout_cb",
        "_cb_client_connected", "check_helo_needed", "check_auth_needed",
        "auth_LOGIN", "auth_PLAIN", "line_length_limit", "command_size_limit",
        "command_size_limits",
    ]  # fmt: skip
    missing = [name for name in overridden_or_called if not hasattr(smtp.SMTP, name)]
    assert missing == [], f"revisit {FENCE}: aiosmtpd's SMTP has no {missing}"
    imported = ["_AuthMechAttr", "login_always_fail"]
    missing = [name for name in imported if not hasattr(smtp, name)]
    assert missing == [], f"revisit {FENCE}: aiosmtpd.smtp has no {missing}"


# -- a session that uses every hook of the fence ------------------------------------------


class _Handler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class _Probe(FencedSMTP):
    """Answers NOOP through the command override, refuses ``SIZE=7`` in mail_refusal,
    records the command timeout, and reads one line of DATA from the stream reader."""

    timeouts = 0
    connections_made: ClassVar[list[bool]] = []  # first_connection_made() at each call
    sessions: ClassVar[list[_Probe]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections_made.append(self.first_connection_made())
        if self.first_connection_made():
            type(self).sessions.append(self)
        super().connection_made(transport)

    def command_override(self, name: str) -> Command | None:
        return self._overridden if name == "NOOP" else None

    async def _overridden(self, arg: str | None) -> None:
        await self.push("250 overridden")

    def mail_refusal(self, mail_options: list[str]) -> str | None:
        return "452 4.3.1 refused by the probe" if "SIZE=7" in mail_options else None

    def command_timed_out(self) -> None:
        type(self).timeouts += 1
        super().command_timed_out()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.refused_before_helo_or_auth("DATA"):
            return
        await self.push("354 one line")
        self.restart_command_timer()
        line = await self.stream_reader.readline()
        await self.push("250 read " + line.decode().strip())


def _arguments(**overrides: Any) -> SessionArguments:
    values: dict[str, Any] = {
        "handler": _Handler(), "hostname": "probe.test", "ident": "probe",
        "data_size_limit": 1000, "timeout": 5.0, "tls_context": None,
        "require_starttls": False, "auth_required": False, "auth_require_tls": True,
        "authenticator": None,
    }  # fmt: skip
    values.update(overrides)
    return SessionArguments(**values)


@contextlib.asynccontextmanager
async def _probe_server(arguments: SessionArguments) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: _Probe(arguments), "127.0.0.1", 0)
    try:
        yield int(listener.sockets[0].getsockname()[1])
    finally:
        listener.close()


@pytest.fixture(params=[True, False], ids=["fast-init", "aiosmtpd-init"])
def fast_init(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both constructors: the fence's copy, and aiosmtpd's own (what another release gets)."""
    monkeypatch.setattr(aiosmtpd_fence, "FAST_INIT", request.param)
    return bool(request.param)


async def test_aiosmtpd_calls_the_fences_hooks(fast_init: bool) -> None:
    async with _probe_server(_arguments()) as port:
        conn = await SMTPConn.open(port)
        assert await conn.cmd("DATA") == (503, "Error: send HELO first"), FENCE
        await conn.ehlo()
        assert await conn.cmd("NOOP") == (250, "overridden"), f"{FENCE}: _smtp_methods"
        code, text = await conn.cmd("HELP")
        assert code == 250 and "NOOP" in text and "DATA" in text, f"{FENCE}: _smtp_methods"
        refused = await conn.cmd("MAIL FROM:<a@example.org> SIZE=7")
        assert refused == (452, "4.3.1 refused by the probe"), f"{FENCE}: _call_handler_hook"
        assert (await conn.cmd("MAIL FROM:<a@example.org> SIZE=8"))[0] == 250
        assert (await conn.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        assert await conn.cmd("first line") == (250, "read first line"), f"{FENCE}: _reader"
        await conn.close()


async def test_the_command_timeout_goes_to_the_fences_hook(fast_init: bool) -> None:
    _Probe.timeouts = 0
    async with _probe_server(_arguments(timeout=0.3)) as port:
        conn = await SMTPConn.open(port)
        assert await conn.closed_by_server(timeout=3)
        await conn.close()
    assert _Probe.timeouts == 1, f"{FENCE}: aiosmtpd no longer calls _timeout_cb"


async def test_the_command_timer_moves_its_deadline(
    fast_init: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One timer per session whose deadline moves with each command (1.4.6 cancelled and
    scheduled one per command): commands every 0.15 s keep a 0.4 s timeout from passing,
    silence then ends the session once."""
    _Probe.timeouts = 0
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []
    call_at = loop.call_at  # call_later calls it too

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(callback, "__self__", None), _Probe):
            scheduled.append(callback)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    async with _probe_server(_arguments(timeout=0.4)) as port:
        conn = await SMTPConn.open(port)
        await conn.ehlo()
        for _ in range(8):
            assert (await conn.cmd("RSET"))[0] == 250, "the timeout passed while busy"
            await asyncio.sleep(0.15)
        commands_timers = len(scheduled)
        assert await conn.closed_by_server(timeout=3)
        await conn.close()
    assert _Probe.timeouts == 1
    # Set at the connection, again each time it fired before a moved deadline (every 0.4 s
    # over 1.2 s of commands): not once per command.
    assert commands_timers <= 5, f"{FENCE}: {commands_timers} timers for 9 commands"


async def test_a_shorter_timeout_moves_the_timer_earlier(fast_init: bool) -> None:
    """1.4.6 waits for a PROXY header with a timeout of its own: a deadline earlier than
    the one the timer is set for is kept, not left to the later one."""
    _Probe.timeouts = 0
    _Probe.sessions.clear()
    async with _probe_server(_arguments(timeout=30)) as port:
        conn = await SMTPConn.open(port)
        await conn.ehlo()
        [session] = _Probe.sessions
        session._reset_timeout(0.2)
        assert await conn.closed_by_server(timeout=3), f"{FENCE}: the timer kept 30 s"
        await conn.close()
    assert _Probe.timeouts == 1


async def test_dropped_command_lines_are_not_sanitized(
    fast_init: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiosmtpd sanitizes each command line for its debug and info lines: not when
    ``mail.log`` drops them (workers.logs sets it to ERROR), as before when it keeps them."""
    sanitized: list[bytes] = []
    original = smtp.sanitize
    monkeypatch.setattr(smtp, "sanitize", lambda text: sanitized.append(text) or original(text))
    mail_log = logging.getLogger("mail.log")
    kept = mail_log.level
    try:
        for level, expected in ((logging.ERROR, False), (logging.DEBUG, True)):
            mail_log.setLevel(level)
            sanitized.clear()
            async with _probe_server(_arguments()) as port:
                conn = await SMTPConn.open(port)
                await conn.ehlo()
                assert (await conn.cmd("RSET"))[0] == 250
                await conn.close()
            assert bool(sanitized) is expected, (level, sanitized)
    finally:
        mail_log.setLevel(kept)


async def test_starttls_makes_the_connection_a_second_time(
    fast_init: bool, certificate: tuple[Path, Path]
) -> None:
    """aiosmtpd calls connection_made again at STARTTLS, on the same session, and the fence
    tells that call from the first."""
    _Probe.connections_made = []
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(*certificate)
    async with _probe_server(_arguments(tls_context=server_tls)) as port:
        conn = await SMTPConn.open(port)
        assert "STARTTLS" in await conn.ehlo()
        await conn.starttls(client_tls(certificate[0]))
        assert "STARTTLS" not in await conn.ehlo()  # the same session, now over TLS
        await conn.close()
    assert _Probe.connections_made == [True, False], (
        f"revisit {FENCE} first_connection_made: STARTTLS no longer calls connection_made "
        "again with the transport set"
    )


async def test_aiosmtpds_refusals_get_enhanced_codes(fast_init: bool) -> None:
    """REWRITTEN_REPLIES matches aiosmtpd's wording: each refusal arrives rewritten."""
    expected = f"{FENCE}: REWRITTEN_REPLIES no longer matches aiosmtpd's wording"
    async with _probe_server(_arguments()) as port:
        conn = await SMTPConn.open_session(port)
        code, text = await conn.cmd("MAIL FROM:<a@example.org> SIZE=1001")
        assert (code, text.split()[0]) == (552, "5.3.4"), expected
        code, text = await conn.cmd("NOOP " + "x" * 600)
        assert (code, text.split()[0]) == (500, "5.5.2"), expected
        await conn.close()
    no_certificate_needed = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    arguments = _arguments(tls_context=no_certificate_needed, require_starttls=True)
    async with _probe_server(arguments) as port:
        conn = await SMTPConn.open_session(port)
        code, text = await conn.cmd("MAIL FROM:<a@example.org>")
        assert (code, text.split()[0]) == (530, "5.7.0"), expected
        await conn.close()


# -- the constructor copy ------------------------------------------------------------------


_LIMITS = server.SessionLimits(
    hostname="mx.test", max_size=1000, command_timeout=5, connection_timeout=60,
    require_tls=False, auth_required=False,
)  # fmt: skip


def _session_attributes(monkeypatch: pytest.MonkeyPatch, *, fast: bool) -> dict[str, Any]:
    """The attributes of a new ingest session built by the fast or the stock constructor."""
    monkeypatch.setattr(aiosmtpd_fence, "FAST_INIT", fast)
    ingest_server = server.IngestServer(
        _Handler(), _LIMITS, listen="127.0.0.1:0", authenticator=lambda *args: None
    )
    return vars(ingest_server._factory(False)())


def _comparable(value: Any) -> Any:
    """What must agree between the two constructors: scalars (None and False both mean
    "off") and the keys of tables; objects made per session cannot be compared."""
    if value is None or value is False:
        return False
    if isinstance(value, str | int | float):
        return value
    if isinstance(value, dict):
        return sorted(value)
    return type(value).__name__


async def test_fast_constructor_sets_what_aiosmtpds_own_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same attribute names and the same settings as SMTP.__init__ of the installed
    release: a release that adds or changes an attribute is caught here, not in production."""
    fast = _session_attributes(monkeypatch, fast=True)
    stock = _session_attributes(monkeypatch, fast=False)
    assert sorted(set(stock) ^ set(fast)) == [], f"revisit {FENCE} _init_as_1_4_6"
    differing = sorted(k for k in stock if _comparable(stock[k]) != _comparable(fast[k]))
    # On purpose: the fast sessions read through asyncio_fence.SessionReader (flow control
    # apart from the line limit), with aiosmtpd's line limit.
    assert differing == ["_strong_reader"], f"revisit {FENCE} _init_as_1_4_6"
    reader, stock_reader = fast["_strong_reader"], stock["_strong_reader"]
    assert type(reader) is SessionReader and type(stock_reader) is asyncio.StreamReader
    assert reader._limit == stock_reader._limit == smtp.SMTP.line_length_limit


async def test_ingest_sessions_with_aiosmtpds_own_constructor(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another aiosmtpd release the sessions take aiosmtpd's own constructor."""
    monkeypatch.setattr(aiosmtpd_fence, "FAST_INIT", False)
    async with ingest(redis_url, max_recipients=100) as ingest_server:
        conn = await SMTPConn.open(ingest_server.port)
        assert "PIPELINING" in await conn.ehlo()
        assert (await conn.transaction(message()))[0] == 250
        assert (await conn.cmd("HELP"))[0] == 250
        await conn.close()


# What the ingest session overrides of aiosmtpd's SMTP on purpose: the fence's hooks, and in
# server.py documented ones (the asyncio protocol methods, _create_envelope, smtp_DATA).
OVERRIDDEN = {
    "_call_handler_hook", "_getaddr", "_timeout_cb", "push", "command_size_limits",
    "connection_made", "connection_lost", "data_received", "eof_received",
    "_create_envelope", "smtp_DATA", "smtp_MAIL", "smtp_RCPT", "_reset_timeout",
    "smtp_STARTTLS", "smtp_AUTH",
}  # fmt: skip


async def test_the_ingest_session_shadows_no_other_name_aiosmtpd_uses() -> None:
    """A method or attribute of ours named like one aiosmtpd's SMTP uses (in its class or
    as ``self.<name>`` anywhere in its module) would replace it without a word."""
    aiosmtpd_names = set(dir(smtp.SMTP)) | set(re.findall(r"self\.(\w+)", inspect.getsource(smtp)))
    session = server.IngestServer(_Handler(), _LIMITS, listen="127.0.0.1:0")._factory(False)()
    ours = set(vars(session)) - set(vars(smtp.SMTP(_Handler())))
    ours |= set(vars(server.IngestSMTP)) | set(vars(FencedSMTP))
    shadowed = {name for name in ours & aiosmtpd_names if not name.startswith("__")}
    assert sorted(shadowed - OVERRIDDEN) == [], f"revisit {FENCE} and workers/ingest/server.py"
    assert sorted(OVERRIDDEN - shadowed) == [], f"{FENCE}: aiosmtpd no longer has these"


# -- the address fast path -----------------------------------------------------------------

PATHS = [
    "<a@b.c>", "<a@b.c> SIZE=10", "<a@b.c>  SIZE=10 BODY=8BITMIME",
    "<first.last+tag@sub.example.com>",
    "<a..b@c.d>", "<.a@b.c>", "<a@b..c>", "<a@-b.c>", '<"q q"@b.c>', "<@relay:a@b.c>",
    "<a@[1.2.3.4]>", "<a@b.c>x", "< a@b.c>", "<a(c)@b.c>", "<postmaster>", "<>", "a@b.c",
    "<a@b.c> SMTPUTF8", "<jürgen@exämple.org>", "<a@b.c>\tSIZE=1",
]  # fmt: skip


async def test_fast_address_path_agrees_with_aiosmtpd() -> None:
    """The regex fast path for <local@domain> gives what aiosmtpd's own parser gives."""
    reference = smtp.SMTP(object())
    fast_hits = 0
    for path in PATHS:
        fast = simple_path(path)
        if fast is not None:
            fast_hits += 1
            assert fast == reference._getaddr(path), f"{FENCE} simple_path: {path}"
    assert fast_hits >= 6
