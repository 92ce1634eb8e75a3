"""Header encoding for the send side: RFC 2047 encoded-words, folding, RFC 2231 parameters.

Values come in decoded (the contract's form) and must come back identical when our parser
(or any RFC 2047 decoder) reads the built message, so encoding is lossless:

* only the words that need it are encoded (non-ASCII, control characters, a literal "=?",
  a word too long for a line); neighbouring encoded words are merged with the whitespace
  between them, because a decoder drops whitespace between two encoded-words;
* folding only inserts CRLF in front of existing whitespace, so unfolding restores the value;
* leading whitespace (which a header parser strips) is carried inside an encoded-word.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from urllib.parse import quote

import idna

from workers.codec.errors import BuildError

__all__ = [
    "PREFERRED_LINE",
    "canonical_name",
    "encode_address_list",
    "encode_unstructured",
    "fold",
    "format_param",
    "has_encoded_break",
    "idna_domain",
    "param_name",
    "param_value",
    "rewrite_params",
    "split_params",
]

MAX_LINE = 998  # RFC 5322 section 2.1.1: hard limit, without the CRLF
PREFERRED_LINE = 78  # RFC 5322 section 2.1.1: should
# An encoded-word is at most 75 characters (RFC 2047 section 2): "=?utf-8?q?" + text + "?=".
_WORD_PREFIX_Q = "=?utf-8?q?"
_WORD_PREFIX_B = "=?utf-8?b?"
_WORD_TEXT = 75 - len(_WORD_PREFIX_Q) - 2
_B_CHUNK = _WORD_TEXT // 4 * 3  # octets per base64 encoded-word
# A plain word longer than this is encoded so it can be split across lines.
_LONG_WORD = 900

_CANONICAL = {
    name.lower(): name
    for name in (
        "MIME-Version",
        "Message-ID",
        "Content-ID",
        "Content-MD5",
        "Resent-Message-ID",
        "In-Reply-To",
        "Reply-To",
        "Resent-Reply-To",
        "DKIM-Signature",
        "ARC-Seal",
        "ARC-Message-Signature",
        "ARC-Authentication-Results",
        "List-ID",
        "X-MSMail-Priority",
        "X-MS-Has-Attach",
        "X-MIMEOLE",
    )
}

ADDRESS_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "sender",
        "resent-from",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-sender",
        "resent-reply-to",
        "disposition-notification-to",
        "mail-followup-to",
        "mail-reply-to",
    }
)
# Fields whose syntax has no place for encoded-words: they must already be ASCII.
ASCII_ONLY_HEADERS = frozenset(
    {
        "message-id",
        "in-reply-to",
        "references",
        "resent-message-id",
        "content-id",
        "date",
        "resent-date",
        "mime-version",
    }
)

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NEEDS_WORK = re.compile(r"[^\x20-\x7e\t]|=\?|^[ \t]")
_WSP_RUNS = re.compile(r"([ \t]+)")
_WSP = (" ", "\t")
_PHRASE_SPECIALS = frozenset('()<>[]:;@\\,."')
_FOLD_POINT = re.compile(r"[ \t](?=[^ \t])")

# Q encoding table: the characters RFC 2047 section 5 (3) allows unencoded even in a phrase.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
# Octets written as one character in Q encoding (a space becomes "_").
_Q_ONE_CHAR = bytes(sorted(_Q_SAFE)) + b" "
_Q_TABLE = tuple(
    chr(octet) if octet in _Q_SAFE else "_" if octet == 0x20 else f"={octet:02X}"
    for octet in range(256)
)


# Names repeat from message to message; the bound keeps hostile producers from growing it.
@functools.lru_cache(maxsize=1024)
def canonical_name(name: str) -> str:
    """``subject`` -> ``Subject``, ``message-id`` -> ``Message-ID``; mixed case kept as given."""
    known = _CANONICAL.get(name.lower())
    if known is not None:
        return known
    if name.islower():
        return "-".join(part[:1].upper() + part[1:] for part in name.split("-"))
    return name


# ---------------------------------------------------------------------------------------
# RFC 2047


def _q_text(char: str) -> str:
    return "".join(_Q_TABLE[octet] for octet in char.encode("utf-8"))


def _encoded_words(text: str) -> list[str]:
    """``text`` as UTF-8 encoded-words of at most 75 characters, each holding whole characters."""
    data = text.encode("utf-8")
    q_length = len(data) + 2 * len(data.translate(None, _Q_ONE_CHAR))  # "=XX" for the others
    if q_length <= (len(data) + 2) // 3 * 4:
        if q_length <= _WORD_TEXT:  # one word: no character boundary to look for
            return [_WORD_PREFIX_Q + "".join(map(_Q_TABLE.__getitem__, data)) + "?="]
        return _q_words(text)
    if len(data) <= _B_CHUNK:
        return [_b_word(data)]
    return _b_words(text)


def _q_words(text: str) -> list[str]:
    words: list[str] = []
    current: list[str] = []
    length = 0
    for char in text:
        piece = _Q_TABLE[ord(char)] if ord(char) < 0x80 else _q_text(char)
        if length + len(piece) > _WORD_TEXT and current:
            words.append(_WORD_PREFIX_Q + "".join(current) + "?=")
            current, length = [], 0
        current.append(piece)
        length += len(piece)
    words.append(_WORD_PREFIX_Q + "".join(current) + "?=")
    return words


def _b_words(text: str) -> list[str]:
    words: list[str] = []
    current = bytearray()
    for char in text:
        octets = char.encode("utf-8")
        if len(current) + len(octets) > _B_CHUNK and current:
            words.append(_b_word(bytes(current)))
            current.clear()
        current += octets
    words.append(_b_word(bytes(current)))
    return words


def _b_word(octets: bytes) -> str:
    return _WORD_PREFIX_B + binascii.b2a_base64(octets, newline=False).decode("ascii") + "?="


def _word_needs_encoding(word: str, *, phrase: bool) -> bool:
    if not word.isascii() or _CONTROL.search(word) is not None or "=?" in word:
        return True
    if len(word) > _LONG_WORD:
        return True
    return phrase and not _PHRASE_SPECIALS.isdisjoint(word)


def encode_unstructured(value: str, *, phrase: bool = False) -> str:
    """Field body text for ``value``: RFC 2047 encoded-words only where needed.

    ``phrase`` applies the stricter rules of a display name, where RFC 5322 specials in a
    rewritten word must be encoded too.
    """
    if (
        _NEEDS_WORK.search(value) is None
        and not (phrase and (not _PHRASE_SPECIALS.isdisjoint(value) or value.endswith(_WSP)))
        and (len(value) <= _LONG_WORD or all(len(word) <= _LONG_WORD for word in value.split()))
    ):
        return value
    if not value.strip(" \t"):
        # only whitespace: all of it must sit inside an encoded-word to survive
        return " ".join(_encoded_words(value)) if value else value
    pieces = _WSP_RUNS.split(value)  # words at even indexes, whitespace runs at odd ones
    flags = [_word_needs_encoding(piece, phrase=phrase) for piece in pieces[::2]]
    # Leading whitespace is stripped by parsers unless it sits inside an encoded-word; so
    # is a display name's trailing whitespace (unstructured text keeps it as written).
    if pieces[0] == "":
        flags[0] = flags[1] = True
    if phrase and pieces[-1] == "":
        flags[-1] = flags[-2] = True
    return _join_runs(pieces, flags)


def _join_runs(pieces: list[str], flags: list[bool]) -> str:
    """Plain words as they are; each run of words to encode (with its inner whitespace) encoded."""
    out: list[str] = []
    index = 0
    count = len(flags)
    while index < count:
        end = index
        if flags[index]:
            while end + 1 < count and flags[end + 1]:
                end += 1
            out.append(" ".join(_encoded_words("".join(pieces[2 * index : 2 * end + 1]))))
        else:
            out.append(pieces[2 * index])
        if end + 1 < count:
            out.append(pieces[2 * end + 1])
        index = end + 1
    return "".join(out)


_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,64})(?:\*[^?\s]{0,32})?\?([QqBb])\?([^?\s]*)\?=")
_BREAKS = re.compile(r"[\r\n\x00]")


def has_encoded_break(value: str) -> bool:
    """True when an RFC 2047 encoded-word in ``value`` decodes to CR, LF or NUL."""
    if "=?" not in value:
        return False
    for match in _ENCODED_WORD.finditer(value):
        octets = _word_octets(match.group(2), match.group(3))
        if octets is None:
            continue
        if b"\r" in octets or b"\n" in octets or b"\x00" in octets:
            return True
        try:
            text = octets.decode(codecs.lookup(match.group(1)).name, "replace")
        except (LookupError, ValueError, TypeError):
            continue
        if _BREAKS.search(text) is not None:
            return True
    return False


def _word_octets(encoding: str, text: str) -> bytes | None:
    raw = text.encode("ascii", "replace")
    if encoding in "Qq":
        return binascii.a2b_qp(raw, header=True)
    try:
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except binascii.Error:
        return None


# ---------------------------------------------------------------------------------------
# folding


def fold(name: str, body: str, path: str) -> str:
    """``Name: body`` folded in front of whitespace to lines of 78 characters where possible.

    Raises :class:`BuildError` when a line would still exceed 998 octets.
    """
    line = f"{name}: {body}"
    if len(line) <= PREFERRED_LINE:
        return line
    lines: list[str] = []
    start = 0
    previous = -1
    for match in _FOLD_POINT.finditer(line, len(name) + 2):
        point = match.start()
        if point - start > PREFERRED_LINE and previous > start:
            lines.append(line[start:previous])
            start = previous
        previous = point
    if len(line) - start > PREFERRED_LINE and previous > start:
        lines.append(line[start:previous])
        start = previous
    lines.append(line[start:])
    for text in lines:
        if len(text) > MAX_LINE // 4 and len(text.encode("utf-8")) > MAX_LINE:
            raise BuildError(path, f"a line of this field would exceed {MAX_LINE} octets")
    return "\r\n".join(lines)


# ---------------------------------------------------------------------------------------
# addresses


def ascii_domain(domain: str) -> str:
    """``domain`` with its internationalised labels as A-labels: IDNA 2008 with UTS 46's
    non-transitional mapping (the ``idna`` package), as browsers and current mail systems
    look names up.  Python's own ``idna`` codec is IDNA 2003, which writes ``straße`` as
    ``strasse``: another domain, which mail was sent to.  Raises UnicodeError
    (``idna.IDNAError``) for a domain without an A-label form."""
    if domain.isascii():
        return domain
    return idna.encode(domain, uts46=True).decode("ascii")


def idna_domain(domain: str, path: str) -> str:
    """An ASCII domain: IDN labels become punycode (A-labels); literals stay as they are."""
    if domain.isascii():
        return domain
    try:
        return ascii_domain(domain)
    except UnicodeError as error:
        raise BuildError(path, f"invalid international domain {domain!r}: {error}") from error


def _scan_delimited(value: str, start: int, opener: str, closer: str, path: str) -> int:
    """Index just past the ``closer`` matching ``value[start]``; quoted pairs skipped."""
    depth = 0
    index = start
    length = len(value)
    nests = opener != closer
    while index < length:
        char = value[index]
        if char == "\\":
            index += 2
            continue
        if char == closer and (depth == 1 or not nests) and index > start:
            return index + 1
        if nests and char == opener:
            depth += 1
        elif nests and char == closer:
            depth -= 1
        index += 1
    raise BuildError(path, f"unbalanced {opener!r} in address field")


_ATOM_END = re.compile(r'[ \t"(<,:;]')


def _tokens(value: str, path: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of an address list: ws, qs, comment, angle, sep, atom."""
    tokens: list[tuple[str, str]] = []
    index = 0
    length = len(value)
    while index < length:
        char = value[index]
        if char in " \t":
            end = index + 1
            while end < length and value[end] in " \t":
                end += 1
            kind = "ws"
        elif char == '"':
            end, kind = _scan_delimited(value, index, '"', '"', path), "qs"
        elif char == "(":
            end, kind = _scan_delimited(value, index, "(", ")", path), "comment"
        elif char == "<":
            end, kind = _angle_end(value, index, path), "angle"
        elif char in ",:;":
            end, kind = index + 1, "sep"
        else:
            match = _ATOM_END.search(value, index)
            end, kind = (match.start() if match else length), "atom"
        tokens.append((kind, value[index:end]))
        index = end
    return tokens


