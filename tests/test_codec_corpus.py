"""The CPython email test corpus: every message parses into a schema-valid receive message
whose headers and leaf bodies agree with the stdlib's ``policy.default`` reading.

Agreement is modulo the contract rule (values are unfolded field bodies with encoded-words
decoded, nothing else rewritten): see ``tests/corpus_util.py`` for exactly what is normalised.
"""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus_util import (
    CORPUS_MISSING,
    compare_with_stdlib,
    corpus_files,
    stdlib_reading,
    validate_if_available,
)
from tests.strategies import q_encoded_word
from workers.codec.headers import ADDRESS_FIELDS
from workers.codec.parse import parse_message

Mailboxes = list[tuple[str, str]]

# Documented differences from the stdlib, each justified:
# msg_15.txt: an inner multipart/alternative reuses its parent's boundary, so it never sees
#   its start boundary and is kept as an opaque body.  Its body is the blank line before the
#   parent's next boundary; the stdlib keeps that line's break (it trims the line break in
#   front of a boundary from a multipart's epilogue, not from its payload), while RFC 2046
#   section 5.1.1 says that line break belongs to the boundary, so our body is empty.
CORPUS_EXCEPTIONS: dict[str, frozenset[str]] = {
    "msg_15.txt": frozenset({"content.parts[0]"}),
}


def corpus_ids() -> list[Path]:
    return corpus_files()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", corpus_ids(), ids=lambda path: path.name)
def test_corpus_message_agrees_with_stdlib(path: Path) -> None:
    raw = path.read_bytes()
    exceptions = CORPUS_EXCEPTIONS.get(path.name, frozenset())

    comparison = compare_with_stdlib(raw, exceptions)

    # An exception that no longer applies must be removed from the list.
    assert sorted(comparison.excepted) == sorted(exceptions)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", corpus_ids(), ids=lambda path: path.name)
def test_corpus_message_is_schema_valid(path: Path) -> None:
    message = parse_message(
        path.read_bytes(), mail_from="sender@example.com", rcpt_tos=["rcpt@example.com"]
    )

    validate_if_available(message)
    assert message["size"] == len(path.read_bytes())
    assert isinstance(message["header_list"], list)  # present even when empty (msg_19)


def test_corpus_is_present_and_complete() -> None:
    # The corpus is the reference; a silently empty glob would make the tests above vacuous.
    assert len(corpus_files()) >= 40, CORPUS_MISSING


def generated_messages() -> dict[str, bytes]:
    """Messages written by the stdlib's own generator: non-ASCII everywhere it allows."""
    from email.message import EmailMessage

    inner = EmailMessage()
    inner["Subject"] = "inner ünïcode"
    inner.set_content("embedded\n")

    mixed = EmailMessage()
    mixed["From"] = "Zoë Ünïcode <zoe@example.com>"
    mixed["To"] = 'Bob <bob@example.org>, "Ça va" <cv@example.net>'
    mixed["Subject"] = "Grüße aus Köln – a long subject that the generator has to fold " * 2
    mixed.set_content("Grüße\nline two\n")
    mixed.add_alternative("<p>Grüße</p>\n", subtype="html")
    mixed.add_attachment(
        bytes(range(256)) * 20,
        maintype="application",
        subtype="octet-stream",
        filename="résumé été.bin",
    )
    mixed.add_attachment(inner)

    qp = EmailMessage()
    qp["Subject"] = "qp"
    qp.set_content("a" * 200 + " é\n", cte="quoted-printable")
    return {"mixed": mixed.as_bytes(), "qp": qp.as_bytes(),
            "lf-mixed": mixed.as_bytes().replace(b"\r\n", b"\n")}  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(generated_messages()))
def test_generated_message_agrees_with_stdlib(name: str) -> None:
    raw = generated_messages()[name]

    comparison = compare_with_stdlib(raw)

    assert comparison.excepted == []


