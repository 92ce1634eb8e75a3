"""Codec benchmark: parse and build rates next to the stdlib baseline measured in the same run.

    python bench/codec.py            # ~1 minute
    python bench/codec.py --quick    # a few seconds

Parse baseline: ``BytesParser(policy=policy.default)`` walking the tree, reading every header
and decoding every leaf (what a consumer of the stdlib pays to see the whole message).
Build baseline: ``EmailMessage`` + ``as_bytes()`` for the same content.
Ratios are ours/stdlib in messages per second: higher is better for us.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.codec.parse import parse_message


@dataclass(frozen=True)
class Case:
    """One benchmark message, described once and built by both implementations."""

    label: str
    headers: dict[str, str]
    text: str
    html: str | None = None
    attachment: bytes | None = None
    filename: str | None = None


def make_cases() -> list[Case]:
    words = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
    rng = random.Random(1)
    lines = [" ".join(rng.choice(words) for _ in range(11)) for _ in range(24)]
    headers = {
        "From": "Alice Example <alice@example.com>",
        "To": "Bob <bob@example.org>, carol@example.net",
        "Subject": "Quarterly numbers – première version",
        "Date": "Mon, 23 Nov 2026 21:00:00 +0000",
        "Message-ID": "<bench@example.com>",
    }
    return [
        Case("(a) 2 KB text", headers, "\n".join(lines) + "\n"),
        Case(
            "(b) 20 KB alternative + 15 KB file",
            headers,
            "Hello Bob,\n\nthe report is attached.\n" * 20,
            "<p>Hello Bob,</p><p>the report is attached.</p>\n" * 20,
            random.Random(2).randbytes(15_000),
            "rapport-été.bin",
        ),
        Case("(c) 1 MB attachment", headers, "See attachment.\n", None,
             random.Random(3).randbytes(1 << 20), "big.bin"),
    ]  # fmt: skip


def stdlib_build(case: Case) -> bytes:
    """Build baseline: EmailMessage + as_bytes()."""
    message = EmailMessage()
    for name, value in case.headers.items():
        message[name] = value
    message.set_content(case.text)
    if case.html is not None:
        message.add_alternative(case.html, subtype="html")
    if case.attachment is not None:
        message.add_attachment(
            case.attachment,
            maintype="application",
            subtype="octet-stream",
            filename=case.filename,
        )
    return message.as_bytes()


def send_message(case: Case) -> dict[str, Any]:
    """The same message as an ``email.send`` spec message."""
    text: dict[str, Any] = {"content-type": "text/plain; charset=utf-8", "body": case.text}
    body: dict[str, Any] = text
    if case.html is not None:
        html = {"content-type": "text/html; charset=utf-8", "body": case.html}
        body = {"content-type": "multipart/alternative", "parts": [text, html]}
    if case.attachment is not None:
        attachment = {
            "content-type": "application/octet-stream",
            "filename": case.filename,
            "body": case.attachment,
        }
        body = {"content-type": "multipart/mixed", "parts": [body, attachment]}
    return {
        "from": "alice@example.com",
        "to": ["bob@example.org", "carol@example.net"],
        "headers": {name.lower(): value for name, value in case.headers.items()},
        "content": body,
    }


def stdlib_parse(raw: bytes) -> None:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    for part in message.walk():
        for _name, value in part.items():
            str(value)
        if not part.is_multipart():
            part.get_payload(decode=True)


def ours_parse(raw: bytes) -> None:
    parse_message(raw, mail_from="alice@example.com", rcpt_tos=["bob@example.org"])


def rate(function: Callable[[], object], budget: float) -> float:
    """Messages per second: best of three rounds, each about budget/3 seconds."""
    function()  # warm caches and imports
    best = 0.0
    for _ in range(3):
        count = 0
        start = time.perf_counter()
        deadline = start + budget / 3
        while True:
            function()
            count += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, count / (now - start))
    return best


def row(label: str, ours: float, theirs: float) -> str:
    return f"  {label:<34} {ours:>11,.0f} {theirs:>11,.0f} {ours / theirs:>8.1f}x"


def bench_build(cases: list[Case], budget: float) -> None:
    try:
        from workers.codec.build import build_message
    except ImportError as error:
        print(f"\nbuild: skipped, workers.codec.build is not importable yet ({error})")
        return
    from tests.corpus_util import Mismatch, compare_with_stdlib

    print()
    for case in cases:
        built = build_message(send_message(case), default_id="bench-1")  # type: ignore[arg-type]
        try:
            compare_with_stdlib(built.data)
        except Mismatch as error:
            print(f"  {case.label}: built message reads differently in stdlib: {error}")
        else:
            print(f"  {case.label}: built message reads the same in stdlib and in parse")
    print("\nbuild                                   ours/s    stdlib/s    ratio")
    for case in cases:
        send = send_message(case)

        def ours(send: dict[str, Any] = send) -> object:
            return build_message(send, default_id="bench-1", now=1_700_000_000.0)  # type: ignore[arg-type]

        def theirs(case: Case = case) -> object:
            return stdlib_build(case)

        print(row(case.label, rate(ours, budget), rate(theirs, budget)))


def print_agreement(cases: list[Case], raws: list[bytes]) -> None:
    """Speed only counts with equal results: compare each case with the stdlib reading."""
    from tests.corpus_util import Mismatch, compare_with_stdlib

    for case, raw in zip(cases, raws, strict=True):
        try:
            compare_with_stdlib(raw)
        except Mismatch as error:
            print(f"  {case.label}: parse DIFFERS from stdlib policy.default: {error}")
        else:
            print(f"  {case.label}: parse gives the same headers and bodies as policy.default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (a few seconds)")
    args = parser.parse_args()
    budget = 0.25 if args.quick else 3.0
    cases = make_cases()
    raws = [stdlib_build(case) for case in cases]
    print(f"python {sys.version.split()[0]}, budget {budget:.2f} s per measurement")
    for case, raw in zip(cases, raws, strict=True):
        print(f"  {case.label}: {len(raw):,} bytes")
    print_agreement(cases, raws)
    print("\nparse                                   ours/s    stdlib/s    ratio")
    for case, raw in zip(cases, raws, strict=True):
        ours = rate(lambda raw=raw: ours_parse(raw), budget)
        theirs = rate(lambda raw=raw: stdlib_parse(raw), budget)
        print(row(case.label, ours, theirs))
    bench_build(cases, budget)


if __name__ == "__main__":
    main()
