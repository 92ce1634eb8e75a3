"""structlog set-up: one event per line, JSON in production, readable on a terminal.

No secret reaches the output: a processor masks every URL password, every value of a field
whose name says password or secret, and every secret the configuration holds (remembered by
:mod:`workers.config`), in all fields including formatted exceptions.  The log lines of our
dependencies (stdlib logging) and tracebacks of uncaught exceptions go through the same mask.
The call sites pass masked values too; this is the net under them.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
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


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Route structlog (and stdlib logging of our dependencies) to stderr.

    ``auto`` picks console rendering when stderr is a terminal and JSON lines otherwise, so a
    developer sees readable output while Kubernetes gets one JSON object per line.
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_secrets_processor,  # last before rendering: sees the formatted exception
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
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
