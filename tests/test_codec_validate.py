"""validate_send / validate_receive: every violation names its path and its reason."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from workers.codec import (
    BuildError,
    SchemaError,
    WireError,
    decode_receive,
    decode_send,
    pack,
    parse_message,
    validate_receive,
    validate_send,
)
from workers.codec.validate import MAX_CONTENT_DEPTH


def valid_send() -> dict[str, Any]:
    return {
        "from": "alice@example.com",
        "to": ["bob@example.org"],
        "headers": {"subject": "hi", "from": "Alice <alice@example.com>"},
        "content": {
            "content-type": "multipart/mixed",
            "parts": [
                {"content-type": "text/plain", "body": "text as str"},
                {"content-type": "multipart/alternative", "parts": [
                    {"content-type": "text/plain", "body": b"a"},
                    {"content-type": "text/html", "body": b"<p>a</p>"},
                ]},
                {
                    "content-type": "application/pdf",
                    "body": b"%PDF",
                    "filename": "r.pdf",
                    "headers": {"content-id": "<r@example.com>"},
                },
            ],
        },
    }  # fmt: skip


def test_valid_messages_pass_and_come_back_unchanged() -> None:
    message = valid_send()
    assert validate_send(message) is message
    received = parse_message(b"Subject: x\r\n\r\nbody\r\n", mail_from=None, rcpt_tos=["b@x"])
    assert validate_receive(received) is received


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    message = valid_send()
    message["x-future-extension"] = {"anything": [1, 2]}
    message["content"]["x-part-extension"] = 3
    assert validate_send(message) is message


def test_null_sender_is_nil() -> None:
    message = valid_send()
    message["from"] = None
    validate_send(message)


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    """A valid send message with the item at ``path`` replaced (``...`` deletes it)."""
    message = copy.deepcopy(valid_send())
    target: Any = message
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return message


P0 = ["content", "parts", 0]
P1 = ["content", "parts", 1]
P2 = ["content", "parts", 2]

SEND_CASES = [
    (["from"], ..., "from: missing spec key (nil for the null sender)"),
    (["from"], 5, "from: expected str or nil, got int"),
    (["to"], ..., "to: missing spec key"),
    (["to"], [], "to: at least one recipient is required"),
    (["to"], "bob@example.org", "to: expected array of str, got str"),
    (["to", 0], b"bob@example.org", "to[0]: expected str, got bin"),
    (["to", 0], "", "to[0]: empty address"),
    (["headers"], ..., "headers: missing spec key"),
    (["headers"], [["subject", "x"]], "headers: expected map, got array"),
    (["headers", "subject"], 1, "headers.subject: expected str header value, got int"),
    (["headers", "subject"], None, "headers.subject: expected str header value, got nil"),
    (["headers", "subject"], b"hi", "headers.subject: expected str header value, got bin"),
    (["headers", "bad name"], "x", "headers['bad name']: invalid header name 'bad name'"),
    (["headers", "a:b"], "x", "headers['a:b']: invalid header name 'a:b'"),
    (["headers", ""], "x", "headers['']: invalid header name ''"),
    (["content"], ..., "content: missing spec key"),
    (["content"], "text", "content: expected content object (map), got str"),
    (["content", "content-type"], ..., "content.content-type: missing spec key"),
    (["content", "content-type"], 7, "content.content-type: expected str, got int"),
    ([*P0, "content-type"], "text", "content.parts[0].content-type: invalid media type 'text'"),
    ([*P0, "body"], ..., "content.parts[0].body: missing: a text/plain part needs a body"),
    ([*P0, "body"], 12, "content.parts[0].body: expected bin or str, got int"),
    (
        [*P0, "parts"],
        [],
        "content.parts[0].parts: only a multipart content type may have parts",
    ),
    ([*P1, "parts"], ..., "content.parts[1].parts: missing: a multipart needs parts"),
    ([*P1, "parts"], [], "content.parts[1].parts: a multipart needs at least one part"),
    ([*P1, "parts"], {}, "content.parts[1].parts: expected array of content objects, got map"),
    ([*P1, "body"], b"x", "content.parts[1].body: a content object has either parts or a body"),
    (
        [*P1, "parts", 1, "body"],
        None,
        "content.parts[1].parts[1].body: expected bin or str, got nil",
    ),
    ([*P2, "filename"], 3, "content.parts[2].filename: expected str, got int"),
    ([*P2, "headers"], "x", "content.parts[2].headers: expected map, got str"),
    (
        [*P2, "headers", "content-id"],
        5,
        "content.parts[2].headers.content-id: expected str header value, got int",
    ),
    (["id"], 5, "id: expected str, got int"),
    (["id"], "", "id: must not be empty"),
    (["version"], True, "version: expected int, got bool"),
    (["version"], 0, "version: must be at least 1"),
    (["max_attempts"], 2.5, "max_attempts: expected int, got float"),
    (["max_attempts"], 0, "max_attempts: must be at least 1"),
    (["max_age"], "1h", "max_age: expected number, got str"),
    (["max_age"], -1, "max_age: must be greater than 0"),
    (["header_list"], {"a": "b"}, "header_list: expected array, got map"),
    (["header_list"], [["a"]], "header_list[0]: expected [name, value], got 1 items"),
    (["header_list"], [["a", "b"], "x"], "header_list[1]: expected [name, value] array, got str"),
    (["header_list"], [["a", 1]], "header_list[0][1]: expected str header value, got int"),
]


@pytest.mark.parametrize(("path", "value", "message"), SEND_CASES)
def test_send_violations_name_path_and_reason(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        validate_send(mutate(path, value))
    assert str(caught.value) == message
    assert f"{caught.value.path}: {caught.value.reason}" == message


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (["headers", "subject"], "a\r\nBcc: x@example.com", "headers.subject"),
        (["headers", "x-a\nb"], "v", "headers['x-a\\nb']"),
        (["headers", "subject"], "=?utf-8?q?a=0Ab?=", "headers.subject"),
        ([*P2, "headers", "content-id"], "<a>\x00", "content.parts[2].headers.content-id"),
        ([*P2, "filename"], "a\nb", "content.parts[2].filename"),
        ([*P0, "content-type"], "text/plain\r\nX: y", "content.parts[0].content-type"),
        (["to", 0], "b@example.org\r\nDATA", "to[0]"),
        (["header_list"], [["Subject", "a\rb"]], "header_list[0][1]"),
    ],
)
def test_send_header_injection_is_a_build_error(path: list[Any], value: Any, where: str) -> None:
    with pytest.raises(BuildError) as caught:
        validate_send(mutate(path, value))
    assert caught.value.path == where
    assert "CR, LF or NUL" in caught.value.reason


def test_top_level_must_be_a_map() -> None:
    with pytest.raises(SchemaError) as caught:
        validate_send(["not", "a", "map"])
    assert (caught.value.path, str(caught.value)) == ("", "message must be a map, got array")


def test_content_nesting_is_bounded() -> None:
    content: dict[str, Any] = {"content-type": "text/plain", "body": b"x"}
    for _ in range(MAX_CONTENT_DEPTH + 1):
        content = {"content-type": "multipart/mixed", "parts": [content]}
    message = dict(valid_send(), content=content)
    with pytest.raises(SchemaError, match=f"content nested deeper than {MAX_CONTENT_DEPTH}"):
        validate_send(message)


def test_receive_rules_differ_where_the_parser_needs_them() -> None:
    received = parse_message(
        b"Received: a\r\nReceived: b\r\nContent-Type: multipart/mixed\r\n\r\nno boundary\r\n",
        mail_from="a@example.com",
        rcpt_tos=["b@example.org"],
    )
    assert received["headers"]["received"] == "a\nb"  # joined repeated fields are fine
    assert "body" in received["content"]  # an unsplittable multipart keeps its raw body
    validate_receive(received)
    bad = dict(received, content={"content-type": "text/plain", "body": "str"})
    with pytest.raises(SchemaError, match=r"^content\.body: expected bin, got str$"):
        validate_receive(bad)
    with pytest.raises(SchemaError, match=r"^size: must not be negative$"):
        validate_receive(dict(received, size=-1))
    with pytest.raises(SchemaError, match=r"^defects\[1\]: expected str, got int$"):
        validate_receive(dict(received, defects=["x", 1]))
    with pytest.raises(SchemaError, match=r"^raw: expected bin, got str$"):
        validate_receive(dict(received, raw="x"))


def test_decode_combines_wire_and_schema_checks() -> None:
    message = valid_send()
    assert decode_send(pack(message)) == message
    with pytest.raises(WireError):
        decode_send(b"\x92\x01\x02")
    with pytest.raises(SchemaError, match=r"^to: at least one recipient is required$"):
        decode_send(pack(dict(message, to=[])))
    received = parse_message(b"Subject: x\r\n\r\nbody\r\n", mail_from=None, rcpt_tos=["b@x"])
    assert decode_receive(pack(received)) == received
