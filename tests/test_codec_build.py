"""build_message: spec send message -> RFC 5322 bytes, read back by the stdlib and our parser."""

from __future__ import annotations

import email
import re
import smtplib
import socket
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from workers.codec import BuildError, CodecError, SchemaError, build_message, parse_message
from workers.codec.build import BuiltMessage
from workers.codec.types import SendMessage


def send(content: dict[str, Any] | None = None, **headers: str) -> SendMessage:
    """A send message with the given (lower-case, "_" for "-") headers and content."""
    message: dict[str, Any] = {
        "from": "alice@example.com",
        "to": ["bob@example.org"],
        "headers": {name.rstrip("_").replace("_", "-"): value for name, value in headers.items()},
        "content": content or {"content-type": "text/plain", "body": "Hello Bob.\n"},
    }
    return message  # type: ignore[return-value]


def build(message: SendMessage, **kwargs: Any) -> BuiltMessage:
    built = build_message(message, default_id=kwargs.pop("default_id", "1-0"), **kwargs)
    assert_wire_safe(built.data)
    return built


def assert_wire_safe(data: bytes) -> None:
    """CRLF line ends only, no line over 998 octets, ends with CRLF."""
    assert data.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", data) is None, "bare CR or LF"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def stdlib(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def header_block(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode("utf-8")


def field_lines(data: bytes, name: str) -> list[str]:
    """The physical lines (first + continuations) of the first field ``name``."""
    lines = header_block(data).split("\r\n")
    for index, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            end = index + 1
            while end < len(lines) and lines[end][:1] in (" ", "\t"):
                end += 1
            return lines[index:end]
    raise AssertionError(f"no {name} field")


def reparse(built: BuiltMessage) -> dict[str, Any]:
    return dict(parse_message(built.data, mail_from=built.mail_from, rcpt_tos=built.recipients))


# ---------------------------------------------------------------------------------------
# structure and fields


def test_minimal_message_gets_mime_fields_date_and_message_id() -> None:
    built = build(send(subject="Hi", from_="Alice <alice@example.com>"), now=0.0)
    head = header_block(built.data)
    assert "\r\nMIME-Version: 1.0\r\n" in head
    assert "\r\nDate: Thu, 01 Jan 1970 00:00:00 +0000\r\n" in head
    assert f"\r\nMessage-ID: {built.message_id}\r\n" in head
    assert re.fullmatch(r"<[^<>@\s]+@mailpool\.invalid>", built.message_id)
    assert "Content-Type: text/plain; charset=utf-8" in head
    assert "Content-Transfer-Encoding: 7bit" in head
    assert built.data.endswith(b"\r\n\r\nHello Bob.\r\n")
    assert (built.mail_from, built.recipients) == ("alice@example.com", ["bob@example.org"])
    assert (built.smtputf8, built.eight_bit) == (False, False)


def test_header_names_are_canonical_cased_and_content_fields_come_from_the_tree() -> None:
    message = send(
        subject="s",
        message_id="<given@example.com>",
        mime_version="9.9",
        content_type="image/png",
        content_transfer_encoding="base64",
        x_custom_thing="1",
    )
    message["headers"]["X-MS-Weird"] = "2"
    head = header_block(build(message).data)
    names = [line.split(":", 1)[0] for line in head.split("\r\n") if line[:1] not in " \t"]
    assert "Subject" in names and "Message-ID" in names and "X-Custom-Thing" in names
    assert "X-MS-Weird" in names
    assert names.count("MIME-Version") == 1 and "MIME-Version: 1.0" in head
    assert "image/png" not in head and "base64" not in head


def test_given_message_id_and_date_are_kept() -> None:
    built = build(send(message_id=" <given@example.com>", date="Mon, 1 Jan 2024 00:00:00 +0100"))
    assert built.message_id == "<given@example.com>"
    head = header_block(built.data)
    assert head.count("Message-ID:") == 1 and head.count("Date:") == 1
    assert "Date: Mon, 1 Jan 2024 00:00:00 +0100" in head


