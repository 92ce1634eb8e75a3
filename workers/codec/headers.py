"""Header field decoding for the receive side: unfolding, RFC 2047 and RFC 2231.

Everything here is lenient and never raises: an encoded-word that cannot be decoded is left
as it was sent, an unknown charset decodes with replacement characters.  The functions that
can lose information report it through an optional ``defects`` list of plain descriptions;
the caller prefixes them with a path.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from urllib.parse import unquote_to_bytes

__all__ = [
    "decode_header_value",
    "decode_rfc2231_param",
    "split_content_type",
    "unfold",
]

# RFC 2047 encoded-word.  The charset is bounded so a hostile "=?aaaa..." cannot make the
# scanner walk far from every start position; encoded-text stops at the first "?" or space.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,64})(?:\*[^?\s]{0,32})?\?([QqBb])\?([^?\s]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r?\n")
_WSP_ONLY = re.compile(r"[ \t\r\n]*")
_CONTROL_BREAKS = re.compile(r"[\r\n\x00]")


def unfold(value: str) -> str:
    """RFC 5322 unfolding: drop the line breaks of a folded field body, keep its whitespace."""
    if "\n" not in value and "\r" not in value:
        return value
    return _FOLD.sub("", value)


_CHARSET_NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,40}")


@functools.lru_cache(maxsize=256)
def _lookup_charset(charset: str) -> str | None:
    """Python codec name for a MIME charset; None when unknown or not a text encoding."""
    name = charset.strip().lower()
    if _CHARSET_NAME.fullmatch(name) is None or name in ("unknown-8bit", "x-unknown"):
        return None
    try:
        info = codecs.lookup(name)
        b"".decode(info.name)  # refuses bytes-to-bytes codecs such as "base64" or "zlib"
    except (LookupError, ValueError):
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str, defects: list[str] | None) -> str:
    codec = _lookup_charset(charset)
    if codec is None:
        if defects is not None:
            defects.append(f"unknown charset {charset[:40]!r}, decoded as UTF-8 with replacement")
        return data.decode("utf-8", "replace")
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        if defects is not None:
            defects.append(f"invalid {codec} data in encoded-word, replaced")
        try:
            return data.decode(codec, "replace")
        except LookupError:
            return data.decode("utf-8", "replace")


def _decode_word_payload(encoding: str, text: str) -> bytes | None:
    """The octets of one encoded-word, or None when they cannot be recovered."""
    if encoding in "Qq":
        # a2b_qp(header=True) maps "_" to space, as RFC 2047 section 4.2 requires.
        return binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
    raw = text.encode("ascii", "replace")
    missing = -len(raw) % 4
    try:
        return binascii.a2b_base64(raw + b"=" * missing if missing != 3 else raw)
    except binascii.Error:
        return None


def _decode_encoded_words(value: str, defects: list[str] | None) -> str:
    pieces: list[str] = []
    pending: list[bytes] = []  # octets of adjacent words in one charset, decoded together
    pending_charset = ""
    last_end = 0
    for match in _ENCODED_WORD.finditer(value):
        gap = value[last_end : match.start()]
        payload = _decode_word_payload(match.group(2), match.group(3))
        if payload is None:
            if defects is not None:
                defects.append("undecodable base64 encoded-word left as sent")
            continue  # the word stays in the text: it becomes part of the next gap
        # Whitespace between two adjacent encoded-words is not displayed (RFC 2047 section 6.2).
        adjacent = bool(pending_charset) and _WSP_ONLY.fullmatch(gap) is not None
        charset = match.group(1)
        if not (adjacent and charset.lower() == pending_charset.lower()):
            if pending_charset:
                pieces.append(_decode_bytes(b"".join(pending), pending_charset, defects))
                pending.clear()
            if not adjacent:
                pieces.append(gap)
            pending_charset = charset
        pending.append(payload)
        last_end = match.end()
    if pending_charset:
        pieces.append(_decode_bytes(b"".join(pending), pending_charset, defects))
    pieces.append(value[last_end:])
    return "".join(pieces)


def decode_header_value(value: str, defects: list[str] | None = None) -> str:
    """Unfold a field body and decode its RFC 2047 encoded-words; nothing else is rewritten.

    CR, LF and NUL cannot survive into a decoded value (they would forge header lines or
    fields downstream); an encoded-word that carries them has them replaced by a space.
    """
    text = unfold(value)
    if "=?" in text:
        text = _decode_encoded_words(text, defects)
    if _CONTROL_BREAKS.search(text) is not None:
        if defects is not None:
            defects.append("CR, LF or NUL in the decoded value replaced by a space")
        text = _CONTROL_BREAKS.sub(" ", text)
    return text


def decode_rfc2231_param(value: str, defects: list[str] | None = None) -> str:
    """Decode an RFC 2231 extended value ``charset'language'percent-encoded``.

    A value without the two quotes is percent-decoded as UTF-8 (what senders that omit the
    charset mean in practice).
    """
    parts = value.split("'", 2)
    if len(parts) == 3:
        charset, _language, encoded = parts
    else:
        charset, encoded = "utf-8", value
    octets = unquote_to_bytes(encoded)
    return _decode_bytes(octets, charset or "utf-8", defects)


# ---------------------------------------------------------------------------------------
# Content-Type / Content-Disposition parameters


# One parameter: name "=" quoted-string or token.  A quoted-string runs to its closing quote
# (an unterminated one to the end); a token runs to ";" or to the next "name=" when a sender
# forgot the ";" (seen in the wild: 'boundary="b" protocol="..."').
_PARAM = re.compile(
    r'(?P<name>[^\s=;"()]++)\s*+=\s*+'
    r'(?:"(?P<quoted>(?:[^"\\]++|\\.)*+)(?:"|\Z)'
    r'|(?P<token>[^\s;"]*+(?:\s++(?![^\s=;"()]+\s*=)[^\s;"]++)*+))',
    re.DOTALL,
)
_SEPARATORS = re.compile(r"[\s;]*+")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _scan_params(text: str) -> list[tuple[str, str]]:
    """(name, unquoted value) pairs in order; unparseable stretches are skipped to the next ";".

    Possessive quantifiers and the explicit skip keep this linear on hostile values.
    """
    params: list[tuple[str, str]] = []
    position = 0
    length = len(text)
    while True:
        position = _SEPARATORS.match(text, position).end()  # type: ignore[union-attr]
        if position >= length:
            return params
        match = _PARAM.match(text, position)
        if match is None:
            following = text.find(";", position)
            if following < 0:
                return params
            position = following
            continue
        quoted = match.group("quoted")
        if quoted is not None:
            value = _QUOTED_PAIR.sub(r"\1", quoted) if "\\" in quoted else quoted
        else:
            value = match.group("token")
        params.append((match.group("name"), value))
        position = match.end()


def _collect_params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Parameter names (lower-cased) to decoded values, RFC 2231 continuations joined."""
    plain: dict[str, str] = {}
    extended: dict[str, dict[int, tuple[bool, str]]] = {}
    for raw_name, value in pairs:
        name = raw_name.lower()
        if "*" not in name:
            plain.setdefault(name, value)
            continue
        base, _, rest = name.partition("*")
        encoded = rest.endswith("*") or rest == ""
        section_text = rest.rstrip("*")
        section = int(section_text) if section_text.isdigit() else 0
        extended.setdefault(base, {})[section] = (encoded, value)
    params = dict(plain)
    for base, sections in extended.items():
        params[base] = _join_rfc2231(sections)
    return params


def _join_rfc2231(sections: dict[int, tuple[bool, str]]) -> str:
    ordered = [sections[key] for key in sorted(sections)]
    first_encoded, first_value = ordered[0]
    charset = "utf-8"
    if first_encoded and first_value.count("'") >= 2:
        charset, _language, first_value = first_value.split("'", 2)
        ordered[0] = (True, first_value)
    octets = b"".join(
        unquote_to_bytes(text) if encoded else text.encode("utf-8", "surrogateescape")
        for encoded, text in ordered
    )
    return _decode_bytes(octets, charset or "utf-8", None)


def split_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``(type/subtype lower-cased, params)`` of a Content-Type or Content-Disposition value.

    For Content-Disposition the first item is the disposition type.  Parameter values are
    unquoted and RFC 2231-decoded; RFC 2047 in them is left to the caller.
    """
    main, _, rest = value.partition(";")
    # A comment after the type ("text/plain (fixed)") is not part of it.
    words = main.split("(", 1)[0].split()
    main = words[0].lower() if words else ""
    return main, _collect_params(_scan_params(rest)) if rest else {}