def single_address(value: str) -> str | None:
    """The addr-spec of an address field that holds exactly one mailbox, ``a@b`` or ``Name
    <a@b>`` (a quoted local part, comments and white space around allowed), read the way
    RFC 5322 reads it; None for anything else: a list, a group, two addresses, words after
    the address (which an RFC 5322 reader may take as more of its domain), specials in a
    display name, an unbalanced quote or bracket, an unquoted ``@`` in the local part."""
    try:
        tokens = _tokens(value, "address")
    except BuildError:
        return None
    spec = _candidate_spec(tokens)
    return _checked_spec(spec) if spec is not None else None


def _candidate_spec(tokens: list[tuple[str, str]]) -> str | None:
    """The addr-spec text of the field's one mailbox, before its parts are checked."""
    words = [(kind, text) for kind, text in tokens if kind not in ("ws", "comment")]
    if words and words[-1][0] == "angle":  # a display name, then <addr-spec>
        name = words[:-1]
        plain = all(
            kind == "qs" or (kind == "atom" and _WORD.fullmatch(text)) for kind, text in name
        )
        return words[-1][1][1:-1] if plain else None
    if len(words) == 1 and words[0][0] == "atom":
        return words[0][1]
    if [kind for kind, _ in tokens] == ["qs", "atom"] and tokens[1][1].startswith("@"):
        return tokens[0][1] + tokens[1][1]  # "quoted"@domain, nothing around it
    return None