def test_message_id_is_stable_for_the_same_message_and_differs_between_messages() -> None:
    message = send(subject="retry me")
    first = build(message, default_id="1700000000000-0", now=1.0)
    retry = build(message, default_id="1700000000000-0", now=99999.0)
    other = build(message, default_id="1700000000000-1", now=1.0)
    assert first.message_id == retry.message_id
    assert first.message_id != other.message_id
    with_id = dict(message, id="order-42")
    a = build(with_id, default_id="x")  # type: ignore[arg-type]
    b = build(with_id, default_id="y")  # type: ignore[arg-type]
    assert a.message_id == b.message_id and "order-42" in a.message_id
    odd = build(dict(message, id="<bad id>\u00e9"), default_id="x")  # type: ignore[arg-type]
    assert re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]+@mailpool\.invalid>", odd.message_id)


def test_hostname_is_used_and_idn_hostname_is_punycoded() -> None:
    built = build(send(), hostname="mx.bücher.example")
    assert built.message_id.endswith("@mx.xn--bcher-kva.example>")


# ---------------------------------------------------------------------------------------
# RFC 2047 and folding


def test_ascii_values_are_written_as_given() -> None:
    value = "Re: [list] a  double-spaced\tand tabbed (comment) subject"
    assert f"Subject: {value}\r\n" in header_block(build(send(subject=value)).data) + "\r\n"


def test_non_ascii_is_encoded_only_where_needed() -> None:
    built = build(send(subject="Quarterly numbers – première version"))
    line = "\r\n".join(field_lines(built.data, "Subject"))
    assert line.startswith("Subject: Quarterly numbers =?utf-8?")
    assert line.endswith("?= version")
    assert line.isascii()
    assert stdlib(built.data)["subject"] == "Quarterly numbers – première version"


@pytest.mark.parametrize(
    "value",
    [
        "日本語の件名 " * 30,
        "x" * 2500,
        "word " * 400,
        " leading and trailing spaces ",
        "looks =?utf-8?q?encoded?= but is not",
        "tab\tand\u00a0no-break\u2028separator",
        "   ",
        "",
    ],
)
def test_long_and_odd_values_fold_and_decode_back_exactly(value: str) -> None:
    built = build(send(subject=value))
    lines = field_lines(built.data, "Subject")
    for line in lines:
        # a line may only run past 78 when it holds one word that cannot be split further
        assert len(line.encode()) <= 78 or " " not in line.strip(" ").removeprefix("Subject: ")
    for word in re.findall(r"=\?[^?]+\?[qb]\?[^?]*\?=", "\r\n".join(lines)):
        assert len(word) <= 75
    assert reparse(built)["headers"]["subject"] == value


def test_address_fields_keep_addresses_and_encode_display_names() -> None:
    message = send(
        from_='"Müller, Hans" <hans@example.com>',
        to='Jöhn Doe <john@example.org>, "Doe, Jane" <jane@example.org>, plain@example.net',
        cc="Ünïcode group: a@example.com, Ä <b@example.com>;",
        reply_to="x@example.com (Zoë)",
    )
    built = build(message)
    head = re.sub(r"\r\n(?=[ \t])", "", header_block(built.data))  # unfolded
    assert head.isascii()
    assert "<hans@example.com>" in head and '"Doe, Jane" <jane@example.org>' in head
    parsed = stdlib(built.data)
    assert [(a.display_name, a.addr_spec) for a in parsed["from"].addresses] == [
        ("Müller, Hans", "hans@example.com")
    ]
    assert [(a.display_name, a.addr_spec) for a in parsed["to"].addresses] == [
        ("Jöhn Doe", "john@example.org"),
        ("Doe, Jane", "jane@example.org"),
        ("", "plain@example.net"),
    ]
    groups = parsed["cc"].groups
    assert groups[0].display_name == "Ünïcode group"
    assert [(a.display_name, a.addr_spec) for a in groups[0].addresses] == [
        ("", "a@example.com"),
        ("Ä", "b@example.com"),
    ]
    assert reparse(built)["headers"]["reply-to"] == "x@example.com (Zoë)"


