"""Parse: raw RFC 5322 bytes + SMTP envelope -> spec ``email.receive`` message.

A single-pass splitter over bytes instead of ``email.parser``: the stdlib feed parser works
line by line in Python and costs about as much as the whole budget on a 20 KB message, and
``policy.default`` re-parses every header on access.  The splitting rules follow the stdlib
feed parser (header line syntax, boundary lines, preamble/epilogue, missing boundaries), so
results agree with it on the CPython email corpus; bodies are decoded with ``binascii``.

Nothing here raises on any input: every irregularity becomes a "path: description" defect
and the parse continues best-effort, bounded by :class:`ParseLimits`.
"""

from __future__ import annotations

import binascii
import functools
import io
import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from workers.codec.headers import (
    ADDRESS_FIELDS,
    decode_address_value,
    decode_header_value,
    media_type,
    mime_params,
    replace_line_breaks,
    unfold,
)
from workers.codec.report import delivery_report
from workers.codec.types import SCHEMA_VERSION, Content, ReceiveMessage

__all__ = [
    "DEFAULT_PARSE_LIMITS",
    "HeaderBlock",
    "ParseLimits",
    "field_values",
    "parse_message",
    "read_fields",
    "read_header_block",
]

DEFAULT_CONTENT_TYPE = "text/plain; charset=us-ascii"
DIGEST_CONTENT_TYPE = "message/rfc822"
_MAX_DEFECTS = 200


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on the work one message may cause; beyond them the parse degrades, never fails.

    max_depth: multipart nesting; a deeper multipart is kept as an opaque body.  30 keeps
        the deepest map of the message at msgpack depth 63, inside the wire limit of 64
        (each multipart level adds a "parts" array and a content map).
    max_parts: content objects in the whole tree; a multipart that would exceed it is kept as
        an opaque body.
    max_headers: header fields per entity (message or part); further fields are dropped (the
        raw message is kept because a defect is recorded).
    max_value_len: characters of one decoded header value (4 MiB, under the wire's 10 MiB
        str limit); a longer value is cut with a defect.
    max_defects: defect strings kept; one final entry says how many were left out.
    """

    max_depth: int = 30
    max_parts: int = 10_000
    max_headers: int = 10_000
    max_value_len: int = 4 * 1024 * 1024
    max_defects: int = _MAX_DEFECTS


DEFAULT_PARSE_LIMITS = ParseLimits()

# A header line as the stdlib feed parser recognises it: a field name of printable ASCII
# without ":" followed by ":", a continuation line, or a Unix "From " envelope line.
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_BOUNDARY_TAIL = re.compile(rb"(--)?[ \t]*\r?(?=\n|\Z)")
# A field value that decoding only unfolds (address fields too: no "=?", no decoding):
# printable ASCII and tabs, folded over lines or not.
_PLAIN_VALUE = re.compile(rb"(?:[\t\x20-\x3c\x3e-\x7e]++|=(?!\?)|\r\n(?=[\t ]))*+")
# Content-Type parameters, and the names of those given in RFC 2231 form.
_TypeParams = tuple[dict[str, str], frozenset[str]]
_PLAIN_MEDIA_TYPE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+/[a-z0-9!#$%&'*+.^_`|~-]+")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n \t"
_IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")
# Leaf bodies are decoded from a view of the message buffer, a window of this many octets
# at a time where a step needs bytes of its own: a large body never has a whole copy of
# its encoded form next to the decoded one (ingest's memory: about twice the message).
_WINDOW = 1 << 20
_CRLF = re.compile(rb"\r\n")
_SUBSTITUTED_UP_TO = 1 << 16


def _lf(data: bytes) -> bytes:
    """``data`` with CRLF turned into LF.  A regex substitution takes half the time of
    bytes.replace, which searches afresh for every line end (17 against 34 us for 20 KB of
    80-octet lines), but holds each line as an object of its own until it joins them: a
    large body (the memory budget counts it once) is left to bytes.replace."""
    if len(data) <= _SUBSTITUTED_UP_TO:
        return _CRLF.sub(b"\n", data)
    return data.replace(b"\r\n", b"\n")


@dataclass
class _State:
    """What one parse accumulates while it walks the tree."""

    limits: ParseLimits
    data: bytes  # the whole message; entities are spans of it
    header_block: HeaderBlock | None = None  # the message's, when the caller read it
    defects: list[str] = field(default_factory=list)
    dropped_defects: int = 0
    parts: int = 0

    def defect(self, path: str, description: str) -> None:
        if len(self.defects) < self.limits.max_defects:
            self.defects.append(f"{path}: {description}")
        else:
            self.dropped_defects += 1

    def final_defects(self) -> list[str]:
        if self.dropped_defects:
            return [*self.defects, f"message: {self.dropped_defects} further defects omitted"]
        return self.defects


@dataclass
class _Entity:
    """One message or MIME part: its decoded fields and where its raw body lies.

    Bodies stay spans of the one message buffer until a leaf needs its octets: slicing at
    every level would copy a deeply nested message once per level.
    """

    fields: list[tuple[str, str]]  # (name as sent, decoded value)
    raw_content_type: str | None
    raw_cte: str | None
    raw_disposition: str | None
    data: bytes  # the whole message
    body_start: int
    body_end: int

    def body(self) -> bytes:
        return self.data[self.body_start : self.body_end]

    def body_view(self) -> memoryview:
        return memoryview(self.data)[self.body_start : self.body_end]


# ---------------------------------------------------------------------------------------
# header block


# One field of a common header block (CRLF lines of printable ASCII and tabs, no "From "
# line, no line without a name): (name, value with its folds, the blanks after the colon
# left out), as _read_fields reads it.
_PLAIN_FIELD = re.compile(
    rb"([\041-\071\073-\176]++):[\t ]*+"
    rb"([\t\x20-\x7e]*+(?:\r\n[\t ][\t\x20-\x7e]*+)*+)\r\n"
)


def _plain_header_block(
    data: bytes, start: int, end: int
) -> tuple[list[tuple[str, bytes]], int] | None:
    """(fields, body start) of a common header block, read field by field from its start:
    when they run up to the first empty line, _split_header_block and _read_fields would
    read the same (else None, at the first other line: they read it, defects and all).
    Each match is anchored where the last ended, so the work is linear and stops there."""
    if data.startswith(b"\r\n", start, end):
        return [], start + 2
    stop = data.find(b"\r\n\r\n", start, end) + 2  # the empty line's start
    if stop < 2:
        return None
    fields = _plain_fields(data, start, stop)
    return (fields, stop + 2) if fields is not None else None


def _plain_fields(data: bytes, start: int, stop: int) -> list[tuple[str, bytes]] | None:
    """The common fields that make up ``data[start:stop]`` exactly, else None."""
    fields, position, read = [], start, _PLAIN_FIELD.match
    while position < stop:
        field = read(data, position, stop)
        if field is None:
            return None
        fields.append((field[1].decode("ascii"), field[2]))
        position = field.end()
    return fields


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    """A common header block as :func:`read_header_block` reads it: every field's name and
    raw value (folds kept, without the leading blanks and the final CRLF), and where the
    body starts (after the empty line)."""

    fields: list[tuple[str, bytes]]
    body_start: int

    def below(self, *above: HeaderBlock) -> HeaderBlock:
        """This block with the fields of ``above`` (:func:`read_fields` of octets put in
        front of the ones this was read from, in their order) before its own: what reading
        the joined octets gives."""
        fields: list[tuple[str, bytes]] = []
        offset = 0
        for block in above:
            fields += block.fields
            offset += block.body_start
        return HeaderBlock(fields + self.fields, offset + self.body_start)


def read_header_block(data: bytes) -> HeaderBlock | None:
    """The header block of ``data`` when it is a common one (CRLF lines of printable ASCII,
    each a field or its fold, up to an empty line); None for any other.  Handed to
    :func:`parse_message` with the same octets, it spares the parser reading them again."""
    plain = _plain_header_block(data, 0, len(data))
    return HeaderBlock(*plain) if plain is not None else None


def read_fields(data: bytes) -> HeaderBlock | None:
    """``data``, header fields only (each ending in CRLF, no empty line after them), read
    as :func:`read_header_block` reads them at the top of a message: the block a message
    gets below them is :meth:`HeaderBlock.below` this one.  None when one is not common."""
    fields = _plain_fields(data, 0, len(data))
    return HeaderBlock(fields, len(data)) if fields is not None else None


def _split_header_block(data: bytes, start: int, end: int) -> tuple[list[bytes], int, bool]:
    """(header lines, body start, separator missing) of the entity ``data[start:end]``.

    Follows the stdlib feed parser's rules and walks line by line, so the cost is bounded by
    the header block, never by the body.
    """
    lines: list[bytes] = []
    position = last_start = start
    while position < end:
        newline = data.find(b"\n", position, end)
        line_end = end if newline < 0 else newline
        following = end if newline < 0 else newline + 1
        if line_end > position and data[line_end - 1] == 0x0D:
            line_end -= 1
        if line_end == position:
            return _unix_from_at_end(lines, last_start) or (lines, following, False)
        line = data[position:line_end]
        if _HEADER_LINE.match(line) is None:
            # The first line that is not a header starts the body (MissingHeaderBodySeparator).
            return _unix_from_at_end(lines, last_start) or (lines, position, True)
        lines.append(line)
        last_start, position = position, following
    return _unix_from_at_end(lines, last_start) or (lines, end, False)


def field_values(data: bytes, name: bytes) -> list[bytes]:
    """The raw values (folds kept) of the message's header fields called ``name`` (lower
    case), as :func:`parse_message` reads them (where the header block ends, the fields
    beyond ``max_headers`` dropped), found by regex searches instead of a walk over every
    line: fast on a header block of megabytes."""
    end = 0
    if _HEADER_LINE.match(data):  # else the first line starts the body
        after = _HEADER_BLOCK_END.search(data)
        end = after.start() + 1 if after else len(data)
    limit = DEFAULT_PARSE_LIMITS.max_headers
    # Maybe more fields than the parser keeps (a block shorter than the limit has fewer lines).
    if end >= limit and data.count(b"\n", 0, end) >= limit:
        starts = _FIELD_START.finditer(data, 0, end)
        beyond = next(itertools.islice(starts, limit, None), None)
        end = beyond.start() + 1 if beyond else end
    # Plain searches of a lower-case copy find where the fields start, the regex reads
    # each from there: it would walk every position, several times the cost.
    lower, found = data[:end].lower(), b"\n" + name + b":"
    field_starts = [0] if lower.startswith(found[1:]) else []
    start = lower.find(found)
    while start >= 0:
        field_starts.append(start + 1)
        start = lower.find(found, start + 1)
    named = _named_field(name)
    values = []
    for at in field_starts:
        field = named.match(data, at, end)
        if field is not None:  # always: the name is there
            values.append(_without_dropped_lines(field[1]))
    return values


@functools.lru_cache(maxsize=64)  # the few names callers ask for, compiled once
def _named_field(name: bytes) -> re.Pattern[bytes]:
    # A field runs on over continuation lines; a line the parser drops among them (a
    # misplaced Unix "From " line, one without a name) leaves the next ones joined to it.
    return re.compile(
        rb"^" + re.escape(name) + rb":([^\n]*(?:\n(?:[\t ]|From |:)[^\n]*)*)", re.I | re.M
    )


def _without_dropped_lines(value: bytes) -> bytes:
    # find, not `in`: CPython's bytes `in` first tries the operand as an integer and pays
    # for a TypeError each time; most values have no line break at all.
    if value.find(b"\n") >= 0 and (value.find(b"\nFrom ") >= 0 or value.find(b"\n:") >= 0):
        first, *more = value.split(b"\n")  # the first is the field's own line: always kept
        kept = [line for line in more if not line.startswith((b"From ", b":"))]
        value = b"\n".join([first, *kept])
    return value.rstrip(b"\r\n").lstrip(b" \t")


# A line ending followed by a line that is not a header line (an empty one included): where
# _split_header_block stops.  And the start of a line _read_fields makes a field of (not a
# continuation, not a Unix "From " line, not one without a name).
_HEADER_BLOCK_END = re.compile(rb"\n(?!From |[\041-\071\073-\176]*:|[\t ])")
_FIELD_START = re.compile(rb"(?:\A|(?<=\n))(?![\t ]|From |:)")


def _unix_from_at_end(lines: list[bytes], last_start: int) -> tuple[list[bytes], int, bool] | None:
    """A "From " line closing the header block is the body's first line (as in the stdlib)."""
    if len(lines) > 1 and lines[-1].startswith(b"From "):
        return lines[:-1], last_start, False
    return None


