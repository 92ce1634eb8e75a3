"""Round trip: generated send messages -> build_message -> parse_message give back the same
headers (decoded), bodies and filenames; the stdlib reads the same addresses and filenames."""

from __future__ import annotations

import email
import email.utils
import re
from email import policy
from email.message import EmailMessage
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.strategies import format_mailbox, send_messages
from workers.codec import build_message, parse_message, unpack, validate_receive
from workers.codec.wire import pack

ADDRESS_FIELDS = ("from", "to", "cc")


def normalised_text(body: str | bytes) -> bytes:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


SPECIALS = frozenset('()<>[]:;@\\,."')


def decoded_address_field(boxes: list[tuple[str, str]]) -> str:
    """What the parser reads back: ASCII fields verbatim; a non-ASCII display name becomes
    encoded-words (RFC 2047 forbids them inside quotes), so it decodes without its quotes,
    unless it holds specials: then it is a quoted-string again (decoding adds no structure).
    """
    return ", ".join(
        f"{name} <{addr}>"
        if not name.isascii() and not SPECIALS & set(name)
        else format_mailbox(name, addr)
        for name, addr in boxes
    )


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def assert_same_content(
    sent: dict[str, Any], received: dict[str, Any], path: str, *, root: bool = False
) -> None:
    sent_type = sent["content-type"]
    main_type = sent_type.split(";")[0].strip().lower()
    if main_type.startswith("multipart/"):
        assert received["content-type"].startswith(sent_type), path
        assert len(received["parts"]) == len(sent["parts"]), path
        for index, (mine, theirs) in enumerate(zip(sent["parts"], received["parts"], strict=True)):
            assert_same_content(mine, theirs, f"{path}.parts[{index}]")
        return
    if root:  # the parser keeps filename and MIME fields for non-root parts only
        sent = {key: value for key, value in sent.items() if key not in ("filename", "headers")}
    expected_type = sent_type
    body = sent["body"]
    # A str body, or a non-ASCII bytes body (the strategies only draw UTF-8 ones), of a text
    # type without charset is sent with charset=utf-8.
    utf8_text = isinstance(body, str) or not body.isascii()
    if utf8_text and main_type.startswith("text/") and "charset" not in sent_type:
        expected_type += "; charset=utf-8"
    assert received["content-type"] == expected_type, path
    if main_type.startswith("text/"):
        assert received["body"] == normalised_text(sent["body"]), path
    else:
        assert received["body"] == sent["body"], path
    if not root:
        assert received.get("filename") == sent.get("filename"), path
    part_headers = received.get("headers", {})
    for name, value in sent.get("headers", {}).items():
        assert part_headers[name] == value, f"{path}.headers.{name}"


def stdlib_filenames(message: EmailMessage) -> list[str | None]:
    return [part.get_filename() for part in message.walk() if not part.is_multipart()]


def sent_filenames(content: dict[str, Any]) -> list[str | None]:
    if "parts" in content:
        return [name for part in content["parts"] for name in sent_filenames(part)]
    name = content.get("filename")
    return [None if name is None else name.strip()]  # get_filename() strips whitespace


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(send_messages())
def test_built_messages_parse_back_to_the_same_message(
    case: tuple[dict[str, Any], dict[str, list[tuple[str, str]]]],
) -> None:
    message, addresses = case
    built = build_message(message, default_id="1700000000000-0", now=1_700_000_000.0)  # type: ignore[arg-type]
    assert max(len(line) for line in built.data.split(b"\r\n")) <= 998
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", built.data) is None
    assert built.data.isascii()  # every address here has an ASCII local part

    received = parse_message(built.data, mail_from=built.mail_from, rcpt_tos=built.recipients)
    assert "defects" not in received, received.get("defects")
    validate_receive(unpack(pack(received)))
    assert received["from"] == message["from"]
    assert received["to"] == message["to"]

    headers = received["headers"]
    assert "bcc" not in headers
    assert headers["message-id"] == built.message_id
    assert headers["mime-version"] == "1.0"
    for name, value in message["headers"].items():
        if name in ADDRESS_FIELDS:
            assert headers[name] == decoded_address_field(addresses[name]), name
            assert email.utils.getaddresses([headers[name]]) == addresses[name], name
        elif name != "bcc":
            assert headers[name] == value, name

    assert_same_content(message["content"], received["content"], "content", root=True)

    # An independent reader sees the same display names, addresses and filenames.
    parsed = email.message_from_bytes(built.data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    for name, boxes in addresses.items():
        # CPython 3.11 keeps the whitespace between adjacent encoded-words of a display name
        # (RFC 2047 section 6.2 says to drop it), so names are compared without whitespace.
        seen = [(squeezed(a.display_name), a.addr_spec) for a in parsed[name].addresses]
        assert seen == [(squeezed(display), addr) for display, addr in boxes], name
    assert stdlib_filenames(parsed) == sent_filenames(message["content"])
