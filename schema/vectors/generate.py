"""Write mailpool's golden vectors: ``*.msgpack`` entries with a readable JSON twin each.

Run from anywhere: ``python schema/vectors/generate.py`` (``--check`` compares instead of
writing and exits 1 on any difference).  Output is deterministic: fixed ids and timestamps,
map keys in the order written here, bytes from mailpool's own encoder
(``workers.codec.wire.pack``).  ``tests/test_schema_vectors.py`` regenerates them and
requires byte-identical files, so edit this script, never the vectors.

JSON twin convention (see ``schema/README.md``): a msgpack bin value becomes
``{"$bin": "<standard base64 with padding>"}``; str, int, float, nil, arrays and maps map
to their JSON counterparts.

The receive vectors that have a ``SOURCES`` entry are what ``parse_message`` gives for those
raw bytes and that envelope; the tests hold the parser to it.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

VECTOR_DIR = Path(__file__).resolve().parent
INVALID_DIR = VECTOR_DIR / "invalid"
ENTRY_DIR = VECTOR_DIR / "entries"
REPO_ROOT = VECTOR_DIR.parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make ``workers`` importable
    sys.path.insert(0, str(REPO_ROOT))

from workers.codec.wire import pack  # noqa: E402 - needs the path set up above

RECEIVED_AT = 1767225600.25  # 2026-01-01T00:00:00.25Z: a float with a fraction on purpose
DATE = "Thu, 01 Jan 2026 00:00:00 +0000"


# ---------------------------------------------------------------------------------------
# JSON twin


def to_twin(value: Any) -> Any:
    """The JSON twin of a decoded msgpack value (bin -> {"$bin": base64})."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bin": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {key: to_twin(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_twin(item) for item in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"no JSON twin for {type(value).__name__}")


def from_twin(value: Any) -> Any:
    """The msgpack-ready value of a JSON twin ({"$bin": base64} -> bytes)."""
    if isinstance(value, dict):
        if value.keys() == {"$bin"}:
            return base64.b64decode(value["$bin"], validate=True)
        return {key: from_twin(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_twin(item) for item in value]
    return value


def render_twin(twin: Any) -> bytes:
    return (json.dumps(twin, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------
# raw sources of receive vectors (what ingest hands to parse_message)


@dataclass(frozen=True)
class Source:
    raw: bytes
    mail_from: str  # as the SMTP server reports it ("" for MAIL FROM:<>)
    rcpt_tos: tuple[str, ...]
    message_id: str
    keep_raw: str = "defects"
    auth: dict[str, Any] | None = None  # the verdicts ingest passes along (``auth``)


NULL_SENDER_RAW = (
    b"From: MAILER-DAEMON@mx.example.org\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: Delivery Status Notification\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <dsn-1@mx.example.org>\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"\r\n"
    b"Your message could not be delivered.\r\n"
)

UTF8_HEADERS_RAW = (
    b"Received: from client.example (client.example [192.0.2.7])\r\n"
    b"\tby mx.example.org with ESMTP; Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Received: from laptop.example by client.example; Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.com>\r\n"
    b"To: Ann <ann@example.org>\r\n"
    b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4g4piV?=\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <utf8-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"X-Tag: one\r\n"
    b"X-Tag: two\r\n"
    b"\r\n"
    b"Hallo Ann,\r\n"
    b"sch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe.\r\n"
)

MULTIPART_RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Report\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <multi-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Der Bericht f=C3=BCr Januar.\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"<p>Der Bericht f=C3=BCr Januar.</p>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b'Content-Type: application/pdf; name="=?utf-8?q?Bericht_M=C3=A4rz.pdf?="\r\n'
    b"Content-Disposition: attachment;\r\n"
    b" filename*=utf-8''Bericht%20M%C3%A4rz.pdf\r\n"
    b"Content-ID: <report@example.com>\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQKJcOkw7zDtsOfCg==\r\n"
    b"--outer--\r\n"
)

EMBEDDED_MESSAGE = (
    b"From: Carol <carol@example.net>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: Hello\r\n"
    b"\r\n"
    b"Hi Alice!"
)

RFC822_RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Fwd: Hello\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="fwd"\r\n'
    b"\r\n"
    b"--fwd\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"See below.\r\n"
    b"--fwd\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n" + EMBEDDED_MESSAGE + b"\r\n"
    b"--fwd--\r\n"
)

DEFECTS_RAW = (
    b"From: alice@example.com\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?x-unknown?q?caf=E9?=\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"SGVsbG8gd29ybGQ\r\n"
)

# Octets that line-end normalisation would change (CR, CRLF), as in a JPEG.
IMAGE_OCTETS = b"\xff\xd8\xff\xe0\x00\x10JFIF\r\n\x1a\r\x00\r\r\n\xff\xd9"

DECODING_RULES_RAW = (
    b"From: =?utf-8?q?Bank_<evil=40attacker.example>,?= <real@bank.example>\r\n"
    b"Reply-To: =?UTF-8?B?Rm9vLCBCYXI=?= <foo@example.com>\r\n"
    b"To: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.com>\r\n"
    b"Subject: =?utf-8?q?Foo,_Bar?=\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <rules-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="rules"\r\n'
    b"\r\n"
    b"--rules\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"CRLF ends a line,=0Da lone CR does not.\r\n"
    b"Second line.\r\n"
    b"--rules\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Disposition: attachment;\r\n"
    b" filename*=utf-8''%3D%3Futf-8%3Fq%3Fa_b%3F%3D.txt\r\n"
    b"\r\n"
    b"The name above is literal.\r\n"
    b"--rules\r\n"
    b'Content-Type: ; name="x.jpg"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(IMAGE_OCTETS).replace(b"\n", b"\r\n") + b"--rules--\r\n"
)

# Received from a forwarder's IP with verification on: ingest's Authentication-Results field
# above its Received field, the sender's signature kept as sent (shortened here: the
# verdicts are what ingest found, this vector does not re-verify).
AUTH_FIELD = (
    b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=example.com;\r\n"
    b"\tspf=none smtp.helo=fwd.example.org;\r\n"
    b"\tdkim=pass header.d=example.com header.a=ed25519-sha256 header.s=e1;\r\n"
    b"\tdmarc=pass header.from=example.com policy.dmarc=reject; arc=none\r\n"
)
AUTH_RESULTS = AUTH_FIELD.decode().partition(": ")[2].replace("\r\n", "").rstrip()
RECEIVED_AUTH = (
    "from fwd.example.org ([192.0.2.25])\r\n\tby mx.example.net with ESMTP id "
    "a0717a0717a0717a0717a0717a0717a0;\r\n\tThu, 01 Jan 2026 00:00:00 +0000"
)
AUTH_RAW = (
    AUTH_FIELD + b"Received: " + RECEIVED_AUTH.encode() + b"\r\n"
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=e1;\r\n"
    b"\th=from:to:subject; bh=EOAWpwo8Ur9WVaC9ftCJ1PmMCfgMKCzLu3ALN/cB+Lw=; b=shortened\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Signed\r\n"
    b"\r\n"
    b"Verified on the way in.\r\n"
)
AUTH_VERDICTS: dict[str, Any] = {
    "spf_mailfrom": {"result": "pass", "domain": "example.com"},
    "spf_helo": {"result": "none", "domain": "fwd.example.org"},
    "dkim": [
        {"result": "pass", "domain": "example.com", "selector": "e1",
         "algorithm": "ed25519-sha256"},
    ],
    "dmarc": {"result": "pass", "domain": "example.com", "policy": "reject", "aligned": ["dkim"]},
    "arc": {"result": "none", "instances": 0},
}  # fmt: skip

SOURCES: dict[str, Source] = {
    "receive-null-sender": Source(
        NULL_SENDER_RAW, "", ("alice@example.com",), "5e0c6a1f2b3d4c5e8f7a9b0c1d2e3f40"
    ),
    "receive-utf8-headers": Source(
        UTF8_HEADERS_RAW,
        "joerg@example.com",
        ("ann@example.org",),
        "0b7d9e1c3a5f4e2d9c8b7a6f5e4d3c2b",
    ),
    "receive-multipart-attachment": Source(
        MULTIPART_RAW,
        "alice@example.com",
        ("bob@example.org", "carol@example.org"),
        "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    ),
    "receive-rfc822": Source(
        RFC822_RAW, "alice@example.com", ("bob@example.org",), "c0ffee00c0ffee00c0ffee00c0ffee00"
    ),
    "receive-defects-raw": Source(
        DEFECTS_RAW, "alice@example.com", ("bob@example.org",), "d3fec7d3fec7d3fec7d3fec7d3fec7d3"
    ),
    "receive-decoding-rules": Source(
        DECODING_RULES_RAW,
        "bounce@bank.example",
        ("joerg@example.com",),
        "5eed5eed5eed5eed5eed5eed5eed5eed",
    ),
    "receive-auth": Source(
        AUTH_RAW,
        "alice@example.com",
        ("bob@example.net",),
        "a0717a0717a0717a0717a0717a0717a0",
        auth=AUTH_VERDICTS,
    ),
}


# ---------------------------------------------------------------------------------------
# valid vectors


def _receive_vectors() -> dict[str, dict[str, Any]]:
    return {
        # Spec keys only: what a producer that knows nothing of mailpool's extensions writes.
        "receive-minimal": {
            "from": "alice@example.com",
            "to": ["bob@example.org"],
            "headers": {"subject": "Hi"},
            "content": {"content-type": "text/plain", "body": b"Hello Bob.\n"},
        },
        "receive-null-sender": {
            "from": None,
            "to": ["alice@example.com"],
            "headers": {
                "from": "MAILER-DAEMON@mx.example.org",
                "to": "alice@example.com",
                "subject": "Delivery Status Notification",
                "date": DATE,
                "message-id": "<dsn-1@mx.example.org>",
                "auto-submitted": "auto-replied",
            },
            "content": {
                "content-type": "text/plain; charset=us-ascii",
                "body": b"Your message could not be delivered.\n",
            },
            "id": SOURCES["receive-null-sender"].message_id,
            "version": 1,
            "received_at": RECEIVED_AT,
            "size": len(NULL_SENDER_RAW),
            "header_list": [
                ["From", "MAILER-DAEMON@mx.example.org"],
                ["To", "alice@example.com"],
                ["Subject", "Delivery Status Notification"],
                ["Date", DATE],
                ["Message-ID", "<dsn-1@mx.example.org>"],
                ["Auto-Submitted", "auto-replied"],
            ],
        },
        "receive-utf8-headers": _utf8_headers_vector(),
        "receive-multipart-attachment": _multipart_vector(),
        "receive-rfc822": _rfc822_vector(),
        "receive-defects-raw": _defects_vector(),
        "receive-decoding-rules": _decoding_rules_vector(),
        "receive-auth": _auth_vector(),
    }


def _utf8_headers_vector() -> dict[str, Any]:
    # Unfolding removes the CRLF only: the folding TAB stays, as RFC 5322 section 2.2.3 says.
    first_received = (
        "from client.example (client.example [192.0.2.7])"
        "\tby mx.example.org with ESMTP; Thu, 01 Jan 2026 00:00:00 +0000"
    )
    second_received = "from laptop.example by client.example; Thu, 01 Jan 2026 00:00:00 +0000"
    header_list = [
        ["Received", first_received],
        ["Received", second_received],
        ["From", "Jörg Müller <joerg@example.com>"],
        ["To", "Ann <ann@example.org>"],
        ["Subject", "Grüße aus Köln ☕"],
        ["Date", DATE],
        ["Message-ID", "<utf8-1@example.com>"],
        ["MIME-Version", "1.0"],
        ["Content-Type", "text/plain; charset=utf-8"],
        ["Content-Transfer-Encoding", "8bit"],
        ["X-Tag", "one"],
        ["X-Tag", "two"],
    ]
    return {
        "from": "joerg@example.com",
        "to": ["ann@example.org"],
        "headers": {
            "received": f"{first_received}\n{second_received}",
            "from": "Jörg Müller <joerg@example.com>",
            "to": "Ann <ann@example.org>",
            "subject": "Grüße aus Köln ☕",
            "date": DATE,
            "message-id": "<utf8-1@example.com>",
            "mime-version": "1.0",
            "content-type": "text/plain; charset=utf-8",
            "content-transfer-encoding": "8bit",
            "x-tag": "one\ntwo",
        },
        "content": {
            "content-type": "text/plain; charset=utf-8",
            "body": "Hallo Ann,\nschöne Grüße.\n".encode(),
        },
        "id": SOURCES["receive-utf8-headers"].message_id,
        "version": 1,
        "received_at": RECEIVED_AT,
        "size": len(UTF8_HEADERS_RAW),
        "header_list": header_list,
    }


def _multipart_vector() -> dict[str, Any]:
    qp = {"content-transfer-encoding": "quoted-printable"}
    alternative = {
        "content-type": 'multipart/alternative; boundary="inner"',
        "parts": [
            {
                "content-type": "text/plain; charset=utf-8",
                "headers": qp,
                "body": "Der Bericht für Januar.".encode(),
            },
            {
                "content-type": "text/html; charset=utf-8",
                "headers": qp,
                "body": "<p>Der Bericht für Januar.</p>".encode(),
            },
        ],
    }
    attachment = {
        "content-type": 'application/pdf; name="=?utf-8?q?Bericht_M=C3=A4rz.pdf?="',
        "headers": {
            "content-disposition": "attachment; filename*=utf-8''Bericht%20M%C3%A4rz.pdf",
            "content-id": "<report@example.com>",
            "content-transfer-encoding": "base64",
        },
        "filename": "Bericht März.pdf",
        "body": "%PDF-1.4\n%äüöß\n".encode(),
    }
    return {
        "from": "alice@example.com",
        "to": ["bob@example.org", "carol@example.org"],
        "headers": {
            "from": "Alice <alice@example.com>",
            "to": "Bob <bob@example.org>",
            "subject": "Report",
            "date": DATE,
            "message-id": "<multi-1@example.com>",
            "mime-version": "1.0",
            "content-type": 'multipart/mixed; boundary="outer"',
        },
        "content": {
            "content-type": 'multipart/mixed; boundary="outer"',
            "parts": [alternative, attachment],
        },
        "id": SOURCES["receive-multipart-attachment"].message_id,
        "version": 1,
        "received_at": RECEIVED_AT,
        "size": len(MULTIPART_RAW),
        "header_list": [
            ["From", "Alice <alice@example.com>"],
            ["To", "Bob <bob@example.org>"],
            ["Subject", "Report"],
            ["Date", DATE],
            ["Message-ID", "<multi-1@example.com>"],
            ["MIME-Version", "1.0"],
            ["Content-Type", 'multipart/mixed; boundary="outer"'],
        ],
    }


def _rfc822_vector() -> dict[str, Any]:
    return {
        "from": "alice@example.com",
        "to": ["bob@example.org"],
        "headers": {
            "from": "Alice <alice@example.com>",
            "to": "Bob <bob@example.org>",
            "subject": "Fwd: Hello",
            "mime-version": "1.0",
            "content-type": 'multipart/mixed; boundary="fwd"',
        },
        "content": {
            "content-type": 'multipart/mixed; boundary="fwd"',
            "parts": [
                {"content-type": "text/plain", "body": b"See below."},
                # A leaf: the embedded message's bytes, not parsed further.
                {
                    "content-type": "message/rfc822",
                    "headers": {"content-disposition": "inline"},
                    "body": EMBEDDED_MESSAGE,
                },
            ],
        },
        "id": SOURCES["receive-rfc822"].message_id,
        "version": 1,
        "received_at": RECEIVED_AT,
        "size": len(RFC822_RAW),
        "header_list": [
            ["From", "Alice <alice@example.com>"],
            ["To", "Bob <bob@example.org>"],
            ["Subject", "Fwd: Hello"],
            ["MIME-Version", "1.0"],
            ["Content-Type", 'multipart/mixed; boundary="fwd"'],
        ],
    }


def _defects_vector() -> dict[str, Any]:
    subject = "caf\ufffd"  # unknown charset: decoded as UTF-8 with replacement, see defects
    return {
        "from": "alice@example.com",
        "to": ["bob@example.org"],
        "headers": {
            "from": "alice@example.com",
            "to": "bob@example.org",
            "subject": subject,
            "mime-version": "1.0",
            "content-type": "text/plain; charset=utf-8",
            "content-transfer-encoding": "base64",
        },
        "content": {"content-type": "text/plain; charset=utf-8", "body": b"Hello world"},
        "id": SOURCES["receive-defects-raw"].message_id,
        "version": 1,
        "received_at": RECEIVED_AT,
        "size": len(DEFECTS_RAW),
        "header_list": [
            ["From", "alice@example.com"],
            ["To", "bob@example.org"],
            ["Subject", subject],
            ["MIME-Version", "1.0"],
            ["Content-Type", "text/plain; charset=utf-8"],
            ["Content-Transfer-Encoding", "base64"],
        ],
        "defects": [
            "headers.subject: unknown charset 'x-unknown', decoded as UTF-8 with replacement",
            "content.body: base64 body has incorrect padding",
        ],
        "raw": DEFECTS_RAW,
    }


def _auth_vector() -> dict[str, Any]:
    signature = (
        "v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=e1;\th=from:to:subject; "
        "bh=EOAWpwo8Ur9WVaC9ftCJ1PmMCfgMKCzLu3ALN/cB+Lw=; b=shortened"
    )
    fields = [
        ["Authentication-Results", AUTH_RESULTS],
        ["Received", RECEIVED_AUTH.replace("\r\n", "")],
        ["DKIM-Signature", signature],
        ["From", "Alice <alice@example.com>"],
        ["To", "bob@example.net"],
        ["Subject", "Signed"],
    ]
    return {
        "from": "alice@example.com",
        "to": ["bob@example.net"],
        "headers": {name.lower(): value for name, value in fields},
        "content": {
            "content-type": "text/plain; charset=us-ascii",
            "body": b"Verified on the way in.\n",
        },
        "id": SOURCES["receive-auth"].message_id,
        "version": 1,
        "received_at": RECEIVED_AT,
        "size": len(AUTH_RAW),
        "header_list": fields,
        "auth": AUTH_VERDICTS,
    }


def _decoding_rules_vector() -> dict[str, Any]:
    # Address fields: an encoded display name with specials comes back as a quoted-string, so
    # a list parser finds the one mailbox the sender wrote; other fields decode as they are.
    header_list = [
        ["From", '"Bank <evil@attacker.example>," <real@bank.example>'],
        ["Reply-To", '"Foo, Bar" <foo@example.com>'],
        ["To", "Jörg Müller <joerg@example.com>"],
        ["Subject", "Foo, Bar"],
        ["Date", DATE],
        ["Message-ID", "<rules-1@example.com>"],
        ["MIME-Version", "1.0"],
        ["Content-Type", 'multipart/mixed; boundary="rules"'],
    ]
    text = {
        "content-type": "text/plain; charset=us-ascii",
        "headers": {"content-transfer-encoding": "quoted-printable"},
        "body": b"CRLF ends a line,\ra lone CR does not.\nSecond line.",
    }
    literal_name = {
        "content-type": "text/plain; charset=us-ascii",
        "headers": {
            "content-disposition": "attachment; filename*=utf-8''%3D%3Futf-8%3Fq%3Fa_b%3F%3D.txt"
        },
        "filename": "=?utf-8?q?a_b?=.txt",  # RFC 2231 text is never RFC 2047-decoded
        "body": b"The name above is literal.",
    }
    unreadable_type = {
        # RFC 2045 section 5.2; the field as sent stays in headers, the octets are untouched.
        "content-type": "text/plain; charset=us-ascii",
        "headers": {"content-type": '; name="x.jpg"', "content-transfer-encoding": "base64"},
        "filename": "x.jpg",
        "body": IMAGE_OCTETS,
    }
    return {
        "from": "bounce@bank.example",
        "to": ["joerg@example.com"],
        "headers": {name.lower(): value for name, value in header_list},
        "content": {
            "content-type": 'multipart/mixed; boundary="rules"',
            "parts": [text, literal_name, unreadable_type],
        },
        "id": SOURCES["receive-decoding-rules"].message_id,
        "version": 1,
        "received_at": RECEIVED_AT,
        "size": len(DECODING_RULES_RAW),
        "header_list": header_list,
        "defects": [
            "content.parts[2]: invalid Content-Type '; name=\"x.jpg\"', read as text/plain; "
            "charset=us-ascii, body octets kept"
        ],
        "raw": DECODING_RULES_RAW,
    }


def _send_vectors() -> dict[str, dict[str, Any]]:
    return {
        "send-minimal": {
            "from": "app@example.com",
            "to": ["ann@example.org"],
            "headers": {"from": "app@example.com", "to": "ann@example.org", "subject": "Hello"},
            "content": {"content-type": "text/plain; charset=utf-8", "body": b"Hello Ann.\n"},
        },
        "send-null-sender": {
            "from": None,
            "to": ["alice@example.com"],
            "headers": {
                "from": "Mail Delivery System <mailer-daemon@example.org>",
                "to": "alice@example.com",
                "subject": "Undelivered Mail Returned to Sender",
                "auto-submitted": "auto-replied",
            },
            "content": {
                "content-type": "text/plain; charset=utf-8",
                "body": b"Your message to bob@example.org could not be delivered.\n",
            },
        },
        "send-alternative-attachment": _send_attachment_vector(),
        "send-header-list": _send_header_list_vector(),
        "send-unknown-keys": {
            "from": "app@example.com",
            "to": ["ann@example.org"],
            "headers": {"subject": "From a newer producer"},
            "content": {
                "content-type": "text/plain; charset=utf-8",
                "body": b"Consumers ignore keys they do not know.\n",
                "x-future-part-key": {"anything": [1, 2.5, None]},
            },
            "version": 1,
            "x-future-key": "ignored by version 1 consumers",
        },
    }


def _send_attachment_vector() -> dict[str, Any]:
    # Text bodies as str (a send extension: encoded UTF-8); the attachment as bin, with
    # octets that are not UTF-8 and a NUL, so a decoder that reads bin as text shows it.
    pdf_bytes = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n\x00\x01\x02\xff\xfe\n%%EOF\n"
    return {
        "from": "shop@example.com",
        "to": ["ann@example.org"],
        "headers": {
            "from": "Müller & Söhne <shop@example.com>",
            "to": "Ann Öztürk <ann@example.org>",
            "subject": "Ihre Rechnung Nr. 42 – vielen Dank ☺",
        },
        "content": {
            "content-type": "multipart/mixed",
            "parts": [
                {
                    "content-type": "multipart/alternative",
                    "parts": [
                        {
                            "content-type": "text/plain; charset=utf-8",
                            "body": "Hallo Ann,\nanbei die Rechnung für März.\n",
                        },
                        {
                            "content-type": "text/html; charset=utf-8",
                            "body": "<p>Hallo Ann,</p><p>anbei die Rechnung für März.</p>\n",
                        },
                    ],
                },
                {
                    "content-type": "application/pdf",
                    "filename": "Rechnung März 2026 – Nr. 42.pdf",
                    "headers": {"content-id": "<invoice-42@example.com>"},
                    "body": pdf_bytes,
                },
            ],
        },
        "version": 1,
    }


def _send_header_list_vector() -> dict[str, Any]:
    return {
        "from": "news@example.com",
        "to": ["ann@example.org", "bob@example.org"],
        # "headers" stays for spec-only consumers; builders write header_list instead.  A
        # repeated field cannot be joined with "\n" here: LF is refused in any send header.
        "headers": {
            "from": "News <news@example.com>",
            "to": "undisclosed-recipients:;",
            "subject": "Wochenrückblick",
            "list-unsubscribe": "<mailto:unsubscribe@example.com>",
        },
        "header_list": [
            ["From", "News <news@example.com>"],
            ["To", "undisclosed-recipients:;"],
            ["Subject", "Wochenrückblick"],
            ["Comments", "first"],
            ["Comments", "second"],
            ["List-Unsubscribe", "<mailto:unsubscribe@example.com>"],
        ],
        "content": {"content-type": "text/plain; charset=utf-8", "body": b"This week...\n"},
        "id": "newsletter-2026-01-ann-bob",
        "version": 1,
        "max_attempts": 5,
        "max_age": 86400,  # an int where a number is expected: valid (JSON has one number type)
        "dkim": {"selector": "news2026"},  # signed by this key of news@'s domain (example.com)
    }


def valid_vectors() -> dict[str, dict[str, Any]]:
    return {**_receive_vectors(), **_send_vectors()}


def kind_of(name: str) -> str:
    """The kind ("receive" or "send"): every vector name starts with it."""
    return name.split("-", 1)[0]


# ---------------------------------------------------------------------------------------
# invalid vectors


@dataclass(frozen=True)
class Invalid:
    kind: str  # which validator must reject it: "receive" or "send"
    stage: str  # "wire" (msgpack level: WireError) or "schema" (SchemaError or BuildError)
    path: str  # the path our validator names ("" for the whole entry)
    reason: str  # what is wrong, in words (validators' wording may differ)
    description: str
    data: Callable[[], bytes]


def _packb(value: Any) -> bytes:
    """Raw msgpack for entries our own encoder would refuse to write."""
    return bytes(msgpack.packb(value, use_bin_type=True))


def _send(**changes: Any) -> dict[str, Any]:
    message = dict(_send_vectors()["send-minimal"])
    message.update(changes)
    return {key: value for key, value in message.items() if value is not _DROP}


_DROP = object()


def _nested_arrays(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _with_latin1_subject(minimal: bytes) -> bytes:
    """send-minimal with its subject str "Hello" turned into the Latin-1 octets of "Hellö"."""
    utf8_subject = b"\xa5Hello"  # fixstr of 5 octets
    assert minimal.count(utf8_subject) == 1
    return minimal.replace(utf8_subject, b"\xa5Hell\xf6")


def _invalid_vectors() -> dict[str, Invalid]:
    minimal = pack(_send_vectors()["send-minimal"])
    text = {"content-type": "text/plain", "body": b"x"}
    return {
        "wire-not-msgpack": Invalid(
            "send", "wire", "", "not msgpack", "0xc1 is never used in msgpack", lambda: b"\xc1"
        ),
        "wire-truncated": Invalid(
            "send",
            "wire",
            "",
            "truncated",
            "send-minimal without its last 3 octets",
            lambda: minimal[:-3],
        ),
        "wire-top-level-array": Invalid(
            "send",
            "wire",
            "",
            "top level is not a map",
            "an array where the message map belongs",
            lambda: _packb(["app@example.com", ["ann@example.org"]]),
        ),
        "wire-ext-type": Invalid(
            "send",
            "wire",
            "",
            "ext type",
            "a msgpack ext value (type 5) as a body",
            lambda: _packb(
                _send(content={"content-type": "text/plain", "body": msgpack.ExtType(5, b"\x00")})
            ),
        ),
        "wire-int-map-key": Invalid(
            "send",
            "wire",
            "",
            "map key is not a str",
            "an integer map key in headers",
            lambda: _packb(_send(headers={1: "one"})),
        ),
        "wire-too-deep": Invalid(
            "send",
            "wire",
            "",
            "nested too deep",
            "200 nested arrays under an unknown key (the depth limit is 64)",
            lambda: _packb(_send(**{"x-deep": _nested_arrays(200)})),
        ),
        "wire-trailing-data": Invalid(
            "send",
            "wire",
            "",
            "trailing data",
            "send-minimal followed by one more msgpack value: an entry holds exactly one map",
            lambda: minimal + b"\xc0",
        ),
        "wire-str-not-utf8": Invalid(
            "send",
            "wire",
            "",
            "str is not UTF-8",
            "a msgpack str (not bin) whose octets are Latin-1, not UTF-8",
            lambda: _with_latin1_subject(minimal),
        ),
        "send-missing-to": Invalid(
            "send", "schema", "to", "missing", "no recipients key", lambda: pack(_send(to=_DROP))
        ),
        "send-empty-to": Invalid(
            "send",
            "schema",
            "to",
            "empty list",
            "spec: at least one recipient",
            lambda: pack(_send(to=[])),
        ),
        "send-from-not-str": Invalid(
            "send",
            "schema",
            "from",
            "not a str or nil",
            "an integer envelope sender",
            lambda: pack(_send(**{"from": 42})),
        ),
        "send-header-crlf": Invalid(
            "send",
            "schema",
            "headers.subject",
            "CR, LF or NUL in a header value",
            "header injection attempt through the subject",
            lambda: pack(_send(headers={"subject": "Hi\r\nBcc: victim@example.net"})),
        ),
        "send-header-name-colon": Invalid(
            "send",
            "schema",
            "headers['x-a:b']",
            "invalid header name",
            "a header name with a colon",
            lambda: pack(_send(headers={"x-a:b": "value"})),
        ),
        "send-header-list-nul": Invalid(
            "send",
            "schema",
            "header_list[1][1]",
            "CR, LF or NUL in a header value",
            "a NUL inside a header_list value",
            lambda: pack(_send(header_list=[["Subject", "ok"], ["X-Note", "a\x00b"]])),
        ),
        "send-dkim-unknown-key": Invalid(
            "send",
            "schema",
            "dkim.domain",
            "unknown key (only selector)",
            "a dkim map asking for what the worker does not do (its own signing domain)",
            lambda: pack(_send(dkim={"domain": "example.net"})),
        ),
        "send-header-list-pair": Invalid(
            "send",
            "schema",
            "header_list[0]",
            "not a [name, value] pair",
            "a header_list entry with one element",
            lambda: pack(_send(header_list=[["Subject"]])),
        ),
        "send-part-missing-content-type": Invalid(
            "send",
            "schema",
            "content.parts[1].content-type",
            "missing",
            "the second part of a multipart has no content-type",
            lambda: pack(
                _send(content={"content-type": "multipart/mixed", "parts": [text, {"body": b"x"}]})
            ),
        ),
        "send-parts-and-body": Invalid(
            "send",
            "schema",
            "content.body",
            "both parts and body",
            "a content object must have parts or body, not both",
            lambda: pack(
                _send(content={"content-type": "multipart/mixed", "parts": [text], "body": b"x"})
            ),
        ),
        "send-body-int": Invalid(
            "send",
            "schema",
            "content.body",
            "not bin or str",
            "an integer body",
            lambda: pack(_send(content={"content-type": "text/plain", "body": 5})),
        ),
        "send-max-attempts-zero": Invalid(
            "send",
            "schema",
            "max_attempts",
            "less than 1",
            "a retry limit of zero attempts",
            lambda: pack(_send(max_attempts=0)),
        ),
        "send-version-2": Invalid(
            "send",
            "schema",
            "version",
            "unsupported version",
            "a major version this schema does not know",
            lambda: pack(_send(version=2)),
        ),
        "receive-body-str": Invalid(
            "receive",
            "schema",
            "content.body",
            "not bin",
            "receive bodies are always bin, never str",
            lambda: pack(
                {
                    "from": "alice@example.com",
                    "to": ["bob@example.org"],
                    "headers": {},
                    "content": {"content-type": "text/plain", "body": "Hello"},
                }
            ),
        ),
    }


# ---------------------------------------------------------------------------------------
# stream entry field examples (email.send.dead, email.send.events): JSON twins only, since
# these entries are Redis field maps, not msgpack


def entry_examples() -> dict[str, dict[str, Any]]:
    """Valid entries; names start with the schema they follow ("dead-letter", "event")."""
    invalid_data = pack(_send(headers={"subject": "Hi\r\nBcc: victim@example.net"}))
    rejected_data = pack(_send_vectors()["send-minimal"])
    return {
        "dead-letter-invalid": {
            "data": invalid_data,
            "reason": "invalid",
            "error": "headers.subject: CR, LF or NUL in a header value",
            "recipients": '["ann@example.org"]',
            "attempts": "0",
            "first_attempt": "1767225600.5",
            "last_attempt": "1767225600.5",
            "source_id": "1767225600250-0",
            "message_id": "1767225600250-0",
        },
        "dead-letter-rejected": {
            "data": rejected_data,
            "reason": "rejected",
            "error": "all recipients refused",
            "smtp_code": "550",
            "smtp_text": "5.1.1 <ann@example.org>: Recipient address rejected: User unknown",
            "recipients": '["ann@example.org"]',
            "attempts": "1",
            "first_attempt": "1767225601.5",
            "last_attempt": "1767225601.5",
            "source_id": "1767225600250-1",
            "message_id": "1767225600250-1",
        },
        "dead-letter-expired": {
            "data": rejected_data,
            "reason": "expired",
            "error": "5 attempts made, max_attempts is 5",
            "smtp_code": "451",
            "smtp_text": "4.3.0 Try again later",
            "recipients": '["ann@example.org"]',
            "attempts": "5",
            "first_attempt": "1767225601.5",
            "last_attempt": "1767240001.75",
            "source_id": "1767225600250-2",
            "message_id": "1767225600250-2",
        },
        "event-delivered": {
            "event": "delivered",
            "id": "newsletter-2026-01-ann-bob",
            "source_id": "1767225600250-3",
            "recipients": '["ann@example.org", "bob@example.org"]',
            "smtp_code": "250",
            "smtp_text": "2.0.0 Ok: queued as 4XYZ",
            "time": "1767225601.5",
        },
        "event-deferred": {
            "event": "deferred",
            "id": "1767225600250-2",
            "source_id": "1767225600250-2",
            "recipients": '["ann@example.org"]',
            "smtp_code": "451",
            "smtp_text": "4.3.0 Try again later",
            "next_attempt": "1767225661.5",
            "time": "1767225601.5",
        },
        "event-failed": {
            "event": "failed",
            "id": "1767225600250-1",
            "source_id": "1767225600250-1",
            "recipients": '["ann@example.org"]',
            "smtp_code": "550",
            "smtp_text": "5.1.1 <ann@example.org>: Recipient address rejected: User unknown",
            "time": "1767225601.5",
        },
        # No server answered (invalid entry, connection refused): code and text are empty,
        # and error says what happened instead.
        "event-failed-no-reply": {
            "event": "failed",
            "id": "1767225600250-0",
            "source_id": "1767225600250-0",
            "recipients": '["ann@example.org"]',
            "smtp_code": "",
            "smtp_text": "",
            "error": "invalid: to: must not be empty",
            "time": "1767225600.5",
        },
        # A local failure: no SMTP reply code (aiosmtplib's -1 never goes into smtp_code).
        "event-deferred-unreadable-reply": {
            "event": "deferred",
            "id": "1767225600250-4",
            "source_id": "1767225600250-4",
            "recipients": '["ann@example.org"]',
            "smtp_code": "",
            "smtp_text": "",
            "error": "unreadable reply from the relay: Response too long",
            "next_attempt": "1767225661.5",
            "time": "1767225601.5",
        },
    }


# ---------------------------------------------------------------------------------------
# output


def render_all() -> dict[Path, bytes]:
    """Every file this script writes, by path, with its exact content."""
    files: dict[Path, bytes] = {}
    index: list[dict[str, str]] = []
    for name, message in valid_vectors().items():
        data = pack(message)
        files[VECTOR_DIR / f"{name}.msgpack"] = data
        files[VECTOR_DIR / f"{name}.json"] = render_twin(to_twin(message))
        index.append({"name": name, "kind": kind_of(name)})
    files[VECTOR_DIR / "index.json"] = render_twin(index)
    for name, entry in entry_examples().items():
        files[ENTRY_DIR / f"{name}.json"] = render_twin(to_twin(entry))
    for name, invalid in _invalid_vectors().items():
        files[INVALID_DIR / f"{name}.msgpack"] = invalid.data()
        sidecar = {
            "kind": invalid.kind,
            "stage": invalid.stage,
            "path": invalid.path,
            "reason": invalid.reason,
            "description": invalid.description,
        }
        files[INVALID_DIR / f"{name}.json"] = render_twin(sidecar)
    return files


def differing(rendered: Mapping[Path, bytes]) -> list[Path]:
    """The paths whose file is missing or differs from what was rendered."""
    return [
        path
        for path, content in rendered.items()
        if not path.exists() or path.read_bytes() != content
    ]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    rendered = render_all()
    stale = differing(rendered)
    for path in stale:
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rendered[path])
        print(f"{'differs' if check else 'wrote'}: {path.relative_to(REPO_ROOT)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
