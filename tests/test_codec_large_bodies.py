"""Large bodies through the codec without extra copies: ``pack`` joins large bytes values
into its result instead of copying them through msgpack's buffer (same octets as msgpack
itself), and the parser turns CRLF into LF a window at a time and decodes base64 from a
view of the message (same result as on the whole body).  Each used to cost two to three
more copies of a large message (ingest's memory budget, README Guarantees)."""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from tests.corpus_util import CORPUS_DIR
from workers.codec import pack, parse_message, unpack
from workers.codec.parse import _WINDOW
from workers.codec.wire import SPLICE_FROM

MiB = 1 << 20


def _peak_over(make: Any) -> tuple[Any, int]:
    """What ``make()`` returns, and the most memory it had allocated at once."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = make()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_pack_gives_msgpacks_octets_for_large_and_nested_bytes() -> None:
    big = b"\x00\xc4\x10" * (SPLICE_FROM // 3 + 1)  # looks like a stand-in's header, too
    message: dict[str, Any] = {
        "id": "m",
        "raw": big + b"raw",
        "content": {
            "content-type": "multipart/mixed",
            "parts": [
                {"content-type": "text/plain", "body": big},
                {"content-type": "application/pdf", "body": big + b"!", "filename": "a"},
                {"content-type": "text/plain", "body": b"small"},
            ],
        },
        "header_list": [["Subject", "s"]],
        "to": ["a@b.c"],
    }
    packed = pack(message)
    assert packed == msgpack.packb(message, use_bin_type=True, datetime=False)
    assert unpack(packed)["content"]["parts"][1]["body"] == big + b"!"
    assert message["content"]["parts"][0]["body"] is big  # the message itself is untouched


def test_pack_of_a_large_body_costs_its_size_once_more() -> None:
    message = {"content": {"content-type": "application/octet-stream", "body": b"b" * 24 * MiB}}
    packed, peak = _peak_over(lambda: pack(message))
    assert len(packed) > 24 * MiB
    assert peak < 1.2 * 24 * MiB, f"{peak / MiB:.0f} MiB to pack 24 MiB"


def _text_message(body: bytes) -> bytes:
    return b"Subject: big\r\nContent-Type: text/plain\r\n\r\n" + body


def test_a_large_text_body_is_converted_window_by_window() -> None:
    # A CRLF across each window boundary, lone CRs and LFs, and a CR as the last octet.
    line = b"y" * 61 + b"\r\n" + b"z\rz\nz" + b"\r\n"
    body = line * (3 * _WINDOW // len(line))
    for cut in (_WINDOW - 1, 2 * _WINDOW - 1):
        body = body[:cut] + b"\r\n" + body[cut:]
    body += b"end\r"
    message = parse_message(_text_message(body), mail_from=None, rcpt_tos=[])
    assert message["content"]["body"] == body.replace(b"\r\n", b"\n")
    assert "defects" not in message


def test_parsing_a_large_message_costs_its_body_once() -> None:
    raw = _text_message((b"x" * 76 + b"\r\n") * 300_000)
    message, peak = _peak_over(lambda: parse_message(raw, mail_from=None, rcpt_tos=[]))
    assert message["content"]["body"].endswith(b"x\n")
    assert peak < 1.2 * len(raw), f"{peak / len(raw):.2f} times the message"


def test_a_large_base64_body_is_decoded_from_the_message() -> None:
    payload = bytes(range(256)) * (12 * MiB // 256)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded
    )
    message, peak = _peak_over(lambda: parse_message(raw, mail_from=None, rcpt_tos=[]))
    assert message["content"]["body"] == payload
    assert "defects" not in message
    assert peak < 1.2 * len(payload), f"{peak / len(payload):.2f} times the payload"


def _bytes_values(value: Any) -> Iterator[bytes]:
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _bytes_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _bytes_values(item)


ENCODED_BODIES = [
    b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(bytes(range(256)) * 40).replace(b"\n", b"\r\n"),
    b"Content-Type: text/plain; charset=latin-1\r\nContent-Transfer-Encoding: quoted-printable"
    b"\r\n\r\n" + b"=E9t=E9 =\r\n" * 200,
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
    b"begin 644 a\r\n" + b"M" + b"86)C" * 15 + b"\r\n" * 1 + b"`\r\nend\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Transfer-Encoding: base64"
    b"\r\n\r\n" + base64.encodebytes(b"\xff" * 3000).replace(b"\n", b"\r\n"),
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + bytes(range(256)) * 8,
    # Lines shorter than their length byte says: a2b_uu pads each with zeros (45 from 2).
    b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n" + b"M\r\n" * 30000 + b"end\r\n",
]


@pytest.mark.parametrize(
    "raw", [*ENCODED_BODIES, *(path.read_bytes() for path in CORPUS_DIR.glob("msg_*.txt"))]
)
def test_no_part_of_a_parsed_message_is_longer_than_its_raw_octets(raw: bytes) -> None:
    """What lets ingest pack a message under SPLICE_FROM octets with ``small=True``
    (no walk looking for large values): no body decodes to more octets than it was sent
    in.  And ``small`` changes nothing in the octets."""
    message = parse_message(raw, mail_from=None, rcpt_tos=[], keep_raw="always")
    assert max(map(len, _bytes_values(message)), default=0) <= len(raw)
    assert pack(message, small=True) == pack(message)