def _decode_field_text(raw: bytes, path: str, state: _State) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        state.defect(path, "8-bit header data is not UTF-8, decoded with replacement")
        return raw.decode("utf-8", "replace")


def _read_fields(lines: list[bytes], path: str, state: _State) -> list[tuple[str, bytes]]:
    """Group header lines into (name, raw value with folds) pairs."""
    fields: list[tuple[str, list[bytes]]] = []
    for number, line in enumerate(lines):
        first = line[:1]
        if first in (b" ", b"\t"):
            if not fields:
                state.defect(path, "first header line is a continuation line, dropped")
                continue
            fields[-1][1].append(line)
            continue
        if line.startswith(b"From "):
            if number != 0:
                state.defect(path, "misplaced Unix From line dropped")
            continue  # the envelope line of an mbox message is not a header field
        name, _, value = line.partition(b":")
        if not name:
            state.defect(path, "header line without a field name dropped")
            continue
        fields.append((name.decode("ascii"), [value.lstrip(b" \t")]))
    return [(name, b"\r\n".join(folded)) for name, folded in fields]


_MIME_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")


def _parse_entity(data: bytes, span: tuple[int, int], path: str, state: _State) -> _Entity:
    header_path = "headers" if path == "content" else f"{path}.headers"
    known = state.header_block if span[0] == 0 else None  # the message's own, read already
    plain = (known.fields, known.body_start) if known else _plain_header_block(data, *span)
    if plain is not None:  # every value printable ASCII, folded with CRLF or not
        raw_fields, body_start = plain
    else:
        lines, body_start, missing_separator = _split_header_block(data, *span)
        if missing_separator:
            state.defect(path, "missing blank line between headers and body")
        raw_fields = _read_fields(lines, header_path, state)
    limit = state.limits.max_headers
    if len(raw_fields) > limit:
        state.defect(
            header_path, f"{len(raw_fields) - limit} header fields beyond the limit dropped"
        )
        raw_fields = raw_fields[:limit]
    fields: list[tuple[str, str]] = []
    mime: dict[str, str] = {}  # first Content-Type/-Transfer-Encoding/-Disposition, undecoded
    max_len = state.limits.max_value_len
    for name, raw_value in raw_fields:
        lower = name.lower()
        if plain is not None and len(raw_value) <= max_len and b"=?" not in raw_value:
            # Most fields: printable ASCII without "=?", the value as it is, unfolded
            # (what decode_header_value and decode_address_value give, without checks).
            text = raw_value.decode("ascii")
            value = text if b"\n" not in raw_value else unfold(text)
        else:
            text, value = _field_value(lower, raw_value, f"{header_path}.{lower}", state)
        if lower in _MIME_FIELDS:
            if lower not in mime:
                mime[lower] = unfold(text).strip()
            elif lower == "content-type":
                state.defect(
                    f"{header_path}.{lower}", "repeated Content-Type field, first one used"
                )
        fields.append((name, value))
    return _Entity(
        fields,
        mime.get("content-type"),
        mime.get("content-transfer-encoding"),
        mime.get("content-disposition"),
        data,
        body_start,
        span[1],
    )


