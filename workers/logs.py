"""structlog set-up: one event per line, JSON in production, readable on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging; keep their warnings, one line each.
    logging.basicConfig(
        level=max(numeric_level, logging.WARNING),
        stream=sys.stderr,
        format="%(levelname)s %(name)s %(message)s",
    )
    # aiosmtpd logs every command at INFO and full tracebacks of client errors; we log our own.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
