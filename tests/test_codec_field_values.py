"""``field_values``: the header fields of one name as the parser reads them (where the header
block ends, what is a field, the fields beyond ``max_headers`` dropped), found by regex
searches: verification reads the From fields with it, and must see what the application
sees in the parsed message."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from workers.codec.parse import (
    DEFAULT_PARSE_LIMITS,
    _read_fields,
    _split_header_block,
    _State,
    field_values,
    parse_message,
)

_LINES = st.sampled_from([
    "From: a@b.example", "from:x@y.example", "FROM:\tq@r.example", "From : z@w.example",
    "From q@r Mon Dec  6", " continued", "\tcontinued@too.example", "Subject: s",
    ":nameless", "not a header", "", "X-Y: From: inner@x.example", "From:", "Fro m: no",
    "From:From Boss <boss@v.example>", "From::x@v.example", ":", "From x",
])  # fmt: skip


def _unfolded(value: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"", value)


def _as_the_parser_reads(data: bytes) -> list[bytes]:
    lines, _, _ = _split_header_block(data, 0, len(data))
    fields = _read_fields(lines, "headers", _State(DEFAULT_PARSE_LIMITS, data))
    limit = DEFAULT_PARSE_LIMITS.max_headers
    return [_unfolded(value) for name, value in fields[:limit] if name.lower() == "from"]


@given(st.lists(_LINES, max_size=12), st.sampled_from([b"\r\n", b"\n"]))
def test_the_from_fields_are_the_parsers(lines: list[str], newline: bytes) -> None:
    data = newline.join(line.encode() for line in lines) + newline + b"body From: no@x.example"
    found = [_unfolded(value) for value in field_values(data, b"from")]
    assert found == _as_the_parser_reads(data)


def test_fields_beyond_the_parsers_limit_are_not_read() -> None:
    limit = DEFAULT_PARSE_LIMITS.max_headers
    filler = b"X-Filler: x\r\n" * (limit - 2)
    data = filler + b"From: kept@a.example\r\nTo: b\r\nFrom: dropped@c.example\r\n\r\nbody"
    assert field_values(data, b"from") == [b"kept@a.example"]
    parsed = parse_message(data, mail_from=None, rcpt_tos=["b@x.example"])
    assert parsed["headers"]["from"] == "kept@a.example"


def test_a_field_line_that_looks_like_a_dropped_one_is_kept() -> None:
    """Only the lines after the field's own can be ones the parser drops: a From whose
    value starts "From " is still the author the application reads."""
    data = b"From:From Boss <boss@v.example>\r\n:\r\n <me@a.example>\r\n\r\nbody"
    assert [_unfolded(v) for v in field_values(data, b"from")] == _as_the_parser_reads(data)
    assert field_values(data, b"from")[0].startswith(b"From Boss <boss@v.example>")