def _field_value(lower: str, raw_value: bytes, path: str, state: _State) -> tuple[str, str]:
    """(text as sent, decoded value) of a field."""
    if len(raw_value) <= state.limits.max_value_len and _PLAIN_VALUE.fullmatch(raw_value):
        text = raw_value.decode("ascii")
        return text, text if b"\n" not in raw_value else unfold(text)
    text = _decode_field_text(raw_value, path, state)
    # In address fields decoding must not add mailboxes: see decode_address_value.
    decode = decode_address_value if lower in ADDRESS_FIELDS else decode_header_value
    return text, _decoded_value(decode, text, path, state)


def _decoded_value(
    decode: Callable[[str, list[str]], str], text: str, path: str, state: _State
) -> str:
    defects: list[str] = []
    decoded = decode(text, defects)
    for description in defects:
        state.defect(path, description)
    if len(decoded) > state.limits.max_value_len:
        state.defect(path, f"value longer than {state.limits.max_value_len}, cut")
        decoded = decoded[: state.limits.max_value_len]
    return decoded


# ---------------------------------------------------------------------------------------
# bodies


def _windows(view: memoryview) -> Iterator[bytes]:
    for start in range(0, len(view), _WINDOW):
        yield bytes(view[start : start + _WINDOW])


def _decode_base64(view: memoryview, path: str, state: _State) -> bytes:
    if any(window.translate(None, _BASE64_ALPHABET) for window in _windows(view)):
        state.defect(path, "invalid characters in base64 body ignored")
    try:
        return binascii.a2b_base64(view)
    except binascii.Error:
        pass
    # The stdlib's lenient fallbacks (email._encoded_words.decode_b), in its order, so broken
    # bodies decode to the same octets as policy.default gives.
    body = bytes(view)
    compact = b"".join(body.split())
    padding = b"=" * (-len(compact) % 4)
    for attempt, strict in ((compact + padding, True), (compact + b"==", False)):
        try:
            decoded = binascii.a2b_base64(attempt, strict_mode=strict)
        except binascii.Error:
            continue
        state.defect(path, "base64 body has incorrect padding")
        return decoded
    state.defect(path, "base64 body cannot be decoded, kept as sent")
    return body


