"""Library internals mailpool reaches into, checked against the releases they were written for.

A few modules use what a library does not promise to keep: private attributes, a copy of a
constructor, the exact form of a low-level call.  Each test here states the range of releases
that code was written and checked against, and fails, naming the file to revisit, when the
installed release is outside it or no longer has what the code uses.  Nothing falls back
silently here: after checking the new release against that file, widen the range (and the
bound in pyproject.toml where there is one).

pyproject caps the libraries whose private parts are used (aiosmtpd, aiosmtplib); for the
others (public but low-level calls) the range below is only what was checked, so a new major
release is allowed to users and fails here until someone looked at it.
"""

from __future__ import annotations

import asyncio
import sys
from importlib import metadata
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import workers.ingest.server as ingest_server


def check_release(distribution: str, written_for: str, revisit: str) -> Version:
    """The installed release of ``distribution``; fails loudly outside ``written_for``."""
    installed = Version(metadata.version(distribution))
    if installed not in SpecifierSet(written_for):
        pytest.fail(
            f"{distribution} {installed} is installed, but {revisit} was written for "
            f"{distribution}{written_for}: check that code against {installed}, then widen "
            "the range in tests/test_library_internals.py (and pyproject.toml)"
        )
    return installed


def missing_names(owner: object, names: list[str]) -> list[str]:
    return [name for name in names if not hasattr(owner, name)]


# -- aiosmtpd: workers/ingest/server.py ------------------------------------------------------

SERVER = "workers/ingest/server.py"


def test_aiosmtpd_is_the_release_the_fast_constructor_copies() -> None:
    """FAST_INIT copies aiosmtpd 1.4.6's SMTP.__init__; with any other release the sessions
    quietly take the stock (slower) constructor, so the suite says so instead."""
    import aiosmtpd

    check_release("aiosmtpd", "==1.4.6", f"{SERVER} (IngestSMTP._init_known_release)")
    assert aiosmtpd.__version__ == metadata.version("aiosmtpd"), "FAST_INIT reads __version__"
    assert ingest_server.FAST_INIT, f"{SERVER}: FAST_INIT is off for aiosmtpd 1.4.6"


def test_aiosmtpd_still_has_what_the_ingest_session_uses() -> None:
    from aiosmtpd import smtp

    check_release("aiosmtpd", ">=1.4.6,<1.5", SERVER)
    overridden_or_called = [
        "_getaddr", "_call_handler_hook", "_create_envelope", "_reset_timeout", "_timeout_cb",
        "_cb_client_connected", "check_helo_needed", "check_auth_needed", "push",
        "auth_LOGIN", "auth_PLAIN", "line_length_limit", "command_size_limit",
    ]  # fmt: skip
    assert not missing_names(smtp.SMTP, overridden_or_called), f"revisit {SERVER}"
    imported = ["MISSING", "_AuthMechAttr", "login_always_fail", "syntax"]
    assert not missing_names(smtp, imported), f"revisit {SERVER}"


class _Handler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def _session_attributes(monkeypatch: pytest.MonkeyPatch, *, fast: bool) -> dict[str, Any]:
    """The attributes of a new ingest session built by the fast or the stock constructor."""
    monkeypatch.setattr(ingest_server, "FAST_INIT", fast)
    limits = ingest_server.SessionLimits(
        hostname="mx.test", max_size=1000, command_timeout=5, connection_timeout=60,
        require_tls=False, auth_required=False,
    )  # fmt: skip
    server = ingest_server.IngestServer(
        _Handler(), limits, listen="127.0.0.1:0", authenticator=lambda *args: None
    )
    return vars(server._factory(False)())


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
    assert sorted(set(stock) ^ set(fast)) == [], f"revisit {SERVER} _init_known_release"
    differing = sorted(k for k in stock if _comparable(stock[k]) != _comparable(fast[k]))
    assert differing == [], f"revisit {SERVER} _init_known_release"


# -- asyncio (CPython): workers/ingest/data.py -------------------------------------------------

DATA = "workers/ingest/data.py (_unread: StreamReader._buffer)"


async def test_stream_reader_buffer_takes_back_unread_bytes() -> None:
    from workers.ingest.data import _unread

    version = sys.version_info[:2]
    assert sys.implementation.name == "cpython", f"revisit {DATA} for {sys.implementation.name}"
    assert (3, 11) <= version <= (3, 13), f"revisit {DATA} for Python {version}"
    reader = asyncio.StreamReader()
    reader.feed_data(b"QUIT\r\n")
    _unread(reader, b"NOOP\r\n")  # bytes read past the end of DATA, given back
    assert [await reader.readline(), await reader.readline()] == [b"NOOP\r\n", b"QUIT\r\n"]