def test_idn_domains_become_punycode_in_fields_and_envelope() -> None:
    message = send(to="Bob <bob@bücher.example>")
    message["to"] = ["bob@bücher.example", "<carol@例え.jp>"]
    message["from"] = "alice@ålesund.example"
    built = build(message)
    assert built.recipients == ["bob@xn--bcher-kva.example", "carol@xn--r8jz45g.jp"]
    assert built.mail_from == "alice@xn--lesund-hua.example"
    assert "To: Bob <bob@xn--bcher-kva.example>" in header_block(built.data)
    assert built.smtputf8 is False


@pytest.mark.parametrize(
    ("domain", "a_label"),
    [
        # IDNA 2008: Python's idna codec (IDNA 2003) mapped these to other domains
        # (strasse.example, σ for ς): mail went to whoever holds those.
        ("straße.example", "xn--strae-oqa.example"),
        ("ευχαριστώς.gr", "xn--mxahn5agfhds9e.gr"),
        ("Bücher.Example", "xn--bcher-kva.example"),
    ],
)
def test_international_domains_are_written_as_idna_2008_has_them(domain: str, a_label: str) -> None:
    message = send(to=f"x@{domain}")
    message["to"] = [f"x@{domain}"]
    built = build(message)
    assert built.recipients == [f"x@{a_label}"]
    assert f"To: x@{a_label}" in header_block(built.data)


def test_a_domain_idna_2008_does_not_allow_is_refused() -> None:
    message = send()
    message["to"] = ["x@\u2603.example"]  # a snowman: IDNA 2003 took it, 2008 does not
    with pytest.raises(BuildError, match="invalid international domain"):
        build(message)


def test_non_ascii_local_part_needs_smtputf8_and_is_written_raw() -> None:
    message = send(to="Jörg <jörg@example.de>")
    message["to"] = ["jörg@example.de"]
    built = build(message)
    assert built.smtputf8 is True
    assert built.recipients == ["jörg@example.de"]
    assert "To: Jörg <jörg@example.de>" in header_block(built.data)
    ascii_only = build(send(to="Jörg <joerg@example.de>"))
    assert ascii_only.smtputf8 is False


def test_bcc_is_envelope_only() -> None:
    message = send(to="bob@example.org", bcc="secret@example.net", resent_bcc="r@example.net")
    message["to"] = ["bob@example.org", "secret@example.net"]
    built = build(message)
    assert b"secret" not in built.data and b"Bcc" not in built.data
    assert built.recipients == ["bob@example.org", "secret@example.net"]


def test_header_list_replaces_headers_and_keeps_repeated_fields() -> None:
    message = send(subject="ignored")
    message["header_list"] = [["X-Tag", "one"], ["Subject", "chosen"], ["x-tag", "two"]]
    built = build(message)
    received = reparse(built)
    assert received["headers"]["x-tag"] == "one\ntwo"
    assert received["headers"]["subject"] == "chosen"
    assert b"ignored" not in built.data


def test_headers_as_received_send_their_repeated_fields_again() -> None:
    """email.receive joins a field given several times with LF, and email.send has the
    same keys: such a message sent back was dead-lettered as header injection (almost
    every received message has several Received fields; found reviewing the contract).
    Each value becomes a field of that name, so no line can be a field of another."""
    message = send(x_tag="one\ntwö", received="from a by b; Mon, 1 Jan 2026 00:00:00 +0000\n"
                   "from c by d; Mon, 1 Jan 2026 00:00:01 +0000")  # fmt: skip
    message["headers"]["x-note"] = "hi\nBcc: victim@example.com"
    built = build(message)
    lines = (b"\r\n" + built.data).split(b"\r\n")
    assert [line.split(b":")[0] for line in lines].count(b"X-Tag") == 2
    assert [line.split(b":")[0] for line in lines].count(b"Received") == 2
    assert b"X-Note: Bcc: victim@example.com" in lines
    received = reparse(built)
    assert received["headers"]["x-tag"] == "one\ntwö"
    assert received["headers"]["x-note"] == "hi\nBcc: victim@example.com"
    assert "bcc" not in received["headers"]


