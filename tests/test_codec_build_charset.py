"""build_message: a text/* bytes body whose type names no charset.

No charset means US-ASCII (RFC 2046 4.1.2), so UTF-8 bytes sent that way show as
replacement characters.  The builder declares ``charset=utf-8`` for valid non-ASCII UTF-8,
leaves pure ASCII as it is, and sends anything else as ``application/octet-stream``.
"""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from workers.codec import build_message, parse_message
from workers.codec.build import BuiltMessage
from workers.codec.types import SendMessage

UTF8_TEXT = "Grüße aus Köln – 10 € ✉\nzweite Zeile\n"
LATIN1 = b"caf\xe9 cr\xe8me\r\nbare LF\nend"  # not UTF-8; mixed line ends must survive


def built(content: dict[str, Any]) -> BuiltMessage:
    message: dict[str, Any] = {
        "from": "app@example.com",
        "to": ["ann@example.org"],
        "headers": {"subject": "charset"},
        "content": content,
    }
    send: SendMessage = message  # type: ignore[assignment]
    return build_message(send, default_id="1-0", now=0.0)


def attached(leaf: dict[str, Any]) -> BuiltMessage:
    intro = {"content-type": "text/plain; charset=utf-8", "body": b"see attached\n"}
    return built({"content-type": "multipart/mixed", "parts": [intro, leaf]})


def stdlib_parts(data: bytes) -> list[EmailMessage]:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return [part for part in message.walk() if not part.is_multipart()]


@pytest.mark.parametrize("content_type", ["text/plain", "Text/Plain", 'text/plain; name="n.txt"'])
def test_utf8_bytes_get_charset_utf8(content_type: str) -> None:
    leaf = {"content-type": content_type, "filename": "notes.txt", "body": UTF8_TEXT.encode()}
    part = stdlib_parts(attached(leaf).data)[1]
    assert part.get_content_type() == "text/plain"
    assert part.get_content_charset() == "utf-8"
    assert part.get_content().replace("\r\n", "\n") == UTF8_TEXT
    assert part.get_filename() == "notes.txt"
    if "name=" in content_type:
        assert part.get_param("name") == "n.txt"


def test_utf8_bytes_at_the_root_get_charset_utf8() -> None:
    message = built({"content-type": "text/html", "body": "<p>Zoë</p>\n".encode()})
    assert b"\r\nContent-Type: text/html; charset=utf-8\r\n" in message.data
    (part,) = stdlib_parts(message.data)
    assert part.get_content_charset() == "utf-8"
    assert part.get_content().replace("\r\n", "\n") == "<p>Zoë</p>\n"


def test_pure_ascii_bytes_are_left_without_charset() -> None:
    """Documented choice: no charset already means US-ASCII, which is exact for ASCII."""
    message = attached({"content-type": "text/plain", "filename": "a.txt", "body": b"plain\n"})
    assert b"\r\nContent-Type: text/plain\r\n" in message.data
    part = stdlib_parts(message.data)[1]
    assert part.get_content_charset() is None
    assert part.get_content().replace("\r\n", "\n") == "plain\n"


def test_non_utf8_bytes_are_sent_as_octet_stream_keeping_the_name() -> None:
    leaf = {
        "content-type": 'text/plain; format=flowed; name="legacy.txt"',
        "filename": "legacy.txt",
        "body": LATIN1,
    }
    message = attached(leaf)
    assert b'\r\nContent-Type: application/octet-stream; name="legacy.txt"\r\n' in message.data
    part = stdlib_parts(message.data)[1]
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_filename() == "legacy.txt"
    assert part.get_content() == LATIN1  # octets exact: no line-end rewriting
    parsed = parse_message(message.data, mail_from="app@example.com", rcpt_tos=["a@example.org"])
    assert parsed["content"]["parts"][1]["body"] == LATIN1


def test_non_utf8_bytes_at_the_root_are_sent_as_octet_stream() -> None:
    message = built({"content-type": "text/plain", "body": LATIN1})
    assert b"\r\nContent-Type: application/octet-stream\r\n" in message.data
    (part,) = stdlib_parts(message.data)
    assert part.get_content() == LATIN1


def test_a_declared_charset_is_never_changed() -> None:
    leaf = {"content-type": 'text/plain; CHARSET="iso-8859-1"', "body": b"caf\xe9\n"}
    message = attached(leaf)
    assert b'\r\nContent-Type: text/plain; CHARSET="iso-8859-1"\r\n' in message.data
    part = stdlib_parts(message.data)[1]
    assert part.get_content().replace("\r\n", "\n") == "café\n"