# A dot-atom's characters (UTF-8 allowed: RFC 6532): what a bare local part, a domain or a
# word of a display name may hold; a quoted string may hold anything.
_WORD = re.compile(r'[^\s()<>\[\]:;@\\,"]+')
_LOCAL_PART = re.compile(r'[^\s()<>\[\]:;@\\,"]+|"(?:[^"\\]|\\.)*"')


def _checked_spec(spec: str) -> str | None:
    local, at, domain = spec.rpartition("@")
    ok = at and _LOCAL_PART.fullmatch(local) and _WORD.fullmatch(domain)
    return spec if ok else None


def _angle_end(value: str, start: int, path: str) -> int:
    index = start + 1
    while index < len(value):
        char = value[index]
        if char == '"':
            index = _scan_delimited(value, index, '"', '"', path)
            continue
        if char == ">":
            return index + 1
        index += 1
    raise BuildError(path, "unbalanced '<' in address field")


def _addr_spec(spec: str, path: str) -> tuple[str, bool]:
    """(addr-spec with an ASCII domain, local part is non-ASCII)."""
    at = spec.rfind("@")
    if at < 0:
        return spec, not spec.isascii()
    local, domain = spec[:at], spec[at + 1 :]
    return f"{local}@{idna_domain(domain, path)}", not local.isascii()


