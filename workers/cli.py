"""``mailpool`` command line: parse arguments, build the role's config, call the role.

Nothing here knows SMTP or Redis; each command names a config class and an async entry
point ``main(config) -> int`` in its role module, imported only when that command runs.
Whatever command fails, the operator gets one line on stderr, never a traceback: exit
status 2 for bad configuration (:class:`ConfigError`), 1 for a service it cannot use
(:class:`Unavailable`, e.g. Redis down or something else listening at the Redis URL).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

from workers import __version__
from workers.config import CommonConfig, ConfigError, Unavailable, add_arguments, from_arguments
from workers.logs import configure_logging

DESCRIPTION = "An email worker pool on Redis streams (the Email ASGI message format)."


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # role module with `main(config) -> int` and the config class
    config: str  # name of the config class in workers.config or the role module


COMMANDS = (
    Command(
        "run",
        "the whole pool in one process (ingest + delivery + housekeeping)",
        "workers.pool",
        "RunConfig",
    ),
    Command(
        "ingest",
        "SMTP server role: received mail -> email.receive",
        "workers.ingest",
        "IngestConfig",
    ),
    Command(
        "deliver", "delivery role: email.send -> SMTP relay", "workers.delivery", "DeliveryConfig"
    ),
    Command(
        "listen",
        "print email.receive messages of a consumer group as JSON lines",
        "workers.listen",
        "ListenConfig",
    ),
    Command("send", "enqueue one message on email.send", "workers.producer", "SendConfig"),
    Command(
        "status",
        "streams, groups, lag, pending, dead letters, retries",
        "workers.status",
        "StatusConfig",
    ),
    Command(
        "housekeep",
        "retention: trim streams safely, remove vanished consumers",
        "workers.housekeeping",
        "HousekeepConfig",
    ),
    Command("dead", "dead letters: list, show, replay, purge", "workers.deadletters", "DeadConfig"),
    Command(
        "redis-setup",
        "load the Redis functions the roles call (once per Redis, as an admin user)",
        "workers.redis_setup",
        "RedisSetupConfig",
    ),
)


def _config_class(command: Command) -> type[CommonConfig]:
    module = importlib.import_module(command.module)
    found = getattr(module, command.config, None)
    if found is None:
        found = getattr(importlib.import_module("workers.config"), command.config)
    return cast(type[CommonConfig], found)


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


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailpool", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mailpool {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for command in commands:
        try:
            config_class = _config_class(command)
        except (ImportError, AttributeError):
            continue  # a role that is not part of this build
        command_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        add_arguments(command_parser, config_class)
        extra = getattr(config_class, "add_positional_arguments", None)
        if extra is not None:
            extra(command_parser)
        command_parser.set_defaults(_command=command, _config_class=config_class)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args._command
    try:
        config = from_arguments(args._config_class, args)
    except ConfigError as exc:
        print(f"mailpool {command.name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    runner = cast(
        Callable[[Any], Coroutine[Any, Any, int]], importlib.import_module(command.module).main
    )
    try:
        return asyncio.run(runner(config))
    except ConfigError as exc:  # problems only visible at start (port in use, bad certificate)
        print(f"mailpool {command.name}: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"mailpool {command.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
