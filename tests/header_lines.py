"""Header lines of every kind the parser tells apart, and the header blocks made of them:
the corpus of the differential tests that hold a shortcut to the reading it spares."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

LINES = [
    b"Subject: a", b"Subject:b", b"To:\t x@y.example ", b" cont", b"\tcont", b"From x",
    b"From: a@b.example", b":nameless", b"X-8: \xc3\xa9", b"X-Enc: =?utf-8?q?a?=",
    b"X-Ctl: a\x01b", b"X-CR: a\rb", b"bad line", b"X: ", b"Content-Type: text/plain;",
]  # fmt: skip


def header_blocks(lines: list[bytes], count: int) -> Iterator[tuple[bytes, bytes]]:
    """(header lines, empty line) for every choice of ``count`` of ``lines``, each ending in
    CRLF or LF, and an empty line of either kind or none."""
    for chosen in itertools.product(lines, repeat=count):
        for endings in itertools.product([b"\r\n", b"\n"], repeat=count):
            block = b"".join(line + end for line, end in zip(chosen, endings, strict=True))
            for empty in (b"\r\n", b"\n", b""):
                yield block, empty