def _unquote_phrase(tokens: list[tuple[str, str]]) -> str:
    parts: list[str] = []
    for kind, text in tokens:
        if kind == "qs":
            parts.append(re.sub(r"\\(.)", r"\1", text[1:-1]))
        else:
            parts.append(text)
    return "".join(parts)


def _encode_phrase(tokens: list[tuple[str, str]]) -> str:
    """A display name rewritten with encoded-words when it holds non-ASCII text."""
    if all(text.isascii() and "=?" not in text for _, text in tokens):
        return "".join(text for _, text in tokens)
    out: list[str] = []
    run: list[tuple[str, str]] = []
    for kind, text in [*tokens, ("comment", "")]:
        if kind != "comment":
            run.append((kind, text))
            continue
        if run:
            out.append(_encode_phrase_run(run))
            run = []
        if text:
            out.append(_encode_comment(text))
    return "".join(out)


def _encode_phrase_run(run: list[tuple[str, str]]) -> str:
    """Words and quoted strings between comments, encoded as one piece of text.

    Whitespace tokens at either end separate the name from its neighbours and stay
    outside; whitespace inside a quoted string is part of the name and goes inside the
    encoded-words (``"Zoë " <a@x>`` keeps its trailing space).
    """
    first = 0
    last = len(run)
    while first < last and run[first][0] == "ws":
        first += 1
    while last > first and run[last - 1][0] == "ws":
        last -= 1
    lead = "".join(text for _, text in run[:first])
    trail = "".join(text for _, text in run[last:])
    if first == last:
        return lead
    return lead + encode_unstructured(_unquote_phrase(run[first:last]), phrase=True) + trail


