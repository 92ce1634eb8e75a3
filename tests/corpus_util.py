"""Compare a parsed receive message with the stdlib's ``policy.default`` reading of it.

The contract says header values are the unfolded field bodies with RFC 2047 encoded-words
decoded and nothing else rewritten.  ``policy.default`` also re-renders some fields (address
lists, dates, Message-IDs, runs of whitespace, comments); where it does, the comparison falls
back to the compat32 oracle ``str(make_header(decode_header(raw)))``, which decodes
encoded-words and rewrites nothing else, and records which rule decided.
"""

from __future__ import annotations

import email.message
import re
import sysconfig
from collections.abc import Iterator
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from workers.codec.headers import split_content_type
from workers.codec.parse import parse_message

# CPython's email test messages, beside the standard library of the interpreter running the
# tests.  Debian's python3 ships them in a separate package (libpython3.11-testsuite, which
# scripts/setup.sh installs when they are missing).
CORPUS_DIR = Path(sysconfig.get_path("stdlib")) / "test" / "test_email" / "data"
CORPUS_MISSING = f"CPython's email test corpus is not at {CORPUS_DIR}: `make setup-dev` installs it"


def corpus_files() -> list[Any]:
    """The corpus messages, for parametrising tests.  Never empty: pytest skips an empty
    parameter set without a word, so a missing corpus is one case, ``corpus-missing``, that
    fails reading the missing directory."""
    files = sorted(CORPUS_DIR.glob("msg_*.txt"))
    return files or [pytest.param(CORPUS_DIR, id="corpus-missing")]


def collapse(text: str) -> str:
    """Whitespace runs collapsed: folding and spacing are not content."""
    return " ".join(text.split())


def compat32_oracle(raw_value: str) -> str:
    """Encoded-words decoded, nothing else rewritten (the compat32 reading)."""
    try:
        return str(make_header(decode_header(raw_value)))
    except (UnicodeError, LookupError, ValueError):
        return raw_value


def stdlib_reading(raw: bytes) -> email.message.EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, email.message.EmailMessage)
    return message


def effective_type(content_type: str) -> str:
    main, _ = split_content_type(content_type)
    return main if main.count("/") == 1 else "text/plain"


def normalise_text(body: bytes) -> bytes:
    return body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


class Mismatch(AssertionError):
    pass


# Structured fields that policy.default re-renders (addresses, dates, MIME parameters, ids).
REFORMATTED_FIELDS = frozenset(
    {
        "from", "to", "cc", "bcc", "sender", "reply-to", "date", "message-id", "in-reply-to",
        "references", "mime-version", "content-type", "content-disposition",
        "content-transfer-encoding", "resent-from", "resent-to", "resent-cc", "resent-bcc",
        "resent-sender", "resent-date", "resent-message-id",
    }
)  # fmt: skip