def test_generated_attachment_filename_is_rfc2231_decoded() -> None:
    message = parse_message(generated_messages()["mixed"], mail_from=None, rcpt_tos=["x@y"])

    attachment = message["content"]["parts"][1]
    assert attachment["filename"] == "résumé été.bin"
    assert attachment["body"] == bytes(range(256)) * 20


# --- generated messages: the stdlib writes, both read ---------------------------------------------

_header_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x7f"),
    min_size=1,
    max_size=60,
).filter(lambda text: text.strip() != "")
_filename = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters='\\"/\x7f'),
    min_size=1,
    max_size=40,
).filter(lambda text: text.strip() == text and text != "")
_body_text = st.text(
    st.characters(
        blacklist_categories=("Cs",), blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    ),
    max_size=400,
)


@st.composite
def stdlib_written_messages(draw: st.DrawFn) -> bytes:
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = draw(_header_text)
    message["X-Note"] = draw(_header_text)
    message.set_content(
        draw(_body_text), cte=draw(st.sampled_from(["quoted-printable", "base64", "8bit"]))
    )
    if draw(st.booleans()):
        message.add_alternative("<p>" + draw(_body_text) + "</p>\n", subtype="html")
    for _ in range(draw(st.integers(0, 2))):
        message.add_attachment(
            draw(st.binary(max_size=600)),
            maintype="application",
            subtype="octet-stream",
            filename=draw(_filename),
        )
    # Fixed boundaries: the generator would otherwise draw them from the random module.
    for index, part in enumerate(message.walk()):
        if part.is_multipart():
            part.set_boundary(f"=_test-boundary-{index}-d1f0c9a2")
    return message.as_bytes()


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stdlib_written_messages())
def test_stdlib_written_messages_read_the_same(raw: bytes) -> None:
    comparison = compare_with_stdlib(raw)

    assert comparison.excepted == []


# --- address structure on real messages -----------------------------------------------------------

_HOSTILE_TAILS = (", <evil@attacker.example>", ' "q" (c) <x@y.example>; g:', "")


def _with_encoded_display_names(raw: bytes, tail: str) -> tuple[bytes, list[Mailboxes]]:
    """``raw`` with every address field rewritten: each mailbox's name (its local part when
    it has none) plus ``tail`` as one encoded-word; and the mailboxes meant, field by field."""
    from email import message_from_bytes
    from email import policy as policies

    reading = message_from_bytes(raw, policy=policies.default)
    compat = message_from_bytes(raw, policy=policies.compat32)
    meant: list[Mailboxes] = []
    for name in {field.lower() for field in compat.keys()} & ADDRESS_FIELDS:  # noqa: SIM118
        values = reading.get_all(name, [])
        del compat[name]
        for value in values:
            boxes = [
                ((box.display_name or box.username) + tail, box.addr_spec)
                for box in value.addresses
                if "@" in box.addr_spec
            ]
            if boxes:
                compat[name] = ", ".join(f"{q_encoded_word(n)} <{a}>" for n, a in boxes)
                meant.append(boxes)
    return compat.as_bytes(), meant


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tail", _HOSTILE_TAILS)
@pytest.mark.parametrize("path", corpus_ids(), ids=lambda path: path.name)
def test_corpus_address_fields_keep_their_mailboxes_when_names_are_encoded(
    path: Path, tail: str
) -> None:
    raw, meant = _with_encoded_display_names(path.read_bytes(), tail)
    message = parse_message(raw, mail_from=None, rcpt_tos=["rcpt@example.com"])
    theirs = stdlib_reading(raw)

    found = [
        email.utils.getaddresses([value])
        for name, value in message["header_list"]
        if name.lower() in ADDRESS_FIELDS
    ]
    assert sorted(found) == sorted(meant)
    stdlib = [
        [(box.display_name, box.addr_spec) for box in value.addresses]
        for name, value in theirs.items()
        if name.lower() in ADDRESS_FIELDS
    ]
    assert sorted(found) == sorted(stdlib)