# ---------------------------------------------------------------------------------------
# header injection


INJECTIONS = [
    ("headers.subject", {"headers": {"subject": "hi\r\nBcc: victim@example.com"}}),
    ("headers.subject", {"headers": {"subject": "hi\nX-Evil: 1"}}),
    ("headers.subject", {"headers": {"subject": "hi\rX-Evil: 1"}}),
    ("headers.subject", {"headers": {"subject": "nul\x00byte"}}),
    ("headers.subject", {"headers": {"subject": "=?utf-8?q?hi=0D=0ABcc:_v@example.com?="}}),
    ("headers.subject", {"headers": {"subject": "=?utf-8?b?aGkKQmNjOiB2QGV4YW1wbGUuY29t?="}}),
    ("headers.subject", {"headers": {"subject": "=?utf-16-le?b?aABpAAoA?="}}),
    ("headers['x-evil\\nbcc']", {"headers": {"x-evil\nbcc": "v@example.com"}}),
    ("header_list[0][1]", {"header_list": [["Subject", "a\r\nb"]]}),
    ("header_list[0][0]", {"header_list": [["Sub\rject", "a"]]}),
    ("to[0]", {"to": ["bob@example.org>\r\nRCPT TO:<victim@example.com"]}),
    ("from", {"from": "a@example.com\r\nRSET"}),
]


@pytest.mark.parametrize(("path", "change"), INJECTIONS)
def test_cr_lf_nul_in_any_field_is_refused(path: str, change: dict[str, Any]) -> None:
    message = dict(send(), **change)
    with pytest.raises(BuildError) as caught:
        build_message(message, default_id="1-0")  # type: ignore[arg-type]
    assert caught.value.path == path
    assert "CR, LF or NUL" in caught.value.reason


@pytest.mark.parametrize(
    ("path", "part"),
    [
        ("content.parts[0].filename", {"filename": "a\r\nContent-Type: text/html"}),
        ("content.parts[0].headers.content-id", {"headers": {"content-id": "<a>\n<b>"}}),
        ("content.parts[0].content-type", {"content-type": "text/plain;\r\n x=1"}),
    ],
)
def test_cr_lf_in_part_fields_is_refused(path: str, part: dict[str, Any]) -> None:
    leaf = {"content-type": "text/plain", "body": b"x", **part}
    message = send({"content-type": "multipart/mixed", "parts": [leaf]})
    with pytest.raises(BuildError) as caught:
        build_message(message, default_id="1-0")
    assert caught.value.path == path


@pytest.mark.parametrize("address", ["no-domain", "two words@example.com", "a@", "@b", "a@b@"])
def test_bad_envelope_addresses_are_refused(address: str) -> None:
    message = send()
    message["to"] = [address]
    with pytest.raises(BuildError) as caught:
        build_message(message, default_id="1-0")
    assert caught.value.path == "to[0]"


def test_postmaster_without_domain_is_a_valid_recipient() -> None:
    message = send()
    message["to"] = ["Postmaster"]
    assert build(message).recipients == ["Postmaster"]


def test_non_ascii_message_id_cannot_be_encoded() -> None:
    with pytest.raises(BuildError, match=r"^headers\.message-id: "):
        build_message(send(message_id="<é@example.com>"), default_id="1-0")


def test_schema_errors_surface_from_build() -> None:
    with pytest.raises(SchemaError, match=r"^content\.body: expected bin or str, got int$"):
        build_message(send({"content-type": "text/plain", "body": 3}), default_id="1")
    with pytest.raises(CodecError, match="invalid international domain"):
        build_message(send(to="a@" + "ü" * 70 + ".example"), default_id="1")


# ---------------------------------------------------------------------------------------
# bodies


def cte_of(data: bytes) -> list[str]:
    return re.findall(r"Content-Transfer-Encoding: (\S+)", data.decode("utf-8"))


