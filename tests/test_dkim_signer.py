"""The signer in the codec: which fields it signs, how it folds, whose domain signs, and that
the send message's ``dkim`` key is honoured and checked.  (That the signatures verify with an
independent implementation through real DNS: tests/test_delivery_dkim.py.)"""

from __future__ import annotations

import re
from email.utils import getaddresses
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from workers.codec.build import build_message
from workers.codec.errors import BuildError, SchemaError
from workers.codec.signing import (
    KeyTable,
    SigningKey,
    author_domain,
    is_host_name,
    signature_fields,
)

KEY = SigningKey("example.com", "s1", ed25519.Ed25519PrivateKey.generate())
TABLE = KeyTable([KEY])


def _message(**extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "from": "app@example.com",
        "to": ["ann@example.org"],
        "headers": {"From": "App <app@example.com>", "To": "ann@example.org", "Subject": "Hi"},
        "content": {"content-type": "text/plain; charset=utf-8", "body": b"Hello.\n"},
    }
    message.update(extra)
    return message


def _signature(data: bytes) -> str:
    found = re.match(rb"DKIM-Signature:(.*?)\r\n(?=\S)", data, re.S)
    assert found is not None, data[:300]
    return found[1].decode()


def test_the_signature_is_the_first_field_and_lines_stay_short() -> None:
    data = build_message(_message(), default_id="1-0", keys=TABLE).data
    assert data.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;")
    field = _signature(data)
    assert all(len(line) <= 78 for line in ("DKIM-Signature:" + field).split("\r\n"))
    assert re.search(r"\bd=example\.com;", field) and re.search(r"\bs=s1;", field)


def test_a_long_header_list_folds_between_its_names() -> None:
    headers = {
        "From": "app@example.com", "To": "a@example.org", "Cc": "b@example.org",
        "Subject": "s", "Reply-To": "r@example.com", "In-Reply-To": "<x@y>",
        "References": "<x@y>", "List-Id": "<l.example.com>",
        "List-Unsubscribe": "<https://example.com/u>", "List-Unsubscribe-Post":
        "List-Unsubscribe=One-Click", "Feedback-ID": "a:b:c", "X-Not-Signed": "x",
    }  # fmt: skip
    data = build_message(_message(headers=headers), default_id="1-0", keys=TABLE).data
    field = _signature(data)
    names = re.sub(r"\s+", "", re.search(r"h=([^;]*);", field)[1]).split(":")  # type: ignore[index]
    assert names[0] == "from" and names[-1] == "from"
    assert "x-not-signed" not in names
    assert {"reply-to", "cc", "list-id", "list-unsubscribe-post", "feedback-id"} <= set(names)
    assert all(len(line) <= 78 for line in ("DKIM-Signature:" + field).split("\r\n"))


def test_nothing_is_signed_without_a_key_for_the_domain() -> None:
    message = _message(headers={"From": "x@example.net", "Subject": "Hi"})
    assert not build_message(message, default_id="1-0", keys=TABLE).data.startswith(b"DKIM")


def test_false_sends_unsigned_and_a_selector_picks_the_key() -> None:
    other = SigningKey("example.com", "s2", ed25519.Ed25519PrivateKey.generate())
    table = KeyTable([KEY, other])
    plain = build_message(_message(dkim=False), default_id="1-0", keys=table).data
    assert b"DKIM-Signature" not in plain
    both = build_message(_message(), default_id="1-0", keys=table).data
    assert both.count(b"DKIM-Signature:") == 2
    chosen = build_message(_message(dkim={"selector": "s2"}), default_id="1-0", keys=table).data
    assert chosen.count(b"DKIM-Signature:") == 1 and "s=s2;" in _signature(chosen)


def test_an_unknown_selector_is_a_build_error_naming_it() -> None:
    with pytest.raises(BuildError, match=r"dkim\.selector.*no key of selector 'nope'"):
        build_message(_message(dkim={"selector": "nope"}), default_id="1-0", keys=TABLE)
    with pytest.raises(BuildError, match=r"no signing key for example\.net"):
        message = _message(headers={"From": "a@example.net"}, dkim={"selector": "s1"})
        build_message(message, default_id="1-0", keys=TABLE)


@pytest.mark.parametrize(
    ("value", "path"),
    [("yes", "dkim"), ({"selector": ""}, "dkim.selector"), ({"domain": "x"}, "dkim.domain")],
)
def test_a_malformed_dkim_key_is_a_schema_error(value: object, path: str) -> None:
    with pytest.raises(SchemaError) as caught:
        build_message(_message(dkim=value), default_id="1-0")
    assert caught.value.path == path


def test_without_keys_the_dkim_key_changes_nothing() -> None:
    plain = build_message(_message(), default_id="1-0", now=0).data
    assert build_message(_message(dkim={"selector": "s1"}), default_id="1-0", now=0).data == plain


