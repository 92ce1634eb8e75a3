"""SMTP AUTH (PLAIN, LOGIN) for ``mailpool ingest``: credentials and the aiosmtpd authenticator.

Credentials come from ``--auth-file`` (one ``user:password`` per line, ``#`` comments) and/or
``--auth-users`` / ``MAILPOOL_AUTH_USERS`` (comma-separated pairs, for a Kubernetes Secret).
AUTH is offered only on TLS connections (aiosmtpd ``auth_require_tls``); passwords are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from workers.codec.dsn import DsnError, xtext_decode
from workers.config import ConfigError

log = structlog.get_logger("mailpool.ingest")

MECHANISMS = ("PLAIN", "LOGIN")
MAX_AUTH_PARAMETER = 500  # octets of xtext (RFC 4954 section 5)


class AuthParameterError(DsnError):
    """A malformed ``AUTH=`` MAIL parameter; ``reply`` is the 501 (a MAIL parameter error,
    answered as the DSN ones are)."""


def take_auth_parameter(params: list[str]) -> list[str]:
    """MAIL FROM's parameters without RFC 4954's ``AUTH=`` (``<>`` or the xtext of an
    address, given once), which a client such as Exim's ``authenticated_sender`` adds
    where AUTH is offered.  It is dropped: who submitted the message is what our own AUTH
    said, not what the client claims.  Raises :class:`AuthParameterError` when malformed."""
    rest: list[str] = []
    seen = False
    for param in params:
        keyword, _, value = param.partition("=")
        if keyword.upper() != "AUTH":
            rest.append(param)
            continue
        if seen:
            raise AuthParameterError("501 5.5.4 AUTH given twice")
        seen = True
        if value != "<>" and not _is_auth_xtext(value):
            raise AuthParameterError("501 5.5.4 Bad AUTH parameter: <> or an xtext address")
    return rest


def _is_auth_xtext(value: str) -> bool:
    if not value or len(value) > MAX_AUTH_PARAMETER:
        return False
    try:
        xtext_decode(value)
    except ValueError:
        return False
    return True


def _parse_pair(pair: str, where: str) -> tuple[str, str]:
    user, sep, password = pair.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{where}: expected user:password")
    return user, password


def load_credentials(auth_file: str | None, auth_users: str | None) -> dict[str, bytes]:
    """User name -> password bytes; raises ConfigError naming the bad line (never its text)."""
    credentials: dict[str, bytes] = {}
    if auth_file:
        try:
            lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--auth-file: cannot read {auth_file}: {exc}") from None
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                user, password = _parse_pair(stripped, f"--auth-file {auth_file} line {number}")
                credentials[user] = password.encode()
    if auth_users:
        for index, pair in enumerate(p for p in auth_users.split(",") if p.strip()):
            user, password = _parse_pair(pair.strip(), f"--auth-users entry {index + 1}")
            credentials[user] = password.encode()
    return credentials


class Authenticator:
    """aiosmtpd ``authenticator`` callable checking PLAIN/LOGIN user and password."""

    def __init__(self, credentials: dict[str, bytes]) -> None:
        self._credentials = credentials

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if mechanism not in MECHANISMS or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = data.login.decode("utf-8", "replace")
        expected = self._credentials.get(user)
        # Compare against something even for unknown users so timing does not tell them apart.
        ok = hmac.compare_digest(expected or b"\0" * 32, data.password) and expected is not None
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        log.info("auth", user=user[:64], peer=peer, success=ok, mechanism=mechanism)
        if ok:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)