@pytest.mark.parametrize(
    ("content_type", "body", "cte"),
    [
        ("text/plain", "plain ascii\n", "7bit"),
        ("text/plain", "mostly ascii with one é\n" * 5, "quoted-printable"),
        ("text/plain", "Съешь же ещё этих мягких французских булок\n", "base64"),
        ("text/plain", "a" * 1500 + "\n", "quoted-printable"),
        ("application/octet-stream", bytes(range(256)) * 4, "base64"),
        ("application/json", b'{"a": 1}\r\n', "7bit"),
        ("application/json", b'{"a":\n1}', "quoted-printable"),
        ("text/plain", "nul \x00 inside\n", "quoted-printable"),
    ],
)
def test_each_leaf_gets_a_fitting_transfer_encoding(
    content_type: str, body: str | bytes, cte: str
) -> None:
    leaf = {"content-type": content_type, "body": body}
    built = build(send({"content-type": "multipart/mixed", "parts": [leaf]}))
    assert cte_of(built.data) == [cte]
    expected = body.encode() if isinstance(body, str) else body
    assert reparse(built)["content"]["parts"][0]["body"] == expected
    payload = stdlib(built.data).get_payload()[0].get_payload(decode=True)
    if content_type.startswith("text/"):
        payload = payload.replace(b"\r\n", b"\n")
    assert payload == expected


def test_text_line_ends_are_sent_as_crlf() -> None:
    built = build(send({"content-type": "text/plain", "body": b"a\nb\r\nc\rd\n"}))
    assert built.data.endswith(b"\r\n\r\na\r\nb\r\nc\r\nd\r\n")


def test_root_text_without_final_newline_survives_exactly() -> None:
    built = build(send({"content-type": "text/plain", "body": "no newline at the end"}))
    assert cte_of(built.data) == ["quoted-printable"]
    assert reparse(built)["content"]["body"] == b"no newline at the end"


def test_str_body_gets_utf8_charset_unless_one_is_given() -> None:
    given = build(send({"content-type": "text/plain; charset=iso-8859-1", "body": b"caf\xe9\n"}))
    assert "Content-Type: text/plain; charset=iso-8859-1\r\n" in header_block(given.data) + "\r\n"
    added = build(send({"content-type": "text/html", "body": "<p>é</p>\n"}))
    assert "Content-Type: text/html; charset=utf-8" in header_block(added.data)
    raw_bytes = build(send({"content-type": "text/plain", "body": b"x\n"}))
    assert "Content-Type: text/plain\r\n" in header_block(raw_bytes.data)


def test_attachment_filenames_use_rfc2231_when_needed() -> None:
    names = ["report.pdf", "two words.txt", "rapport-été.bin", "ü" * 80 + ".txt", 'q"uo\\te']
    parts = [
        {"content-type": "application/pdf", "filename": name, "body": b"%PDF"} for name in names
    ]
    parts.append(
        {
            "content-type": "image/png",
            "filename": "bild.png",
            "headers": {"content-disposition": "inline", "content-id": "<img1@example.com>"},
            "body": b"\x89PNG",
        }
    )
    built = build(send({"content-type": "multipart/mixed", "parts": parts}))
    stdlib_parts = stdlib(built.data).get_payload()
    assert [part.get_filename() for part in stdlib_parts] == [*names, "bild.png"]
    assert stdlib_parts[-1].get_content_disposition() == "inline"
    assert stdlib_parts[-1]["content-id"] == "<img1@example.com>"
    assert [part["filename"] for part in reparse(built)["content"]["parts"]] == [*names, "bild.png"]
    assert 'filename="report.pdf"' in header_block(built.data.split(b"--=_")[1][40:] + b"\r\n\r\n")


def test_lines_starting_with_a_dot_survive_a_real_smtp_transfer() -> None:
    body = ".\n..\n.leading dot\n. space\nend\n"
    message = send(
        {
            "content-type": "multipart/mixed",
            "parts": [
                {"content-type": "text/plain", "body": body},
                {"content-type": "application/octet-stream", "body": b".\r\n.x\r\n"},
            ],
        },
        subject=".dotted",
    )
    built = build(message)
    assert b"\r\n.\r\n" in built.data  # not stuffed here: the SMTP client does it
    with SmtpSink() as (port, received), smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(built.mail_from, built.recipients, built.data)
    assert received[0] == built.data
    parts = reparse(built)["content"]["parts"]
    assert parts[0]["body"] == body.encode() and parts[1]["body"] == b".\r\n.x\r\n"


