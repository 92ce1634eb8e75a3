"""What SPF relies on of pyspf beyond ``spf.query(...).check()``, in one place.

pyspf asks every DNS question through the module-global ``spf.DNSLookup(name, qtype,
strict, timeout)``, looked up when asked (``query.dns``).  It is replaced here, once, by a
function answering from the current evaluation's table of answers (a ContextVar, so
concurrent evaluations do not mix); a question the table lacks raises :class:`NeedLookup`,
which no ``except`` of pyspf's strict mode catches (but the one around the ``exp=``
explanation, whose text is not used).  :mod:`.spf` then asks DNS and runs the evaluation
again from the start: pyspf's own counters keep RFC 7208's limits (10 lookups, 2 void
lookups, 10 MX or PTR names) exactly.  Answers take the shapes ``DNSLookup_dnspython``
gives: A/AAAA an address, MX ``(preference, exchange)``, PTR a name without its final dot,
TXT the record's strings as bytes; none: ``[]``; a failure raises ``spf.TempError``.

Checked against pyspf 2.0.14 (``CHECKED_RELEASES``); tests/test_internals_pyspf.py fails,
naming this file, on another release.
"""

from __future__ import annotations

import contextvars
from typing import Any

import spf

from workers.verify.resolver import Answer

CHECKED_RELEASES = ">=2.0.14,<2.0.15"

Table = dict[tuple[str, str], Answer]
_answers: contextvars.ContextVar[Table] = contextvars.ContextVar("spf_answers")


class NeedLookup(Exception):  # a request, not an error
    """The evaluation needs this answer first."""

    def __init__(self, name: str, qtype: str) -> None:
        super().__init__(name, qtype)
        self.key = (name, qtype)


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    key = (name.lower().rstrip("."), qtype)
    answer = _answers.get().get(key)
    if answer is None:
        raise NeedLookup(*key)
    if answer.temporary:
        raise spf.TempError(f"DNS {name} {qtype}: no answer")
    if qtype in ("TXT", "SPF"):
        return [((name, qtype), strings) for strings in answer.strings]
    if qtype == "MX":
        pairs = (record.split(None, 1) for record in answer.records)
        return [((name, qtype), (int(pref), host.rstrip("."))) for pref, host in pairs]
    if qtype == "PTR":
        return [((name, qtype), record.rstrip(".")) for record in answer.records]
    return [((name, qtype), record) for record in answer.records]


spf.DNSLookup = _lookup


def evaluate(table: Table, ip: str, sender: str, helo: str) -> tuple[str, str]:
    """(result, explanation) of one evaluation over ``table``; raises :class:`NeedLookup`."""
    token = _answers.set(table)
    try:
        result, _code, explanation = spf.query(ip, sender, helo, strict=True).check()
    finally:
        _answers.reset(token)
    return str(result), str(explanation)
