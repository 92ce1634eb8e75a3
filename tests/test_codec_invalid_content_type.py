"""A Content-Type that cannot be read, and line ends in text bodies.

RFC 2045 section 5.2: a syntactically invalid Content-Type means ``text/plain;
charset=us-ascii``.  That type is reported, the field as sent stays in the part's headers, a
defect names the part, and the body's octets are never rewritten: the sender meant some
other type (a base64 JPEG with ``Content-Type: ; name="x.jpg"`` lost its CR octets to
line-end normalisation before).  In text bodies only CRLF is a line end: a lone CR stays.
"""

from __future__ import annotations

import base64
import email
import random
from email import policy

import pytest

from tests.corpus_util import validate_if_available
from workers.codec.parse import parse_message
from workers.codec.types import ReceiveMessage

pytestmark = pytest.mark.timeout(10)

# Image-like octets with many CR and LF bytes, as a JPEG has.
IMAGE = random.Random(2045).randbytes(8000) + b"\r\r\n\n\r"


def parse(raw: bytes) -> ReceiveMessage:
    message = parse_message(raw, mail_from="a@example.com", rcpt_tos=["b@example.com"])
    validate_if_available(message)
    return message


def with_attachment(content_type: bytes, body: bytes = IMAGE) -> bytes:
    encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attachment\r\n"
        b"--b\r\nContent-Type:" + content_type + b"\r\n"
        b"Content-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded
        + b"--b--\r\n"
    )


def test_jpeg_with_an_unreadable_type_keeps_every_octet() -> None:
    message = parse(with_attachment(b' ; name="x.jpg"'))

    part = message["content"]["parts"][1]
    assert IMAGE.count(b"\r") > 20
    assert part["body"] == IMAGE
    assert part["content-type"] == "text/plain; charset=us-ascii"
    assert part["headers"]["content-type"] == '; name="x.jpg"'
    assert part["filename"] == "x.jpg"  # the name parameter can still be read
    assert [d.split(": ", 1)[0] for d in message["defects"]] == ["content.parts[1]"]
    assert message["raw"] == with_attachment(b' ; name="x.jpg"')  # kept: there is a defect


# (value, whether policy.default reads text/plain too: it takes any "a/b" with one slash)
UNREADABLE = [
    (b" ", True),
    (b" image", True),
    (b" image/jpeg/x", True),
    (b" image/", False),
    (b" /jpeg", False),
    (b" im age/jpeg", False),
    (b' "image/jpeg"', False),
]


@pytest.mark.parametrize(("content_type", "stdlib_agrees"), UNREADABLE)
def test_unreadable_types_read_as_us_ascii_text_with_octets_kept(
    content_type: bytes, stdlib_agrees: bool
) -> None:
    raw = with_attachment(content_type)

    message = parse(raw)

    part = message["content"]["parts"][1]
    assert part["content-type"] == "text/plain; charset=us-ascii"
    assert part["body"] == IMAGE
    assert part["headers"]["content-type"] == content_type.decode().strip()
    assert message["defects"][0].startswith("content.parts[1]: ")
    stdlib = email.message_from_bytes(raw, policy=policy.default)
    stdlib_type = list(stdlib.iter_parts())[1].get_content_type()
    assert (stdlib_type == "text/plain") == stdlib_agrees


@pytest.mark.parametrize(
    ("content_type", "main_type"),
    [(b" image/jpeg", "image/jpeg"), (b" IMAGE / JPEG", "image/jpeg"), (b" image/jpeg x", "")],
)
def test_readable_types_are_kept_as_sent(content_type: bytes, main_type: str) -> None:
    message = parse(with_attachment(content_type))

    part = message["content"]["parts"][1]
    assert part["content-type"] == content_type.decode().strip()
    assert "content-type" not in part["headers"]
    assert part["body"] == IMAGE
    assert "defects" not in message
    assert main_type in part["content-type"].lower().replace(" ", "")


def test_unreadable_type_of_the_whole_message() -> None:
    raw = b"Content-Type: garbage\r\n\r\nline\r\nlone CR\rhere\r\n"

    message = parse(raw)

    assert message["content"] == {
        "content-type": "text/plain; charset=us-ascii",
        "body": b"line\r\nlone CR\rhere\r\n",  # not text as far as we know: kept
    }
    assert message["headers"]["content-type"] == "garbage"
    assert message["defects"][0].startswith("content: ")


def test_empty_type_inside_a_digest_is_text_not_the_digest_default() -> None:
    raw = (
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\nContent-Type:\r\n\r\nSubject: x\r\n\r\ny\r\n--d--\r\n"
    )

    part = parse(raw)["content"]["parts"][0]

    assert part["content-type"] == "text/plain; charset=us-ascii"
    stdlib = email.message_from_bytes(raw, policy=policy.default)
    assert next(stdlib.iter_parts()).get_content_type() == "text/plain"


# --- line ends in text bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cte", "encoded", "body"),
    [
        (b"8bit", b"a\r\nb\rc\nd\r\r\n", b"a\nb\rc\nd\r\n"),
        (b"quoted-printable", b"a=0Db=0D=0Ac\r\n", b"a\rb\nc\n"),
        (b"base64", base64.b64encode(b"x\ry\r\n"), b"x\ry\n"),
    ],
)
def test_only_crlf_is_a_line_end_in_text(cte: bytes, encoded: bytes, body: bytes) -> None:
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: " + cte + b"\r\n\r\n" + encoded

    assert parse(raw)["content"]["body"] == body