class _Collect:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.received.append(envelope.original_content)
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class SmtpSink:
    """A real aiosmtpd server on a free loopback port collecting message bytes."""

    def __init__(self) -> None:
        self.handler = _Collect()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=_free_port())

    def __enter__(self) -> tuple[int, list[bytes]]:
        self.controller.start()
        return self.controller.port, self.handler.received

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


# ---------------------------------------------------------------------------------------
# multipart boundaries


def boundaries(data: bytes) -> list[str]:
    return re.findall(r'boundary="?([^";\r\n]+)"?', data.decode("utf-8"))


def test_boundary_is_never_found_inside_the_content() -> None:
    leaf = {"content-type": "text/plain", "body": "first\n"}
    message = send({"content-type": "multipart/mixed", "parts": [leaf, dict(leaf)]})
    would_be = boundaries(build(message).data)[0]
    hostile = f"--{would_be}\n--{would_be}--\n"
    message["content"]["parts"][1] = {"content-type": "text/plain", "body": hostile}
    built = build(message)
    chosen = boundaries(built.data)[0]
    assert chosen != would_be
    parts = reparse(built)["content"]["parts"]
    assert [part["body"] for part in parts] == [b"first\n", hostile.encode()]


def test_given_boundary_is_kept_when_safe_and_replaced_when_not() -> None:
    leaf = {"content-type": "text/plain", "body": "x\n"}
    safe = send({"content-type": 'multipart/mixed; boundary="my-boundary"', "parts": [leaf]})
    assert boundaries(build(safe).data) == ["my-boundary"]
    clash = {"content-type": "text/plain", "body": "--my-boundary\n"}
    unsafe = send({"content-type": "multipart/mixed; boundary=my-boundary", "parts": [clash]})
    built = build(unsafe)
    assert boundaries(built.data) != ["my-boundary"]
    assert reparse(built)["content"]["parts"][0]["body"] == b"--my-boundary\n"
    invalid = send({"content-type": 'multipart/mixed; boundary="bad boundary "', "parts": [leaf]})
    assert boundaries(build(invalid).data) != ["bad boundary "]


def test_nested_multiparts_get_distinct_boundaries() -> None:
    leaf = {"content-type": "text/plain", "body": "x\n"}
    inner = {"content-type": 'multipart/alternative; boundary="b"', "parts": [leaf, leaf]}
    outer = send({"content-type": 'multipart/mixed; boundary="b"', "parts": [inner, leaf]})
    built = build(outer)
    found = boundaries(built.data)
    assert len(found) == len(set(found)) == 2
    assert not any(a != b and b.startswith(a) for a in found for b in found)
    tree = reparse(built)["content"]
    assert len(tree["parts"]) == 2 and len(tree["parts"][0]["parts"]) == 2


def test_multipart_without_parts_or_with_body_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"^content\.parts: "):
        build_message(send({"content-type": "multipart/mixed", "body": b"x"}), default_id="1")


def test_embedded_message_is_a_leaf_kept_byte_for_byte() -> None:
    inner = build(send(subject="inner")).data
    part = {"content-type": "message/rfc822", "body": inner}
    built = build(send({"content-type": "multipart/mixed", "parts": [part]}))
    assert cte_of(built.data)[-1] == "7bit"
    assert reparse(built)["content"]["parts"][0]["body"] == inner


def test_non_ascii_content_type_parameters_use_rfc2231() -> None:
    leaf = {"content-type": 'application/pdf; name="Übersicht.pdf"', "body": b"%PDF"}
    built = build(send({"content-type": "multipart/mixed; charset=x", "parts": [leaf]}))
    head = built.data.decode("ascii")
    assert "name*=utf-8''%C3%9Cbersicht.pdf" in head
    assert stdlib(built.data).get_payload()[0].get_param("name") == "Übersicht.pdf"