def _encode_comment(comment: str) -> str:
    if comment.isascii() and "=?" not in comment:
        return comment
    inner = comment[1:-1]
    return "(" + " ".join(_encoded_words(inner)) + ")"


def encode_address_list(value: str, path: str) -> tuple[str, bool]:
    """(field body, needs SMTPUTF8) for an address field.

    Addresses are kept as written except that IDN domains become punycode; display names
    and comments holding non-ASCII text become encoded-words.  A non-ASCII local part
    cannot be encoded: the field is then emitted as raw UTF-8 (RFC 6532) and SMTPUTF8 is
    required.
    """
    if value.isascii() and "=?" not in value:
        return value, False
    tokens = _tokens(value, path)
    raw_utf8 = False
    out: list[str] = []
    phrase: list[tuple[str, str]] = []
    for kind, text in tokens:
        if kind in ("ws", "qs", "comment") or (kind == "atom" and "@" not in text):
            phrase.append((kind, text))
            continue
        out.append(_encode_phrase(phrase))
        if kind == "atom":  # a bare addr-spec
            spec, utf8 = _addr_spec(text, path)
        elif kind == "angle":
            inner, utf8 = _addr_spec(text[1:-1], path)
            spec = f"<{inner}>"
        else:  # "," ":" ";" (a group name before ":" is a phrase too)
            spec, utf8 = text, False
        raw_utf8 = raw_utf8 or utf8
        phrase = []
        out.append(spec)
    out.append(_encode_phrase(phrase))
    body = "".join(out)
    if raw_utf8 or not body.isascii():
        return _raw_with_ascii_domains(tokens, path), True
    return body, False


def _raw_with_ascii_domains(tokens: list[tuple[str, str]], path: str) -> str:
    out: list[str] = []
    for kind, text in tokens:
        if kind == "angle":
            out.append(f"<{_addr_spec(text[1:-1], path)[0]}>")
        elif kind == "atom" and "@" in text:
            out.append(_addr_spec(text, path)[0])
        else:
            out.append(text)
    return "".join(out)


# ---------------------------------------------------------------------------------------
# MIME parameters (Content-Type, Content-Disposition)

_QUOTABLE = re.compile(r"[\x20-\x7e]*")
_ATTR_SAFE = "!#$&+-.^_`|~"  # RFC 2231 attribute-char besides ALPHA / DIGIT
_CHARSET_PREFIX = "utf-8''"
_SECTION = 60  # characters of percent-encoded text per RFC 2231 section


def split_params(value: str) -> list[str]:
    """``value`` split on ";" outside quoted strings: main type first, then ``name=value`` items."""
    if '"' not in value:
        return value.split(";")
    items: list[str] = []
    start = 0
    quoted = False
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\" and quoted:
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            items.append(value[start:index])
            start = index + 1
        index += 1
    items.append(value[start:])
    return items