def _decode_uu(body: bytes, path: str, state: _State) -> bytes:
    lines = iter(body.splitlines())
    for line in lines:
        if line.startswith(b"begin "):
            break
    else:
        state.defect(path, "uuencoded body without a begin line, kept as sent")
        return body
    out: list[bytes] = []
    size = 0
    for line in lines:
        if line.strip() == b"end":
            return b"".join(out)
        try:
            decoded = binascii.a2b_uu(line)
        except binascii.Error:
            # Broken encoders pad lines badly; decode what the length byte announces.
            length = ((line[0] - 32) & 63) * 4 // 3 if line else 0
            try:
                decoded = binascii.a2b_uu(line[:length])
            except binascii.Error:
                state.defect(path, "uuencoded line cannot be decoded, skipped")
                continue
        # a2b_uu fills a line shorter than its length byte says with zeros (for encoders
        # whose trailing spaces were stripped): "M" alone gives 45 octets.  A body that
        # decodes to more than it holds is kept as sent, not grown past what the memory
        # budget reserved for it.
        size += len(decoded)
        if size > len(body):
            state.defect(path, "uuencoded body decodes to more octets than it holds, kept as sent")
            return body
        out.append(decoded)
    state.defect(path, "uuencoded body without an end line")
    return b"".join(out)


