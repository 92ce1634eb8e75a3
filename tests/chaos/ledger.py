"""A queue checker in the spirit of Jepsen's: count what went in and what came out.

Every generated message carries a unique ledger id (``new_id()``; in a header
``X-Ledger-Id`` or a subject token ``[ledger:<id>]``).  A scenario records per id:

- ``sent``: the test tried to hand it over;
- ``accepted``: the client saw ``250`` (or ``XADD`` returned an id) -- a promise was made;
- ``indeterminate``: a timeout or disconnect after DATA -- no promise, but it may be stored;
- ``rejected``: a definitive refusal (4xx/5xx reply) -- no promise;
- outcomes by kind (``stored`` in ``email.receive``, ``delivered`` at a sink, ``dead``
  letter), a list per kind so that repeats show up as duplicates.

Then ``lost`` = accepted minus the union of the outcome kinds that settle a message,
``duplicates`` = outcomes of a kind minus its distinct ids, and ``phantoms`` = ids with an
outcome although the client was told no (a retrying sender would make them duplicates).
``report()`` prints one ``FIGURE`` line and adds the figures to ``$MAILPOOL_CHAOS_FIGURES``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HEADER = "X-Ledger-Id"
SUBJECT_TOKEN = re.compile(r"\[ledger:([A-Za-z0-9_.-]+)\]")
_RAW_HEADER = re.compile(rb"^X-Ledger-Id:[ \t]*([A-Za-z0-9_.-]+)[ \t]*\r?$", re.I | re.M)
FIGURES_ENV = "MAILPOOL_CHAOS_FIGURES"
SETTLING_KINDS = ("delivered", "dead")


def new_id(prefix: str = "L") -> str:
    """A fresh ledger id: short, header- and subject-safe, unique across runs."""
    return f"{prefix}{uuid.uuid4().hex[:20]}"


def subject_with(ledger_id: str, text: str = "chaos") -> str:
    return f"{text} [ledger:{ledger_id}]"


def id_in_headers(headers: Mapping[str, str]) -> str | None:
    """The ledger id of a decoded message (``headers`` of an email.receive/email.send
    message: lower-cased names), from ``X-Ledger-Id`` or else the subject token."""
    value = headers.get(HEADER.lower())
    if value:
        return value.split("\n", 1)[0].strip()
    match = SUBJECT_TOKEN.search(headers.get("subject", ""))
    return match.group(1) if match else None


def id_in_raw(raw: bytes) -> str | None:
    """The ledger id in raw message bytes (what a sink or a maildir file holds)."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _RAW_HEADER.search(head)
    if match:
        return match.group(1).decode("ascii")
    token = SUBJECT_TOKEN.search(head.decode("utf-8", "replace"))
    return token.group(1) if token else None


