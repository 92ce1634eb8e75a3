"""RFC 2231 parameter values are literal.

``filename*=``, ``name*=`` and their continuations carry the name itself, percent-encoded in
a declared charset: an "=?" in it is part of the name.  RFC 2047 decoding (which senders put
in quoted parameter values against RFC 2047 section 5) applies to the plain ``filename=`` and
``name=`` forms only.
"""

from __future__ import annotations

import email
from email import policy

import pytest

from tests.corpus_util import validate_if_available
from workers.codec.headers import mime_params
from workers.codec.parse import parse_message

pytestmark = pytest.mark.timeout(10)


def part_with(fields: bytes) -> bytes:
    return (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        + fields
        + b"\r\n\r\ndata\r\n--b--\r\n"
    )


def parsed_part(fields: bytes) -> dict[str, object]:
    message = parse_message(part_with(fields), mail_from=None, rcpt_tos=["b@example.com"])
    validate_if_available(message)
    return dict(message["content"]["parts"][0])


def stdlib_filename(fields: bytes) -> str | None:
    message = email.message_from_bytes(part_with(fields), policy=policy.default)
    return next(message.iter_parts()).get_filename()


def test_encoded_word_spelled_out_in_an_rfc2231_filename_stays_as_sent() -> None:
    fields = b"Content-Disposition: attachment; filename*=utf-8''%3D%3Futf-8%3Fq%3Fa_b%3F%3D.txt"

    assert parsed_part(fields)["filename"] == "=?utf-8?q?a_b?=.txt"
    assert stdlib_filename(fields) == "=?utf-8?q?a_b?=.txt"


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Type: application/pdf; name*=utf-8''%3D%3Futf-8%3Fq%3Fa_b%3F%3D.txt",
        b"Content-Disposition: attachment; filename*0*=utf-8''%3D%3Futf-8%3Fq%3Fa_b%3F%3D;\r\n"
        b" filename*1=.txt",
        b"Content-Disposition: attachment; filename*=utf-8''=?utf-8?q?a_b?=.txt",
        b'Content-Disposition: attachment; filename*0="=?utf-8?q?a_b?="; filename*1=".txt"',
    ],
)
def test_every_rfc2231_form_is_literal(fields: bytes) -> None:
    assert parsed_part(fields)["filename"] == "=?utf-8?q?a_b?=.txt"


def test_plain_forms_are_still_rfc2047_decoded() -> None:
    fields = b'Content-Disposition: attachment; filename="=?utf-8?q?a_b?=.txt"'

    assert parsed_part(fields)["filename"] == "a b.txt"
    assert stdlib_filename(fields) == "a b.txt"


def test_rfc2231_form_wins_over_the_plain_one() -> None:
    fields = b"Content-Disposition: attachment; filename=\"=?utf-8?q?x?=\"; filename*=utf-8''y"

    assert parsed_part(fields)["filename"] == "y"


def test_encoded_line_breaks_in_a_literal_name_are_replaced() -> None:
    fields = b"Content-Disposition: attachment; filename*=utf-8''a%0D%0AX-Evil:%20b%00.txt"
    message = parse_message(part_with(fields), mail_from=None, rcpt_tos=["b@example.com"])

    assert message["content"]["parts"][0]["filename"] == "a  X-Evil: b .txt"
    assert message["defects"] == [
        "content.parts[0].filename: CR, LF or NUL in the decoded value replaced by a space"
    ]


def test_mime_params_names_the_rfc2231_parameters() -> None:
    main, params, literal = mime_params("attachment; filename*=utf-8''a%20b; size=3; x*0=c")

    assert main == "attachment"
    assert params == {"filename": "a b", "size": "3", "x": "c"}
    assert literal == {"filename", "x"}