@pytest.mark.parametrize(
    ("field", "domain"),
    [
        ("app@Example.COM", "example.com"),
        ("App Team <app@mail.example.com>", "mail.example.com"),
        ('"Smith, J" <j@example.com>', "example.com"),
        ('"x@good.example"@evil.example', "evil.example"),  # the quoted "@" is the local part's
        ("x (a@evil.example) <a@good.example>", "good.example"),  # a comment is no address
        ("Zoë <z@bücher.example>", "xn--bcher-kva.example"),
        ("a@example.com.", "example.com"),
        # Not exactly one unambiguous address, or no host name: no signature.
        ("a@example.com, b@example.com", None),
        ("undisclosed-recipients:;", None),
        ("b@good.example a@evil.example", None),
        ("a@evil.example@good.example", None),
        ('x@"@other.test; l=0', None),
        ("( " * 600 + "a@good.example", None),  # unbalanced: and no recursion either
        ("(" * 600 + ")" * 600 + " a@good.example", "good.example"),
        ("a@[192.0.2.1]", None),
        ("a@localhost", None),
        ("a@exa mple.com", None),
        # Words after the address: RFC 5322 readers take them as more of its domain.
        ("user@example.com .evil.test", None),
        ("user@example.com(c).evil.test", None),
        ("user@example.com evil", None),
        ("App <app@example.com> junk", None),
        ("')<y@c.test>", None),  # a special in the display name
        ("App <app@example.com> (the app)", "example.com"),
    ],
)
def test_the_author_domain(field: str, domain: str | None) -> None:
    assert author_domain(field) == domain


_CHARS = st.text(alphabet='abcXY09.-_+ "(),:;<>@[]é\t', max_size=10)
_FIELDS = st.one_of(
    st.lists(_CHARS, max_size=5).map("".join),
    st.tuples(_CHARS, _CHARS).map(lambda p: f"{p[0]}@{p[1]}.example"),
    st.tuples(_CHARS, _CHARS, _CHARS).map(lambda p: f"{p[0]} <{p[1]}@{p[2]}.example>"),
    st.tuples(_CHARS, _CHARS, _CHARS).map(lambda p: f"{p[0]}@{p[1]}.example{p[2]}"),
)


@given(_FIELDS)
def test_the_signer_never_sees_another_domain_than_the_stdlib_parser(field: str) -> None:
    """Whatever the field, a domain the signer takes is the one domain Python's own address
    parser finds in it (the signer may refuse more: it never signs for a different one)."""
    domain = author_domain(field)
    if domain is not None:
        parsed = {
            address.rpartition("@")[2].rstrip(".").lower()
            for _, address in getaddresses([field])
            if "@" in address
        }
        assert {d.encode("idna").decode() for d in parsed} == {domain}, field


STAR = KeyTable([SigningKey("*", "any", KEY.private_key)])


@pytest.mark.parametrize(
    "from_field",
    ['x@"@other.test; l=0', 'x@"@other.test;\tl=0', "a@b@c.example", "a@localhost", "a@[1.2.3.4]"],
)
def test_the_star_line_never_signs_for_a_hostile_from(from_field: str) -> None:
    message = _message(headers={"From": from_field, "Subject": "Hi"})
    data = build_message(message, default_id="1-0", keys=STAR).data
    assert not data.startswith(b"DKIM-Signature")


def test_every_instance_of_a_repeated_field_is_signed() -> None:
    pairs = [["From", "a@example.com"], ["Subject", "first"], ["Subject", "second"]]
    data = build_message(_message(header_list=pairs), default_id="1-0", keys=TABLE).data
    names = re.sub(r"\s+", "", re.search(r"h=([^;]*);", _signature(data))[1]).split(":")  # type: ignore[index]
    assert names.count("subject") == 2
    assert names.count("from") == 2  # one From, listed once more


def test_two_from_fields_are_not_signed() -> None:
    pairs = [["From", "a@example.com"], ["FROM", "b@example.com"], ["Subject", "s"]]
    data = build_message(_message(header_list=pairs), default_id="1-0", keys=TABLE).data
    assert b"DKIM-Signature" not in data


def test_selectors_compare_without_case() -> None:
    data = build_message(_message(dkim={"selector": "S1"}), default_id="1-0", keys=TABLE).data
    assert "s=s1;" in _signature(data)


def test_a_table_domain_signs_as_itself_for_subdomains() -> None:
    data = signature_fields(b"From: a@x.example.com\r\n\r\nbody\r\n", TABLE, "x.example.com")
    assert "d=example.com;" in _signature(data + b"X: y\r\n")


@pytest.mark.parametrize(
    ("domain", "host"),
    [
        ("example.com", True), ("mail.example.co.uk", True), ("a.xn--p1ai", True),
        ("localhost", False), ("10.0.0.10", False), ("example.-x", False),
        ("example.x-", False), ("ex_ample.com", False), ("a" * 64 + ".com", False),
    ],
)  # fmt: skip
def test_only_host_names_sign(domain: str, host: bool) -> None:
    assert is_host_name(domain) is host
