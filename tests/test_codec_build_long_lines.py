"""build_message: long lines and the fine print of MIME fields.

* text lines over 78 characters travel quoted-printable (RFC 5322 2.1.1; Haraka cuts lines
  over 992 octets), shorter ones stay 7bit;
* parameter values the builder writes are quoted strings; a caller's quoting is kept;
* RFC 2231 continuation sections end at character boundaries (readers such as Thunderbird
  and Outlook decode each section on its own);
* a display name's leading/trailing space stays inside its encoded-word.

Every check reads the built bytes back with the stdlib (``policy.default``).
"""

from __future__ import annotations

import email
import re
from email import policy
from email.header import decode_header
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.codec import build_message, parse_message
from workers.codec.build import BuiltMessage
from workers.codec.types import SendMessage


def built(content: dict[str, Any], **headers: str) -> BuiltMessage:
    message: dict[str, Any] = {
        "from": "app@example.com",
        "to": ["ann@example.org"],
        "headers": {"subject": "lines", **headers},
        "content": content,
    }
    send: SendMessage = message  # type: ignore[assignment]
    return build_message(send, default_id="1-0", now=0.0)


def stdlib(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def leaves(data: bytes) -> list[EmailMessage]:
    return [part for part in stdlib(data).walk() if not part.is_multipart()]


def body_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[1].split(b"\r\n")


def unfolded_field(data: bytes, name: str) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    match = re.search(rf"(?im)^{name}:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    assert match is not None, name
    return match.group(1).replace("\r\n", "")


# ---------------------------------------------------------------------------------------
# long lines


@pytest.mark.parametrize(
    ("text", "cte"),
    [
        ("x" * 78 + "\n", "7bit"),
        ("x" * 79 + "\n", "quoted-printable"),
        ("x" * 995 + "\n", "quoted-printable"),  # legal, but Haraka cuts it at 992
        ("short\n" + "y" * 120 + "\nshort\n", "quoted-printable"),
        ("short\n" * 3 + "z" * 79, "quoted-printable"),  # the last line, without line end
        (("The quick brown fox jumps over the lazy dog. " + "\n") * 40, "7bit"),
    ],
)
@pytest.mark.parametrize("body_type", [str, bytes])
def test_text_lines_over_78_characters_go_quoted_printable(
    text: str, cte: str, body_type: type
) -> None:
    body = text if body_type is str else text.encode()
    intro = {"content-type": "text/plain; charset=utf-8", "body": body}
    message = built({"content-type": "multipart/mixed", "parts": [intro]})
    assert f"\r\nContent-Transfer-Encoding: {cte}\r\n".encode() in message.data
    assert max(map(len, body_lines(message.data))) <= 78
    (part,) = leaves(message.data)
    assert part.get_content().replace("\r\n", "\n") == text
    parsed = parse_message(message.data, mail_from="app@example.com", rcpt_tos=["a@x.org"])
    assert parsed["content"]["parts"][0]["body"] == text.encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=30), st.booleans())
def test_7bit_exactly_when_every_line_fits(lengths: list[int], final_newline: bool) -> None:
    text = "\n".join("x" * length for length in lengths) + ("\n" if final_newline else "")
    part = {"content-type": "text/plain", "body": text.encode()}
    message = built({"content-type": "multipart/mixed", "parts": [part]})
    cte = "7bit" if max(lengths) <= 78 else "quoted-printable"
    assert f"\r\nContent-Transfer-Encoding: {cte}\r\n".encode() in message.data
    assert max(map(len, body_lines(message.data))) <= 78


def test_a_long_line_at_the_root_is_soft_broken_and_decodes_exactly() -> None:
    text = "word " * 199 + "end\n"  # 999 characters
    message = built({"content-type": "text/plain", "body": text})
    assert b"\r\nContent-Transfer-Encoding: quoted-printable\r\n" in message.data
    assert max(map(len, body_lines(message.data))) <= 78
    assert stdlib(message.data).get_content().replace("\r\n", "\n") == text


def test_an_embedded_message_keeps_its_lines_and_7bit() -> None:
    """message/rfc822 may only be 7bit, 8bit or binary (RFC 2046 5.2.1): not re-encoded."""
    inner = b"Subject: inner\r\n\r\n" + b"x" * 200 + b"\r\n"
    message = built({"content-type": "multipart/mixed", "parts": [
        {"content-type": "message/rfc822", "body": inner},
    ]})  # fmt: skip
    assert message.data.count(b"Content-Transfer-Encoding: 7bit") == 1
    assert b"\r\n" + b"x" * 200 + b"\r\n" in message.data


# ---------------------------------------------------------------------------------------
# parameter values stay quoted