def _transfer_decode(view: memoryview, encoding: str, path: str, state: _State) -> bytes:
    if encoding in _IDENTITY_ENCODINGS:
        return bytes(view)
    if encoding == "base64":
        return _decode_base64(view, path, state)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(view)
    if encoding in ("x-uuencode", "uuencode", "uue", "x-uue"):
        return _decode_uu(bytes(view), path, state)
    state.defect(path, f"unknown Content-Transfer-Encoding {encoding[:40]!r}, body kept as sent")
    return bytes(view)


def _lf_line_ends(view: memoryview) -> bytes:
    """``view`` with CRLF turned into LF, a window at a time (a window never ends between
    the CR and the LF of a line end)."""
    out = io.BytesIO()
    start = 0
    while start < len(view):
        end = min(start + _WINDOW, len(view))
        if end < len(view) and view[end - 1] == 0x0D:
            end -= 1
        window = bytes(view[start:end])
        out.write(_lf(window) if b"\r" in window else window)
        start = end
    return out.getvalue()  # the buffer itself, not a copy


def _leaf_body(entity: _Entity, path: str, state: _State, *, text: bool) -> bytes:
    """The transfer-decoded body; a text body has its CRLF line ends turned into LF (a lone
    CR is not a line end and stays)."""
    encoding = (entity.raw_cte or "").strip().lower()
    if text and encoding in _IDENTITY_ENCODINGS and entity.body_end - entity.body_start > _WINDOW:
        return _lf_line_ends(entity.body_view())
    body = _transfer_decode(entity.body_view(), encoding, path, state)
    if text and b"\r" in body:  # one-byte search first: much faster than looking for CRLF
        body = _lf(body)
    return body


