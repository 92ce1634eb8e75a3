"""Hypothesis strategies: spec send messages (the codec round trip) and RFC 2047 phrases (the
parser's address tests)."""

from __future__ import annotations

import base64
import itertools
from typing import Any

from hypothesis import strategies as st

# Header text: any Unicode scalar except CR, LF and NUL (refused on send by design).
header_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=80
)
long_header_text = st.builds(
    lambda word, count, sep: sep.join([word] * count),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FFF), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=60),
    st.sampled_from([" ", "  ", "\t", ""]),
)
subjects = st.one_of(header_text, long_header_text)

# Display names: words of letters (any script), digits and RFC 5322 specials, one space apart,
# so "the same name" is well defined for an address parser.
_name_word = st.text(
    st.one_of(
        st.characters(whitelist_categories=("Lu", "Ll", "Lo", "Nd")),
        st.sampled_from(list(",.()<>@:;\"'\\-!")),
    ),
    min_size=1,
    max_size=12,
)
display_names = st.lists(_name_word, min_size=0, max_size=4).map(" ".join)
_atext = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789.+_-"), min_size=1, max_size=12
)
addr_specs = st.builds(
    lambda local, domain: f"{local.strip('.').replace('..', '.') or 'x'}@{domain}.example",
    _atext,
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=10),
)
mailboxes = st.tuples(display_names, addr_specs)


def format_mailbox(name: str, addr: str) -> str:
    """``"name" <addr>`` with RFC 5322 quoting, or the bare address without a name."""
    if not name:
        return addr
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{addr}>'


_lines = st.lists(
    st.one_of(
        st.text(max_size=60),
        st.just("."),
        st.text(max_size=20).map(lambda text: "." + text),
        st.builds(  # lines around the 998-octet limit, cheap to draw
            lambda char, count: char * count,
            st.characters(max_codepoint=0x7E, min_codepoint=0x20),
            st.integers(min_value=990, max_value=1200),
        ),
    ),
    max_size=8,
)
text_bodies = st.builds(
    lambda lines, end: "\n".join(lines) + end, _lines, st.sampled_from(["", "\n", "\r\n"])
)

# Any text, "=?" included: a filename that looks like an RFC 2047 encoded-word must come
# back literally (the builder writes it in RFC 2231 form, which is never RFC 2047-decoded).
filenames = st.one_of(
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
        min_size=1,
        max_size=90,
    ),
    st.builds(
        lambda before, word, after: before + word + after,
        st.text(max_size=10).filter(lambda text: not {"\r", "\n", "\x00"} & set(text)),
        st.sampled_from(["=?utf-8?q?a_b?=", "=?UTF-8?B?w6k=?=", "=?", "?=", "=?x?q??="]),
        st.sampled_from(["", ".txt", " =?utf-8?q?c?="]),
    ),
)


@st.composite
def text_leaf(draw: st.DrawFn) -> dict[str, Any]:
    subtype = draw(st.sampled_from(["plain", "html"]))
    body: str | bytes = draw(text_bodies)
    content_type = f"text/{subtype}"
    if draw(st.booleans()):
        assert isinstance(body, str)
        body = body.encode("utf-8")
        content_type += draw(st.sampled_from(["; charset=utf-8", '; charset="utf-8"', ""]))
    leaf: dict[str, Any] = {"content-type": content_type, "body": body}
    if draw(st.booleans()):
        leaf["headers"] = {"content-description": draw(header_text)}
    return leaf


@st.composite
def binary_leaf(draw: st.DrawFn) -> dict[str, Any]:
    leaf: dict[str, Any] = {
        "content-type": draw(
            st.sampled_from(["application/octet-stream", "image/png", "application/json"])
        ),
        "body": draw(st.one_of(st.binary(max_size=3000), st.text(max_size=200).map(str.encode))),
    }
    if draw(st.booleans()):
        leaf["filename"] = draw(filenames)
    if draw(st.booleans()):
        leaf["headers"] = {"content-id": f"<{draw(_atext)}@example.com>"}
    return leaf


content_trees = st.recursive(
    st.one_of(text_leaf(), binary_leaf()),
    lambda children: st.builds(
        lambda subtype, parts: {"content-type": f"multipart/{subtype}", "parts": parts},
        st.sampled_from(["mixed", "alternative", "related"]),
        st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=6,
)

_custom_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), max_size=15).map(
    lambda name: f"x-{name}"
)


@st.composite
def send_messages(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, list[tuple[str, str]]]]:
    """(send message, {address header: [(display name, addr-spec)]}) pairs."""
    addresses = {
        "from": draw(st.lists(mailboxes, min_size=1, max_size=2)),
        "to": draw(st.lists(mailboxes, min_size=1, max_size=3)),
    }
    if draw(st.booleans()):
        addresses["cc"] = draw(st.lists(mailboxes, min_size=1, max_size=3))
    headers = {
        name: ", ".join(format_mailbox(*mailbox) for mailbox in boxes)
        for name, boxes in addresses.items()
    }
    headers["subject"] = draw(subjects)
    for name in draw(st.lists(_custom_names, max_size=3, unique=True)):
        headers[name] = draw(header_text)
    recipients = [addr for _, addr in addresses["to"]]
    if draw(st.booleans()):
        hidden = draw(addr_specs)
        headers["bcc"] = hidden
        recipients.append(hidden)
    message = {
        "from": addresses["from"][0][1],
        "to": recipients,
        "headers": headers,
        "content": draw(content_trees),
    }
    return message, addresses


# --- RFC 2047 encoded-words, for the parser's address tests --------------------------------

# Characters a Q encoded-word may carry unencoded inside a phrase (RFC 2047 section 5 (3)).
_Q_PHRASE_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


def q_encoded_word(text: str) -> str:
    """``text`` as one UTF-8 Q encoded-word that is legal in a phrase."""
    encoded = "".join(
        chr(octet) if octet in _Q_PHRASE_SAFE else "_" if octet == 0x20 else f"={octet:02X}"
        for octet in text.encode("utf-8")
    )
    return f"=?utf-8?q?{encoded}?="


def b_encoded_word(text: str) -> str:
    """``text`` as one UTF-8 B encoded-word."""
    return f"=?utf-8?b?{base64.b64encode(text.encode('utf-8')).decode('ascii')}?="


@st.composite
def encoded_phrase(draw: st.DrawFn, text: str) -> tuple[str, str]:
    """``text`` as adjacent encoded-words cut at character boundaries, Q or B each: (words
    apart by blanks or a fold, as senders write them; words joined, as RFC 2047 section 6.2
    reads them)."""
    cuts: list[int] = []
    if len(text) > 1:
        cuts = sorted(set(draw(st.lists(st.integers(1, len(text) - 1), max_size=3))))
    bounds = [0, *cuts, len(text)]
    words = [
        draw(st.sampled_from([q_encoded_word, b_encoded_word]))(text[start:end])
        for start, end in itertools.pairwise(bounds)
    ]
    separator = draw(st.sampled_from([" ", "\t", "  ", "\r\n "]))
    return separator.join(words), "".join(words)