class Comparison:
    """Walks both trees; raises Mismatch on the first real difference.

    ``trailing_break_paths``: leaf paths where the stdlib keeps a line break that RFC 2046
    assigns to the following boundary (see CORPUS_EXCEPTIONS in the corpus test).
    """

    def __init__(self, trailing_break_paths: frozenset[str] = frozenset()) -> None:
        self.reformatted: list[str] = []  # fields where policy.default only reformatted
        self.excepted: list[str] = []  # paths where a documented exception applied
        self.trailing_break_paths = trailing_break_paths

    def headers(self, ours: list[list[str]], theirs: email.message.Message, path: str) -> None:
        their_items = [(name, str(value)) for name, value in theirs.items()]
        raw_items = theirs._headers  # (name, raw value) as parsed
        if [name for name, _ in ours] != [name for name, _ in their_items]:
            raise Mismatch(f"{path}: field names {ours!r} vs {their_items!r}")
        for (name, value), (_, their_value), (_, raw_value) in zip(
            ours, their_items, raw_items, strict=True
        ):
            if collapse(value) == collapse(their_value):
                continue
            oracle = compat32_oracle(str(raw_value))
            if name.lower() in REFORMATTED_FIELDS and collapse(value) == collapse(oracle):
                self.reformatted.append(f"{path}.{name.lower()}")
                continue
            raise Mismatch(f"{path}.{name}: {value!r} vs {their_value!r} / {oracle!r}")

    def content(self, ours: dict[str, Any], theirs: email.message.Message, path: str) -> None:
        their_type = theirs.get_content_type()
        if effective_type(ours["content-type"]) != their_type:
            raise Mismatch(f"{path}: type {ours['content-type']!r} vs {their_type!r}")
        if their_type.startswith("message/") and theirs.is_multipart():
            self._embedded(ours, theirs, path)
            return
        if theirs.is_multipart():
            self._multipart(ours, theirs, path)
            return
        if "body" not in ours:
            raise Mismatch(f"{path}: stdlib reads a leaf, we read parts")
        expected = theirs.get_payload(decode=True)
        assert isinstance(expected, bytes)
        body = ours["body"]
        if their_type.startswith("text/") or not their_type.count("/"):
            expected, body = normalise_text(expected), normalise_text(body)
        if path in self.trailing_break_paths and body + b"\n" == expected:
            self.excepted.append(path)
            return
        if body != expected:
            raise Mismatch(f"{path}.body: {body[:80]!r} vs {expected[:80]!r}")

    def _multipart(self, ours: dict[str, Any], theirs: email.message.Message, path: str) -> None:
        their_parts = theirs.get_payload()
        assert isinstance(their_parts, list)
        if len(ours.get("parts", [])) != len(their_parts):
            raise Mismatch(f"{path}: {len(ours.get('parts', []))} vs {len(their_parts)} parts")
        for index, (our_part, their_part) in enumerate(
            zip(ours["parts"], their_parts, strict=True)
        ):
            part_path = f"{path}.parts[{index}]"
            our_fields = [
                [name, value]
                for name, value in _part_fields(our_part, their_part)
                if name.lower() != "content-type"
            ]
            their_fields = email.message.Message()
            for name, value in their_part._headers:
                if name.lower() != "content-type":
                    their_fields._headers.append((name, value))
            # Non-root parts carry their fields (minus Content-Type) in the headers extension.
            self.headers(our_fields, _as_default(their_fields, their_part), part_path)
            if our_part.get("filename") != their_part.get_filename():
                raise Mismatch(f"{part_path}.filename: {our_part.get('filename')!r}")
            self.content(our_part, their_part, part_path)

    def _embedded(self, ours: dict[str, Any], theirs: email.message.Message, path: str) -> None:
        """message/* is a leaf for us: its body must parse into the stdlib's sub-message(s)."""
        inner = theirs.get_payload()
        assert isinstance(inner, list)
        if theirs.get_content_type() == "message/delivery-status":
            # The stdlib splits delivery-status into header blocks; we keep its bytes.
            for block in inner:
                for _, raw_value in block._headers:
                    first_word = (str(raw_value).split() or [""])[0]
                    if first_word.encode() not in ours["body"]:
                        raise Mismatch(f"{path}.body: {raw_value!r} missing")
            return
        embedded = parse_message(ours["body"], mail_from=None, rcpt_tos=["x@y"])
        self.headers(embedded["header_list"], inner[0], f"{path}.body")
        self.content(dict(embedded["content"]), inner[0], f"{path}.body")


def _part_fields(
    our_part: dict[str, Any], their_part: email.message.Message
) -> Iterator[tuple[str, str]]:
    """Our part fields in sent order: the headers map loses case and interleaving, so pair each
    stdlib field name with the next value we hold for it."""
    held = {name: iter(value.split("\n")) for name, value in our_part.get("headers", {}).items()}
    for name, _ in their_part._headers:
        if name.lower() == "content-type":
            continue
        values = held.get(name.lower())
        yield name, next(values, "<missing>") if values is not None else "<missing>"
    for name, values in held.items():
        leftover = list(values)
        if leftover:
            yield name, f"<extra {leftover!r}>"


def _as_default(
    fields: email.message.Message, like: email.message.Message
) -> email.message.Message:
    fields.policy = like.policy
    return fields


def compare_with_stdlib(
    raw: bytes, trailing_break_paths: frozenset[str] = frozenset()
) -> Comparison:
    ours = parse_message(raw, mail_from="sender@example.com", rcpt_tos=["rcpt@example.com"])
    theirs = stdlib_reading(raw)
    comparison = Comparison(trailing_break_paths)
    comparison.headers(ours["header_list"], theirs, "headers")
    comparison.content(dict(ours["content"]), theirs, "content")
    return comparison


def validate_if_available(message: Any) -> None:
    """Schema-check with workers.codec.validate once it exists; always check the msgpack trip.

    The validator is written by another helper at the same time as this parser; until the
    module exists only the structural checks below run.
    """
    import importlib.util

    import msgpack

    # The parser's last-resort safety net must never be what handled an input in tests.
    defects = message.get("defects", [])
    assert not any("parser failure" in defect for defect in defects)
    assert all(re.fullmatch(r"(?:headers|content|message)\S*: \S.*", d, re.S) for d in defects)
    packed = msgpack.packb(message, use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False) == message
    _check_content(message["content"], "content")
    assert all(isinstance(v, str) for v in message["headers"].values())
    if importlib.util.find_spec("workers.codec.validate") is None:
        return
    from workers.codec.validate import validate_receive

    validate_receive(message)


def _check_content(content: Any, path: str) -> None:
    assert isinstance(content["content-type"], str), path
    assert ("parts" in content) != ("body" in content), path
    if "body" in content:
        assert isinstance(content["body"], bytes), path
    for index, part in enumerate(content.get("parts", [])):
        _check_content(part, f"{path}.parts[{index}]")