def param_name(item: str) -> str:
    """Lower-cased parameter name of a ``name=value`` item, RFC 2231 section marks dropped."""
    return item.partition("=")[0].strip().lower().partition("*")[0]


def param_value(item: str) -> str:
    """Unquoted value of a ``name=value`` item."""
    raw = item.partition("=")[2].strip()
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def format_param(name: str, value: str) -> str:
    """``name="value"`` (always quoted), or RFC 2231 ``name*=utf-8''...`` sections.

    Quoting a token is optional (RFC 2045 5.1) but some readers only accept filenames
    quoted, and a caller's ``name="x.txt"`` should come back as written.  A value with
    "=?" is RFC 2231-encoded, so that no reader decodes it as an RFC 2047 encoded-word.
    """
    if value.isascii() and _QUOTABLE.fullmatch(value) and len(value) <= 200:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        if "=?" not in value:
            return f'{name}="{escaped}"'
    encoded = quote(value.encode("utf-8"), safe=_ATTR_SAFE)
    if len(encoded) <= _SECTION:
        return f"{name}*=utf-8''{encoded}"
    return "; ".join(
        f"{name}*{number}*={_CHARSET_PREFIX if number == 0 else ''}{section}"
        for number, section in enumerate(_sections(encoded))
    )


def _sections(encoded: str) -> list[str]:
    """Percent-encoded UTF-8 cut into pieces of about _SECTION characters at character
    boundaries: never inside %XX nor between the octets of one character.

    RFC 2231 lets a section end anywhere, but Thunderbird and Outlook decode each section
    on its own, so a split character would become two replacement characters.
    """
    pieces: list[str] = []
    start = 0
    while start < len(encoded):
        end = min(start + _SECTION, len(encoded))
        if end < len(encoded):
            end = _character_start(encoded, start, end)
        pieces.append(encoded[start:end])
        start = end
    return pieces


def _character_start(encoded: str, start: int, end: int) -> int:
    """The last index <= ``end`` (and > ``start``) where a character's encoding begins."""
    percent = encoded.rfind("%", max(start, end - 2), end)
    if percent >= 0 and percent + 3 > end:
        end = percent
    # %80-%BF continue a UTF-8 character; a character is at most 4 octets (12 characters).
    while end - 3 > start and encoded[end] == "%" and encoded[end + 1] in "89AB":
        end -= 3
    return end


def rewrite_params(value: str, replace: dict[str, str | None], path: str) -> str:
    """A Content-Type/-Disposition value with parameters replaced, added or removed.

    ``replace`` maps lower-cased names to new values (None removes); items holding
    non-ASCII text are re-encoded per RFC 2231; everything else is kept as written.
    """
    items = split_params(value)
    main = items[0].strip()
    if not main.isascii():
        raise BuildError(path, f"non-ASCII media or disposition type {main!r}")
    out = [main]
    for item in items[1:]:
        if not item.strip():
            continue
        name = param_name(item)
        if name in replace:
            continue
        if item.isascii():
            out.append(item.strip())
        else:
            out.append(format_param(name, param_value(item)))
    for name, new in replace.items():
        if new is not None:
            out.append(format_param(name, new))
    return "; ".join(out)


def utf8_text(text: str) -> str:
    """``text`` with what cannot be written as UTF-8 escaped: octets that came in as lone
    surrogates (``surrogateescape``, as aiosmtpd and aiosmtplib decode lines) as ``\\xe7``,
    any other lone surrogate as ``\\ud800``.  Text from outside goes through this before
    it is stored or sent on: msgpack and hiredis take valid UTF-8 only."""
    if is_utf8(text):
        return text
    try:
        octets = text.encode("utf-8", "surrogateescape")  # the peer's own octets back
    except UnicodeEncodeError:  # a surrogate no decoder made: not the peer's octets
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return octets.decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    """``text`` can be written as UTF-8: it holds no lone surrogate."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