def test_parameter_values_the_builder_writes_are_quoted() -> None:
    parts = [
        {"content-type": "text/plain; charset=utf-8", "filename": "x.txt", "body": b"a\n"},
        {  # a caller's quoted filename replaced by the "filename" key: still quoted
            "content-type": 'text/plain; charset=utf-8; name="y.txt"',
            "headers": {"content-disposition": 'inline; filename="old.txt"'},
            "filename": "y.txt",
            "body": b"b\n",
        },
        {"content-type": "application/pdf; name=given-token.pdf", "body": b"%PDF"},
    ]
    data = built({"content-type": "multipart/mixed", "parts": parts}).data
    head = data.decode("ascii")
    assert '\r\nContent-Disposition: attachment; filename="x.txt"\r\n' in head
    assert '\r\nContent-Type: text/plain; charset=utf-8; name="y.txt"\r\n' in head
    assert '\r\nContent-Disposition: inline; filename="y.txt"\r\n' in head
    assert "\r\nContent-Type: application/pdf; name=given-token.pdf\r\n" in head  # as given
    assert re.search(r'\r\nContent-Type: multipart/mixed; boundary="[^"]+"\r\n', head)
    found = [(p.get_filename(), p.get_content_disposition()) for p in leaves(data)]
    assert found == [("x.txt", "attachment"), ("y.txt", "inline"), ("given-token.pdf", None)]


# ---------------------------------------------------------------------------------------
# RFC 2231 sections at character boundaries


def filename_sections(data: bytes) -> list[bytes]:
    """The percent-decoded octets of each ``filename*N*`` section, in order."""
    value = unfolded_field(data.split(b"\r\n--", 2)[1].split(b"\r\n", 1)[1], "content-disposition")
    sections = re.findall(r"filename\*(\d+)\*=([^;]*)", value)
    assert [int(number) for number, _ in sections] == list(range(len(sections)))
    octets = [unquote_to_bytes(text.strip()) for _, text in sections]
    assert octets[0].startswith(b"utf-8''")
    return [octets[0].removeprefix(b"utf-8''"), *octets[1:]]


def attachment_named(filename: str) -> bytes:
    part = {"content-type": "application/pdf", "filename": filename, "body": b"%PDF"}
    return built({"content-type": "multipart/mixed", "parts": [part]}).data


@pytest.mark.parametrize(
    "filename",
    [
        "日本語のファイル名" * 3 + ".pdf",
        "a" + "é" * 60 + ".txt",
        "x" + "😀" * 30,
        "ab" * 40 + "ü" * 30,
    ],
)
def test_rfc2231_sections_hold_whole_characters(filename: str) -> None:
    data = attachment_named(filename)
    sections = filename_sections(data)
    assert len(sections) > 1
    assert "".join(section.decode("utf-8") for section in sections) == filename
    (part,) = leaves(data)
    assert part.get_filename() == filename


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00")))
def test_every_rfc2231_section_decodes_on_its_own(stem: str) -> None:
    filename = "ü" + stem * 3  # non-ASCII: always RFC 2231
    data = attachment_named(filename)
    if b"filename*0*=" not in data:
        return  # short enough for one section
    sections = filename_sections(data)
    assert "".join(section.decode("utf-8") for section in sections) == filename
    assert max(map(len, data.split(b"\r\n"))) <= 998


# ---------------------------------------------------------------------------------------
# display names keep their outer spaces


@pytest.mark.parametrize(
    ("field", "names"),
    [
        ('"Zoë " <a@example.com>', ["Zoë "]),
        ('" Zoë" <a@example.com>', [" Zoë"]),
        ('"Zoë " <a@example.com>, "Ann" <b@example.com>', ["Zoë ", "Ann"]),
        ('b@example.com, "Bob " (Zoë) <c@example.com>', ["", "Bob "]),
        ("Zoë  <a@example.com>", ["Zoë"]),  # spaces outside quotes are not part of the name
    ],
)
def test_display_name_spaces_stay_inside_the_encoded_word(field: str, names: list[str]) -> None:
    data = built({"content-type": "text/plain", "body": "x\n"}, to=field).data
    addresses = stdlib(data)["to"].addresses
    assert [address.display_name for address in addresses] == names
    # The spaces are in the encoded-word itself, not beside it where parsers drop them.
    words = [decoded_word(word) for word in ENCODED_WORD.findall(unfolded_field(data, "to"))]
    assert all(name in words for name in names if name != name.strip() or not name.isascii())


ENCODED_WORD = re.compile(r"=\?utf-8\?[qb]\?[^?]*\?=")


def decoded_word(word: str) -> str:
    ((octets, charset),) = decode_header(word)
    assert isinstance(octets, bytes) and charset == "utf-8"
    return octets.decode("utf-8")
