"""The header block read once at the end of DATA: the client's header block, read as the
parser reads it, serves the verifier (signatures, seals, Authentication-Results fields, the
From fields) and then, below our Authentication-Results and Received fields, the parser of
the stored message.  Each must find in it what it finds reading the octets itself: every
block of up to three header lines of every kind, the verifier's own kinds among them."""

from __future__ import annotations

import pytest

from tests.header_lines import LINES, header_blocks
from workers.codec.parse import parse_message, read_header_block
from workers.ingest.handler import _below, received_field
from workers.verify.verifier import _Head

VERIFIER_LINES = [
    *LINES, b"DKIM-Signature: v=1; d=a.example", b"arc-seal: i=1", b"FROM:\tb@c.example",
    b"Authentication-Results: mx.example; spf=pass", b"Authentication-Results : x",
    b"From: <x@y.example>\r\n\t(folded)",
]  # fmt: skip
OUR_RESULTS = (
    b"Authentication-Results: ingest.example; spf=pass smtp.mailfrom=a.example;\r\n"
    b"\tspf=none smtp.helo=client.example; dkim=none; dmarc=none\r\n"
)


def trace(recipient: str) -> bytes:
    return received_field(
        helo="client.example", peer_ip="127.0.0.1", hostname="ingest.example",
        protocol="ESMTP", message_id="m1", recipients=[recipient], now=0.0,
    )  # fmt: skip


def contents(count: int) -> list[bytes]:
    """Messages and multipart messages whose own header block is one of the blocks."""
    made = []
    for block, empty in header_blocks(VERIFIER_LINES, count):
        made.append(block + empty + b"body\r\n")
        made.append(block + b'Content-Type: multipart/mixed; boundary="b"\r\n' + empty
                    + b"--b\r\nX: part\r\n\r\npart\r\n--b--\r\n")  # fmt: skip
    return made


@pytest.mark.parametrize("count", range(4))
def test_the_verifier_finds_in_the_read_block_what_it_finds_itself(count: int) -> None:
    read_ones = 0
    for content in contents(count):
        read = read_header_block(content)
        if read is not None:
            read_ones += 1
            assert _Head.of(content, read) == _Head.of(content), repr(content)
    assert read_ones > 0


@pytest.mark.parametrize("count", range(4))
@pytest.mark.parametrize("recipient", ["a@b.example", "é@b.example"])
def test_the_parser_given_the_stored_block_reads_what_it_reads_itself(
    count: int, recipient: str
) -> None:
    """Our two fields on top; a Received field naming a UTF-8 recipient is no common field,
    and then no block is handed on (the parser reads everything itself, as before)."""
    envelope = {"mail_from": "a@b.example", "rcpt_tos": [recipient], "message_id": "m1",
                "received_at": 0.0}  # fmt: skip
    handed_on = 0
    for content in contents(count):
        stored_block = _below(read_header_block(content), OUR_RESULTS, trace(recipient))
        if stored_block is None:
            continue
        handed_on += 1
        stored = OUR_RESULTS + trace(recipient) + content
        given = parse_message(stored, header_block=stored_block, **envelope)  # type: ignore[arg-type]
        assert given == parse_message(stored, **envelope), repr(content)  # type: ignore[arg-type]
    assert (handed_on > 0) == recipient.isascii()