class Ledger:
    """What went in and what came out of one scenario; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: set[str] = set()
        self.accepted: dict[str, str | None] = {}  # id -> receipt (entry id, queue id)
        self.indeterminate: set[str] = set()
        self.rejected: dict[str, int] = {}  # id -> last reply code
        self.outcomes: dict[str, list[str]] = {}
        self.retried: set[str] = set()  # accepted after a refusal or an indeterminate try

    # -- recording ---------------------------------------------------------------------
    def send(self, ledger_id: str) -> None:
        self.sent.add(ledger_id)

    def accept(self, ledger_id: str, receipt: str | None = None) -> None:
        """The client got its promise.  Accepted wins over earlier refusals (a retry)."""
        self.sent.add(ledger_id)
        if ledger_id in self.rejected or ledger_id in self.indeterminate:
            self.retried.add(ledger_id)
        self.accepted[ledger_id] = receipt
        self.indeterminate.discard(ledger_id)
        self.rejected.pop(ledger_id, None)

    def mark_indeterminate(self, ledger_id: str) -> None:
        self.sent.add(ledger_id)
        if ledger_id not in self.accepted:
            self.indeterminate.add(ledger_id)

    def reject(self, ledger_id: str, code: int) -> None:
        self.sent.add(ledger_id)
        if ledger_id not in self.accepted:
            self.rejected[ledger_id] = code

    def record(self, kind: str, ledger_id: str) -> None:
        """One observed outcome (``stored``, ``delivered``, ``dead``, ...); repeats count."""
        self.outcomes.setdefault(kind, []).append(ledger_id)

    def record_all(self, kind: str, ledger_ids: Iterable[str | None]) -> None:
        for ledger_id in ledger_ids:
            if ledger_id is not None:
                self.record(kind, ledger_id)
        self.outcomes.setdefault(kind, [])

    # -- checking ----------------------------------------------------------------------
    def settled(self, kinds: Iterable[str] = SETTLING_KINDS) -> set[str]:
        found: set[str] = set()
        for kind in kinds:
            found.update(self.outcomes.get(kind, ()))
        return found

    def lost(self, kinds: Iterable[str] = SETTLING_KINDS) -> set[str]:
        """Accepted ids with none of the outcomes ``kinds``: promises broken."""
        return set(self.accepted) - self.settled(kinds)

    def duplicates(self, kind: str = "delivered") -> int:
        """Outcomes of ``kind`` minus distinct ids: every extra copy counts once."""
        seen = self.outcomes.get(kind, [])
        return len(seen) - len(set(seen))

    def duplicate_ids(self, kind: str = "delivered") -> dict[str, int]:
        return {i: n for i, n in Counter(self.outcomes.get(kind, [])).items() if n > 1}

    def unexplained_duplicates(self, kind: str = "delivered") -> dict[str, int]:
        """Duplicated ids the client never had to retry: one 250 (one XADD id) and yet
        several outcomes, so the copies were made behind the client's back."""
        return {i: n for i, n in self.duplicate_ids(kind).items() if i not in self.retried}

    def phantoms(self, kinds: Iterable[str] = SETTLING_KINDS) -> set[str]:
        """Ids with an outcome although the client was refused: a retrying sender's
        duplicates (allowed by SMTP, but counted)."""
        return set(self.rejected) & self.settled(kinds)

    def strangers(self, kinds: Iterable[str] = SETTLING_KINDS) -> set[str]:
        """Ids with an outcome that this ledger never sent: a bug of the scenario or the
        product (a message made up or mixed up)."""
        return self.settled(kinds) - self.sent

    def summary(self, kinds: Iterable[str] = SETTLING_KINDS, **extra: Any) -> dict[str, Any]:
        kinds = tuple(kinds)
        figures: dict[str, Any] = {
            "sent": len(self.sent),
            "accepted": len(self.accepted),
            "indeterminate": len(self.indeterminate),
            "rejected": len(self.rejected),
        }
        for kind in sorted(self.outcomes):
            figures[kind] = len(set(self.outcomes[kind]))
        figures["lost"] = len(self.lost(kinds))
        figures["dup"] = sum(self.duplicates(kind) for kind in kinds)
        figures["phantoms"] = len(self.phantoms(kinds))
        figures.update(extra)
        return figures

    def report(self, kinds: Iterable[str] = SETTLING_KINDS, **extra: Any) -> dict[str, Any]:
        """Print one ``FIGURE <name>: k=v ...`` line; add the figures to the JSON file."""
        figures = self.summary(kinds, **extra)
        print(figure_line(self.name, figures))
        write_figures(self.name, figures)
        return figures

    def check(self, kinds: Iterable[str] = SETTLING_KINDS, *, max_duplicates: int = 0) -> None:
        """Assert the guarantee: nothing accepted is lost, duplicates within the bound,
        nothing settled that was never sent."""
        kinds = tuple(kinds)
        lost = self.lost(kinds)
        assert not lost, f"{self.name}: {len(lost)} accepted but lost, e.g. {sorted(lost)[:5]}"
        dup = sum(self.duplicates(kind) for kind in kinds)
        assert dup <= max_duplicates, f"{self.name}: {dup} duplicates > {max_duplicates}"
        strangers = self.strangers(kinds)
        assert not strangers, f"{self.name}: outcomes never sent: {sorted(strangers)[:5]}"


def figure_line(name: str, figures: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    return f"FIGURE {name}: " + " ".join(f"{k}={show(v)}" for k, v in figures.items())


def write_figures(name: str, figures: Mapping[str, Any]) -> Path | None:
    """Merge ``figures`` under ``name`` into ``$MAILPOOL_CHAOS_FIGURES``: a ``.json`` file,
    or a directory that gets ``<name>.json``.  Nothing when the variable is unset."""
    target = os.environ.get(FIGURES_ENV)
    if not target:
        return None
    path = Path(target)
    if path.suffix != ".json" or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{name}.json"
        data: dict[str, Any] = {}
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = dict(figures)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
