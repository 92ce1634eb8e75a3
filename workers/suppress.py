"""``mailpool suppress list | add ADDRESS... | remove ADDRESS...``: the suppression list.

Delivery does not attempt a recipient on the list (a dead letter and an event with reason
``suppressed``); it adds the recipients a relay refuses as addresses, for ``--suppress-ttl``
(:mod:`workers.streams.suppression`).  ``add`` puts addresses on it by hand, for ``--ttl``
seconds (0: until removed), with a ``--note`` kept as its text; ``remove`` takes them off
(sends to them are attempted again).  ``mailpool dead replay`` sends a dead letter even to
a suppressed recipient: replaying is the operator's decision.  Partitioned, every
partition's copy is changed and ``list`` shows them merged.  Addresses are kept in lower
case.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass

from workers.codec.build import envelope_address
from workers.codec.errors import BuildError
from workers.config import CommonConfig, ConfigError, check_suppress_ttl, option
from workers.streams.connection import one_shot_partitions
from workers.streams.suppression import (
    REASON_MANUAL,
    Suppression,
    SuppressionList,
    describe_until,
    normalise,
)

ACTIONS = ("list", "add", "remove")


@dataclass
class SuppressConfig(CommonConfig):
    """``mailpool suppress``: list, add and remove suppressed recipients."""

    _action: str = option("list", "list, add or remove (positional)")
    _addresses: list[str] = option([], "addresses (positional)", repeatable=True)
    ttl: float = option(0.0, "add: seconds the addresses stay suppressed (0: until removed)")
    note: str = option("", "add: why, kept with each address (list shows it)")
    json: bool = option(False, "list: print JSON lines instead of a table")

    @staticmethod
    def add_positional_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("_action", metavar="ACTION", choices=ACTIONS, help=" | ".join(ACTIONS))
        parser.add_argument("_addresses", metavar="ADDRESS", nargs="*", help="recipient addresses")

    def validate(self) -> None:
        super().validate()
        if self._action not in ACTIONS:
            raise ConfigError(f"ACTION: {self._action!r} is not one of {', '.join(ACTIONS)}")
        if self._action != "list" and not self._addresses:
            raise ConfigError(f"suppress {self._action}: give one or more addresses")
        if self._action == "list" and self._addresses:
            raise ConfigError("suppress list takes no addresses")
        # Strict for add (a typo lists nothing useful); remove takes whatever the list may
        # hold, delivery's own additions included (it sends to bob@exa_mple.com if asked).
        check = address_problem if self._action == "add" else _listable_problem
        for address in self._addresses:
            problem = check(address)
            if problem is not None:
                raise ConfigError(f"suppress {self._action}: not an address: {problem}")
        check_suppress_ttl(self.ttl, "--ttl")

    @property
    def action(self) -> str:
        return self._action

    @property
    def addresses(self) -> list[str]:
        return sorted({normalise(a) for a in self._addresses})


# Labels of letters, digits and hyphens (no hyphen first or last), as A-labels have them.
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")  # fmt: skip


MAX_LOCAL_PART = 64  # octets: no relay need take a longer one (RFC 5321 4.5.3.1.1)


def address_problem(address: str) -> str | None:
    """Why ``address`` could name no recipient of a send, or None: it must be an envelope
    address delivery takes, with one ``@`` outside a quoted local part and a host name or
    an address literal after it."""
    try:
        ascii_form, _ = envelope_address(address, "ADDRESS")
    except BuildError as exc:
        return exc.reason  # it names the address
    local, at, domain = ascii_form.rpartition("@")
    if not at:  # delivery's bare "postmaster"
        return f"{address!r} has no domain"
    if len(local.encode()) > MAX_LOCAL_PART:  # RFC 5321 section 4.5.3.1.1
        return f"the local part of {address[:40]!r}... is over {MAX_LOCAL_PART} octets"
    if "@" in local and not (local.startswith('"') and local.endswith('"')):
        return f"{address!r} has more than one @"
    literal = domain.startswith("[") and domain.endswith("]")
    if not literal and _DOMAIN.fullmatch(domain.rstrip(".")) is None:
        return f"the domain of {address!r} is not a host name"
    return None


def _listable_problem(address: str) -> str | None:
    """Why ``address`` cannot be on the list at all, or None."""
    if "@" not in address or any(c.isspace() or c in "<>" for c in address):
        return f"{address!r} has no @, or spaces or <> in it"
    return None


async def main(config: SuppressConfig) -> int:
    keys = config.partition_keys()
    async with one_shot_partitions(config.redis_url, keys) as clients:
        suppressions = SuppressionList(list(zip(clients, keys, strict=True)))
        if config.action == "add":
            now = time.time()
            until = now + config.ttl if config.ttl else math.inf
            await suppressions.add(
                [Suppression(a, until, REASON_MANUAL, now, text=config.note)
                 for a in config.addresses],
                replace=True,
            )  # fmt: skip
            print(f"suppressed {len(config.addresses)} until {describe_until(until)}")
        elif config.action == "remove":
            found = await suppressions.remove(config.addresses)
            print(f"removed {found} of {len(config.addresses)}")
            if found < len(config.addresses):
                return 1
        else:
            _print(await suppressions.entries(), as_json=config.json)
    return 0


def _print(entries: list[Suppression], *, as_json: bool) -> None:
    if as_json:
        for entry in entries:
            print(json.dumps(entry.as_json()))
        return
    if not entries:
        print("no suppressed recipients")
        return
    print(f"{'ADDRESS':<40} {'UNTIL':<20} {'REASON':<9} WHY")
    for e in entries:
        said = f"{e.code} {e.text}" if e.code else e.text
        print(f"{e.address:<40} {describe_until(e.until):<20} {e.reason:<9} {said}".rstrip())
    sys.stdout.flush()