# ---------------------------------------------------------------------------------------
# multipart


def _boundary_lines(
    data: bytes, start: int, end: int, boundary: str
) -> Iterator[tuple[int, int, bool]]:
    """(line start, line end, is close delimiter) of each boundary line in ``data[start:end]``.

    A literal search plus a check of the line around each hit: a MULTILINE "^--boundary"
    regex costs ten times more on a megabyte of base64.
    """
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    found = data.find(delimiter, start, end)
    while found >= 0:
        if found == start or data[found - 1] == 0x0A:
            tail = _BOUNDARY_TAIL.match(data, found + len(delimiter), end)
            if tail is not None:
                yield found, tail.end(), tail.group(1) is not None
        found = data.find(delimiter, found + 1, end)


def _line_break_before(data: bytes, position: int, floor: int) -> int:
    """Where the line break ending just before ``position`` starts (not below ``floor``)."""
    if position > floor and data[position - 1] == 0x0A:
        position -= 1
        if position > floor and data[position - 1] == 0x0D:
            position -= 1
    return position


@dataclass(frozen=True)
class _Split:
    """Where the parts of a multipart body lie."""

    parts: list[tuple[int, int]]  # spans between boundary lines
    opened: bool  # a start boundary was seen
    closed: bool  # the close delimiter was seen
    preamble_end: int  # without a start boundary the payload is data[start:preamble_end]


def _split_multipart(data: bytes, start: int, end: int, boundary: str) -> _Split:
    """Split ``data[start:end]`` at its boundary lines.

    As in the feed parser: the line break in front of a boundary line belongs to the
    boundary, consecutive boundary lines open no empty parts between them, and without a
    start boundary the payload is the text before the close delimiter (or all of it).
    """
    parts: list[tuple[int, int]] = []
    part_start = -1
    for line_start, line_end, closing in _boundary_lines(data, start, end, boundary):
        if part_start >= 0 and line_start > part_start:
            parts.append((part_start, _line_break_before(data, line_start, part_start)))
        if closing:
            return _Split(parts, part_start >= 0, True, line_start)
        part_start = line_end + 1 if line_end < end and data[line_end] == 0x0A else line_end
    if part_start >= 0:
        # No close delimiter: the last part runs to the end, less the final line break (the
        # stdlib drops it too, as if a boundary had followed).
        parts.append((part_start, _line_break_before(data, end, part_start)))
    return _Split(parts, part_start >= 0, False, end)


