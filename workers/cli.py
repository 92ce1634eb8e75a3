"""``mailpool`` command line: parse arguments, build the role's config, call the role.

Nothing here knows SMTP or Redis; ``COMMANDS`` names each command's config class and
async entry point ``main(config) -> int``, imported like any other module: a role module
that cannot be imported stops every command (``--help`` too) with its ImportError, it never
drops out of the list.  (The parser needs every config class, so nothing would be saved by
importing a role only when its command runs.)  Whatever command fails, the operator gets
one line on stderr, never a traceback: exit status 2 for bad configuration
(:class:`ConfigError`), 1 for a service it cannot use (:class:`Unavailable`, e.g. Redis
down or something else listening at the Redis URL).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from workers import (
    __version__,
    deadletters,
    delivery,
    dkim_records,
    housekeeping,
    ingest,
    listen,
    pool,
    producer,
    redis_setup,
    status,
    suppress,
)
from workers.codec.encode import is_utf8
from workers.config import (
    CommonConfig,
    ConfigError,
    DeliveryConfig,
    IngestConfig,
    Unavailable,
    add_arguments,
    from_arguments,
)
from workers.logs import configure_logging

DESCRIPTION = "An email worker pool on Redis streams (the Email ASGI message format)."


C = TypeVar("C", bound=CommonConfig)


@dataclass(frozen=True)
class Command(Generic[C]):
    name: str
    help: str
    config: type[C]
    main: Callable[[C], Coroutine[Any, Any, int]]  # the role's entry point


COMMANDS: tuple[Command[Any], ...] = (
    Command(
        "run",
        "the whole pool in one process (ingest + delivery + housekeeping)",
        pool.RunConfig,
        pool.main,
    ),
    Command(
        "ingest", "SMTP server role: received mail -> email.receive", IngestConfig, ingest.main
    ),
    Command("deliver", "delivery role: email.send -> SMTP relay", DeliveryConfig, delivery.main),
    Command(
        "listen",
        "print email.receive messages of a consumer group as JSON lines",
        listen.ListenConfig,
        listen.main,
    ),
    Command("send", "enqueue one message on email.send", producer.SendConfig, producer.main),
    Command(
        "status",
        "streams, groups, lag, pending, dead letters, retries",
        status.StatusConfig,
        status.main,
    ),
    Command(
        "housekeep",
        "retention: trim streams safely, remove vanished consumers",
        housekeeping.HousekeepConfig,
        housekeeping.main,
    ),
    Command(
        "dead",
        "dead letters: list, show, replay, purge",
        deadletters.DeadConfig,
        deadletters.main,
    ),
    Command(
        "suppress",
        "the suppression list: list, add, remove",
        suppress.SuppressConfig,
        suppress.main,
    ),
    Command(
        "dkim-records",
        "print the DNS TXT records to publish for a --dkim-keys table",
        dkim_records.DkimRecordsConfig,
        dkim_records.main,
    ),
    Command(
        "redis-setup",
        "load the Redis functions the roles call (once per Redis, as an admin user)",
        redis_setup.RedisSetupConfig,
        redis_setup.main,
    ),
)


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser that rejects arguments it does not know itself.

    argparse hands a sub-command's leftovers up to the top-level parser, whose error shows
    the top-level usage; a wrong flag after ``mailpool send`` should show ``send``'s.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(_without_values(extras))}")
        return parsed, extras


def _without_values(extras: Sequence[str]) -> list[str]:
    """Unknown arguments as the error shows them: the value of an unknown flag may be a
    secret (``--relay-pasword PW``, mistyped), so values are not echoed."""
    shown = []
    for arg in extras:
        if arg.startswith("-"):
            shown.append(arg.partition("=")[0] + ("=..." if "=" in arg else ""))
        elif not shown or shown[-1] != "...":
            shown.append("...")
    return shown


def build_parser(commands: Sequence[Command[Any]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailpool", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mailpool {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for command in commands:
        command_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        add_arguments(command_parser, command.config)
        extra = getattr(command.config, "add_positional_arguments", None)
        if extra is not None:
            extra(command_parser)
        command_parser.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    for position, argument in enumerate(arguments, 1):
        if not is_utf8(argument):  # an octet not UTF-8: a lone surrogate here
            # Not shown: it may be a password.  Redis's client failed on it with a traceback.
            parser.error(f"argument {position} is not valid UTF-8 text")
    # What other producers stored may hold any text (a lone surrogate from a JSON escape):
    # listed, it is escaped instead of ending the listing with a traceback.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = parser.parse_args(arguments)
    command: Command[Any] = args._command
    try:
        config = from_arguments(command.config, args)
    except ConfigError as exc:
        print(f"mailpool {command.name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    try:
        return asyncio.run(command.main(config))
    except ConfigError as exc:  # problems only visible at start (port in use, bad certificate)
        print(f"mailpool {command.name}: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"mailpool {command.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output left (``mailpool suppress list | head -1``): end quietly,
        # with the status of a command a SIGPIPE ended; stdout goes nowhere, so the final
        # flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
