"""structlog set-up: one event per line, JSON in production, readable on a terminal.

No secret reaches the output: a processor masks every URL password, every value of a field
whose name says password or secret, and every secret the configuration holds (remembered by
:mod:`workers.config`), in all fields including formatted exceptions.  The log lines of our
dependencies (stdlib logging) and tracebacks of uncaught exceptions go through the same mask.
The call sites pass masked values too; this is the net under them.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Any

import structlog

from workers.errors import MASK, mask_secrets

# Field names whose values are secrets whatever they hold (``*_file`` fields are paths).
SECRET_FIELD = re.compile(r"pass(word|wd|phrase)?($|_)|secret|credential|auth_users", re.I)
STDLIB_FORMAT = "%(levelname)s %(name)s %(message)s"
# Values that cannot hold text: logged as they are.
_PLAIN = (bool, int, float, type(None))


@functools.lru_cache(maxsize=1024)
def _is_secret_field(name: str) -> bool:
    # Cached: every log line asks this of each of its field names, and names repeat (a
    # tenth of the cost of ingest's one line per message).
    return bool(SECRET_FIELD.search(name)) and not name.endswith("_file")


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {key: _masked_field(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(item) for item in value]
    text = str(value)  # an exception or other object: rendered as text anyway
    masked = mask_secrets(text)
    return value if masked == text else masked


def _masked_field(name: str, value: Any) -> Any:
    if value and _is_secret_field(name):
        return MASK
    return _masked(value)


def mask_secrets_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: every field of the event with its secrets masked."""
    for name, value in event_dict.items():
        # Most fields of a line are text or numbers: those two without the general walk
        # (three calls each: a sixth of what one log line costs ingest).
        kind = value.__class__
        if kind is str:
            event_dict[name] = MASK if value and _is_secret_field(name) else mask_secrets(value)
        elif kind is int:
            if value and _is_secret_field(name):
                event_dict[name] = MASK
        else:
            event_dict[name] = _masked_field(name, value)
    return event_dict


class MaskingFormatter(logging.Formatter):
    """stdlib logging lines (and their tracebacks) with secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


def _masking_excepthook(
    kind: type[BaseException], error: BaseException, tb: TracebackType | None
) -> None:
    """An uncaught exception (a bug) still prints its traceback, but never a secret."""
    text = "".join(traceback.format_exception(kind, error, tb))
    sys.stderr.write(mask_secrets(text))


class UtcTimestamp:
    """structlog processor: ``timestamp``, UTC in ISO 8601 with microseconds
    (``2026-12-07T07:02:05.233784Z``); the date and time of day written once a second
    (structlog's TimeStamper writes them for each line: a tenth of what ingest's line
    costs)."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (0, "")  # the last line's second, and its text

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        whole, fraction = divmod(round(time.time() * 1_000_000), 1_000_000)
        second = self._second  # one read: another thread may replace it meanwhile
        if whole != second[0]:
            second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
            self._second = second
        event_dict["timestamp"] = f"{second[1]}.{fraction:06d}Z"
        return event_dict


def _json_line(event_dict: MutableMapping[str, Any], **_: Any) -> str:
    """JSONRenderer's serializer: one encoder made once (json.dumps makes one per call
    when given structlog's fallback); an object JSON has no form for is written as its
    repr, as structlog's fallback does."""
    return _JSON.encode(event_dict)


_JSON = json.JSONEncoder(default=repr)


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Route structlog (and stdlib logging of our dependencies) to stderr.

    ``auto`` picks console rendering when stderr is a terminal and JSON lines otherwise, so a
    developer sees readable output while Kubernetes gets one JSON object per line.
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if use_json
        else structlog.dev.ConsoleRenderer()
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            UtcTimestamp(),
            structlog.processors.format_exc_info,
            mask_secrets_processor,  # last before rendering: sees the formatted exception
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # One write per line: PrintLogger's print() made two (the line, then its newline),
        # each a system call on stderr.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging; keep their warnings, one line each, masked.
    root = logging.getLogger()
    if not root.handlers:  # else someone (a test runner) owns the root logger's output
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(MaskingFormatter(STDLIB_FORMAT))
        root.addHandler(handler)
        root.setLevel(max(numeric_level, logging.WARNING))
    sys.excepthook = _masking_excepthook
    # aiosmtpd logs every command at INFO and full tracebacks of client errors; we log our own.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