def _content_of(
    span: tuple[int, int], path: str, depth: int, default_type: str, state: _State, *, root: bool
) -> tuple[Content, list[tuple[str, str]]]:
    """The content object of the entity at ``span`` and that entity's decoded fields."""
    entity = _parse_entity(state.data, span, path, state)
    declared = entity.raw_content_type
    content_type = default_type if declared is None else declared
    first_word, params, literal_params = mime_params(content_type)
    # The first word is the type in the common case; else read the value more leniently.
    plain = _PLAIN_MEDIA_TYPE.fullmatch(first_word) is not None
    main_type = first_word if plain else media_type(content_type)
    readable = main_type is not None
    if main_type is None:
        # RFC 2045 section 5.2: an unreadable type means text/plain; charset=us-ascii.  The
        # sender meant some other type, so the body's octets are kept as they are.
        state.defect(
            path,
            f"invalid Content-Type {content_type[:60]!r}, read as {DEFAULT_CONTENT_TYPE}, "
            "body octets kept",
        )
        main_type, content_type = "text/plain", DEFAULT_CONTENT_TYPE
    content: Content = {"content-type": content_type}
    if not root:
        # The part's own fields; its Content-Type too when that could not be read.
        headers = _joined_headers(entity.fields, skip_content_type=readable)
        if headers:
            content["headers"] = headers
        _add_filename(content, entity.raw_disposition, (params, literal_params), path, state)
    if main_type.startswith("multipart/"):
        parts = _multipart_parts(entity, main_type, params.get("boundary"), path, depth, state)
        if isinstance(parts, bytes):
            content["body"] = parts  # a multipart we could not (or would not) split
        else:
            content["parts"] = parts
        return content, entity.fields
    text = readable and main_type.startswith("text/")
    content["body"] = _leaf_body(entity, f"{path}.body", state, text=text)
    return content, entity.fields


def _multipart_parts(  # noqa: PLR0917 - one call site, all positions are distinct types
    entity: _Entity,
    main_type: str,
    boundary: str | None,
    path: str,
    depth: int,
    state: _State,
) -> list[Content] | bytes:
    """The parsed parts, or the raw body when the multipart is broken or over a limit."""
    if not boundary:
        state.defect(path, "multipart without a boundary parameter, body kept as sent")
        return entity.body()
    if depth >= state.limits.max_depth:
        state.defect(path, f"multipart nested deeper than {state.limits.max_depth}, kept opaque")
        return entity.body()
    split = _split_multipart(entity.data, entity.body_start, entity.body_end, boundary)
    if not split.opened:
        state.defect(path, "start boundary not found, body kept as sent")
        return entity.data[entity.body_start : split.preamble_end]
    if not split.parts:
        state.defect(path, "multipart without any part, body kept as sent")
        return entity.body()
    raw_parts = split.parts
    if not split.closed:
        state.defect(path, "close boundary not found")
    if state.parts + len(raw_parts) > state.limits.max_parts:
        state.defect(path, f"more than {state.limits.max_parts} parts, kept opaque")
        return entity.body()
    state.parts += len(raw_parts)
    default_type = DIGEST_CONTENT_TYPE if main_type == "multipart/digest" else DEFAULT_CONTENT_TYPE
    parts: list[Content] = []
    for index, part_span in enumerate(raw_parts):
        part_path = f"{path}.parts[{index}]"
        part, _ = _content_of(part_span, part_path, depth + 1, default_type, state, root=False)
        parts.append(part)
    return parts


