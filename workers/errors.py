"""Errors every command reports in one line, and the masking of secrets they and the logs get.

The lowest layer of the package: the streams layer raises these errors and config, the
roles and the log processors import them from here (config re-exports them).  Their
messages are masked as they are built, so a password put into one by a raise site never
reaches a terminal or a log: URL passwords (``scheme://user:password@``, ``?password=``,
``?sentinel_password=``) and every secret :func:`remember_secret` was given.
"""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus, unquote

MASK = "***"
# A remembered secret is masked wherever it appears in a log line or error message; one
# shorter than this is masked only where its place says so (a URL's password part, a
# password option), or every "pw" in every log line would turn into "***".
MIN_REMEMBERED_SECRET = 6


def mask_secrets(text: str) -> str:
    """``text`` with URL passwords and every remembered secret replaced by ``***``.

    It runs on every string of every log line: the regular expressions only run on text
    that can hold what they look for.
    """
    if "://" in text:
        text = _URL_PASSWORD.sub(_mask_url_match, text)
    if "=" in text:
        text = _QUERY_PASSWORD.sub(_mask_query_match, text)
    for secret in _remembered_secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class ConfigError(ValueError):
    """Bad configuration: the command stops at start with this one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(mask_secrets(message))  # whatever a raise site put in it


class Unavailable(RuntimeError):
    """A service the command needs cannot be used (Redis down, or not Redis at that URL):
    the command stops with this one-line message and exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(mask_secrets(message))


# scheme://user:password@ in any text; the password runs to the last "@" of the authority
# (an unencoded "@" in a password still ends up masked whole).
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:'\"]*:)(?P<password>[^\s/?#'\"]*)@"
)
# ?password=... (redis-py takes connection arguments from the query too), and the
# ?sentinel_password=... of a Sentinel URL
_QUERY_PASSWORD = re.compile(
    r"(?P<head>[?&](?:sentinel_)?(?:password|passwd)=)[^&#\s'\"]*", re.IGNORECASE
)


def _mask_url_match(match: re.Match[str]) -> str:
    return match.group("head") + (MASK if match.group("password") else "") + "@"


def _mask_query_match(match: re.Match[str]) -> str:
    return match.group("head") + MASK


def mask_url_password(url: str) -> str:
    """The URL with its password (user-info or ``?password=``) replaced by ``***``."""
    masked = _URL_PASSWORD.sub(_mask_url_match, url)
    return _QUERY_PASSWORD.sub(_mask_query_match, masked)


# Longest first, so that a secret containing another is masked whole.
_remembered_secrets: list[str] = []


def remember_secret(value: str | None) -> None:
    """Mask ``value`` (and its URL-encoded forms) in every later log line and error."""
    if not value or len(value) < MIN_REMEMBERED_SECRET:
        return
    forms = {value, unquote(value), quote(value, safe=""), quote_plus(value)}
    known = set(_remembered_secrets) | {f for f in forms if len(f) >= MIN_REMEMBERED_SECRET}
    _remembered_secrets[:] = sorted(known, key=len, reverse=True)