def _add_filename(
    content: Content, disposition: str | None, type_params: _TypeParams, path: str, state: _State
) -> None:
    filename = _filename(disposition, type_params)
    if filename is None:
        return
    name, literal = filename
    name_defects: list[str] = []
    if literal:  # RFC 2231 text is final: an "=?" in it is part of the name
        content["filename"] = replace_line_breaks(name, name_defects)
    else:
        content["filename"] = decode_header_value(name, name_defects)
    for description in name_defects:
        state.defect(f"{path}.filename", description)


def _filename(disposition: str | None, type_params: _TypeParams) -> tuple[str, bool] | None:
    """(Content-Disposition filename, else Content-Type name; whether in RFC 2231 form)."""
    if disposition is not None:
        _, params, literal = mime_params(disposition)
        if "filename" in params:
            return params["filename"], "filename" in literal
    params, literal = type_params
    if "name" in params:
        return params["name"], "name" in literal
    return None


def _joined_headers(fields: list[tuple[str, str]], *, skip_content_type: bool) -> dict[str, str]:
    """Lower-cased names; a repeated field's values joined with "\\n" in order."""
    headers: dict[str, str] = {}
    for name, value in fields:
        lower = name.lower()
        if skip_content_type and lower == "content-type":
            continue
        previous = headers.get(lower)
        headers[lower] = value if previous is None else f"{previous}\n{value}"
    return headers


# ---------------------------------------------------------------------------------------
# entry point


def _envelope_sender(mail_from: str | None) -> str | None:
    if mail_from is None:
        return None
    sender = mail_from.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    return sender or None


def _report_of(content: Content, state: _State) -> dict[str, Any] | None:
    """A bounce's ``delivery_report`` (:mod:`.report`); a reader bug costs only the key."""
    try:
        return delivery_report(cast("dict[str, Any]", content))
    except Exception as error:  # the ingest must store what it accepted
        state.defect("content", f"delivery report unreadable ({type(error).__name__})")
        return None


def parse_message(
    raw: bytes,
    *,
    mail_from: str | None,
    rcpt_tos: Sequence[str],
    message_id: str | None = None,
    received_at: float | None = None,
    keep_raw: Literal["never", "defects", "always"] = "defects",
    limits: ParseLimits = DEFAULT_PARSE_LIMITS,
    dsn: dict[str, object] | None = None,
    auth: dict[str, Any] | None = None,
    header_block: HeaderBlock | None = None,
) -> ReceiveMessage:
    """The spec receive message for ``raw`` delivered with the given envelope. Never raises.

    ``header_block``: :func:`read_header_block` of ``raw``, when the caller has it."""
    data = bytes(raw)
    state = _State(limits, data, header_block)
    try:
        whole = (0, len(data))
        content, fields = _content_of(whole, "content", 0, DEFAULT_CONTENT_TYPE, state, root=True)
    except Exception as error:  # the ingest must store what it accepted
        # A parser bug must not lose a message the SMTP peer was promised: keep it opaque.
        state.defect("content", f"parser failure ({type(error).__name__}), kept as sent")
        content, fields = {"content-type": "application/octet-stream", "body": data}, []
    message: ReceiveMessage = {
        "from": _envelope_sender(mail_from),
        "to": list(rcpt_tos),
        "headers": _joined_headers(fields, skip_content_type=False),
        "content": content,
        "id": message_id if message_id is not None else uuid.uuid4().hex,
        "version": SCHEMA_VERSION,
        "received_at": time.time() if received_at is None else received_at,
        "size": len(data),
        "header_list": [[name, value] for name, value in fields],
    }
    if dsn:
        message["dsn"] = dsn
    if auth is not None:
        message["auth"] = auth
    report = _report_of(content, state)
    if report is not None:
        message["delivery_report"] = report
    defects = state.final_defects()
    if defects:
        message["defects"] = defects
    if keep_raw == "always" or (keep_raw == "defects" and defects):
        message["raw"] = data
    return message
