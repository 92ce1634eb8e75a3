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
    "ADDRESS_FIELDS",
    "decode_address_value",
    "decode_header_value",
    "decode_rfc2231_param",
    "media_type",
    "mime_params",
    "replace_line_breaks",
    "split_content_type",
    "unfold",
]

# RFC 2047 encoded-word.  The charset is bounded so a hostile "=?aaaa..." cannot make the
# scanner walk far from every start position; encoded-text stops at the first "?" or space.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,64})(?:\*[^?\s]{0,32})?\?([QqBb])\?([^?\s]*)\?=")
_WSP_ONLY = re.compile(r"[ \t\r\n]*")
_CONTROL_BREAKS = re.compile(r"[\r\n\x00]")


def unfold(value: str) -> str:
    """RFC 5322 unfolding: drop the line breaks of a folded field body, keep its whitespace.

    A line break is LF or CRLF (a CR of its own stays); two replaces instead of a regex:
    a quarter of a microsecond for a three-line field instead of five."""
    if "\n" not in value:
        return value
    return value.replace("\r\n", "").replace("\n", "")


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


def _decode_encoded_words(
    value: str, defects: list[str] | None, pattern: re.Pattern[str] = _ENCODED_WORD
) -> str:
    pieces: list[str] = []
    pending: list[bytes] = []  # octets of adjacent words in one charset, decoded together
    pending_charset = ""
    last_end = 0
    for match in pattern.finditer(value):
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


def replace_line_breaks(text: str, defects: list[str] | None = None) -> str:
    """``text`` with CR, LF and NUL replaced by a space (they would forge header lines or
    fields downstream)."""
    if _CONTROL_BREAKS.search(text) is None:
        return text
    if defects is not None:
        defects.append("CR, LF or NUL in the decoded value replaced by a space")
    return _CONTROL_BREAKS.sub(" ", text)


def decode_header_value(value: str, defects: list[str] | None = None) -> str:
    """Unfold a field body and decode its RFC 2047 encoded-words; nothing else is rewritten.

    CR, LF and NUL cannot survive into a decoded value; an encoded-word that carries them has
    them replaced by a space.  Address fields go through :func:`decode_address_value`.
    """
    text = unfold(value)
    if "=?" in text:
        text = _decode_encoded_words(text, defects)
    if _CONTROL_BREAKS.search(text) is None:  # the common case, without a call
        return text
    return replace_line_breaks(text, defects)


# ---------------------------------------------------------------------------------------
# Address fields: decoding never adds structure
#
# An encoded-word stands for one word of a phrase (RFC 2047 section 5): what it decodes to is
# never list syntax.  So in address fields the value is read as an address list first, and a
# display name (or a local part) whose decoded text a list parser would split, or read
# differently, is written as a quoted-string; decoded comments and quoted-strings get their
# delimiters escaped.  Where the stdlib's policy.default decodes (display names, quoted
# strings, comments, local parts, domains), this decodes too, so email.utils.getaddresses
# on the stored value finds the mailboxes and names policy.default finds in the raw field.
# A field whose words list parsers may not agree on (see _address_tokens) keeps its
# encoded-words as sent: there, decoding could move a boundary.  Fields without "=?" take
# none of this (the common case costs what decode_header_value costs).

ADDRESS_FIELDS = frozenset(
    {
        "from", "sender", "reply-to", "to", "cc", "bcc",
        "resent-from", "resent-sender", "resent-reply-to", "resent-to", "resent-cc",
        "resent-bcc", "mail-followup-to", "mail-reply-to", "disposition-notification-to",
    }
)  # fmt: skip

# One lexical item of an address list, tried in this order.  An encoded-word is taken whole
# even when its text holds specials (as policy.default does), but only where a word starts;
# dots and a stray backslash are atom characters here (as email.utils reads a phrase), so
# "a.b" is one atom and "\=?...?=" one undecoded atom.  "(" starts a comment, which nests
# and is scanned by _comment_end.
_ADDRESS_TOKEN = re.compile(
    r"(?P<ew>=\?[^?\s*]{1,64}(?:\*[^?\s]{0,32})?\?[QqBb]\?[^?\s]*+\?=)"
    r"|(?P<ws>[ \t\r\n]++)"
    r'|(?P<quoted>"(?:[^"\\]++|\\.)*+"?)'
    r"|(?P<literal>\[(?:[^\]\\]++|\\.)*+\]?)"
    r'|(?P<atom>[^ \t\r\n"()<>\[\]:;@,]++)'
    r"|(?P<special>.)",
    re.DOTALL,
)
_COMMENT_PIECE = re.compile(r"[^\\()]++|\\.?|[()]", re.DOTALL)
# Decoded comment text that strict list parsers misread even when escaped.
_COMMENT_UNSAFE = re.compile(r'[\\(),"]')
# policy.default decodes an encoded-word inside a quoted-string where a word starts.
_QUOTED_ENCODED_WORD = re.compile(r"(?<![^ \t])" + _ENCODED_WORD.pattern)
# Tokens that stay inside one phrase, local part or domain; any other special ends it.
_RUN_KINDS = frozenset({"ew", "ws", "quoted", "literal", "atom", "comment"})
# Text a list parser reads back unchanged without quotes: words of non-specials, one space
# apart (a phrase), or one dot apart (a local part or domain).
_WORD = r'[^\s\x00-\x1f\x7f()<>\[\]:;@\\,."]+'
_PLAIN_PHRASE = re.compile(f"{_WORD}(?: {_WORD})*")
_DOT_ATOM = re.compile(rf"{_WORD}(?:\.{_WORD})*")

_Token = tuple[str, str]


def _comment_end(text: str, start: int) -> int:
    """Where the comment opening at ``start`` ends (after its ")"), or -1 when unclosed."""
    depth = 0
    for match in _COMMENT_PIECE.finditer(text, start):
        piece = match.group()
        if piece == "(":
            depth += 1
        elif piece == ")":
            depth -= 1
            if depth == 0:
                return match.end()
    return -1


_MODE_CHANGE = re.compile(r'["()\[\]\\]')
_CLOSED_QUOTED = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_CLOSED_LITERAL = re.compile(r"\[(?:[^\]\\]++|\\.)*+\]", re.DOTALL)


def _address_tokens(text: str) -> list[_Token] | None:
    """(kind, text) items, specials their own kind ("<", ",", ...); None when the field is
    not well-formed enough for list parsers to agree on its structure (an unclosed quote,
    comment, domain literal or "<", a stray ")", "]", ">" or backslash, a "[" not after "@", or an
    encoded-word whose text holds a quote, parenthesis, bracket or backslash: RFC 2047
    section 5 forbids them there, and a list parser that does not know encoded-words reads
    them as the start of a quoted-string, comment or literal)."""
    tokens: list[_Token] = []
    significant = ""  # the kind of the last token that is not whitespace or a comment
    in_angle = False
    position, length = 0, len(text)
    while position < length:
        match = _ADDRESS_TOKEN.match(text, position)
        assert match is not None  # the last alternative takes any character
        kind, end = match.lastgroup or "", match.end()
        if kind == "special":
            kind = text[position]
            if kind == "(":  # comments nest: scan to the matching ")"
                kind, end = "comment", _comment_end(text, position)
            elif kind in _STRAY or (kind in "<>" and in_angle == (kind == "<")):
                return None
            in_angle = (in_angle or kind == "<") and kind != ">"
        elif kind != "ws" and not _well_formed(kind, match.group(), significant):
            return None
        if end < 0:
            return None
        tokens.append((kind, text[position:end]))
        if kind not in _BETWEEN_WORDS:
            significant = kind
        position = end
    return None if in_angle else tokens


_STRAY = frozenset({")", "]"})
_BETWEEN_WORDS = frozenset({"ws", "comment"})


def _well_formed(kind: str, token: str, significant: str) -> bool:
    if kind == "atom":
        # A backslash outside quotes, comments and literals: list parsers disagree on it
        # (before a "(", Python 3.11.2's getaddresses reads an escaped "(", 3.11.7's a
        # comment), so where a mailbox ends is not agreed either.
        return "\\" not in token
    if kind == "ew":
        return _MODE_CHANGE.search(token) is None
    if kind == "quoted":
        return _CLOSED_QUOTED.fullmatch(token) is not None
    if kind == "literal":
        return significant == "@" and _CLOSED_LITERAL.fullmatch(token) is not None
    return True


def _quoted_content(token: str) -> str:
    """The text of a quoted-string token, quoted-pairs resolved."""
    inner = token[1:-1]
    return _QUOTED_PAIR.sub(r"\1", inner) if "\\" in inner else inner


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_comment(comment: str, defects: list[str] | None) -> str:
    """The comment with its encoded-words decoded, except where the decoded text holds a
    comma, parenthesis, quote or backslash: escaped, those are valid RFC 5322, but strict list
    parsers (CPython's getaddresses since the CVE-2023-27043 fix, as Debian 12 ships it)
    count them and reject the whole field, so such a word is kept as sent."""
    if "=?" not in comment:
        return comment
    pieces: list[str] = []
    for match in _COMMENT_PIECE.finditer(comment):
        piece = match.group()
        if "=?" in piece and piece[0] not in "\\()":
            decoded = _decode_encoded_words(piece, defects)
            if _COMMENT_UNSAFE.search(decoded) is None:
                piece = decoded
        pieces.append(piece)
    return "".join(pieces)


class _Run:
    """The words of one display name, local part or domain, read two ways: ``values`` as a
    list parser gives them (comments and folding whitespace between words count as one
    space, RFC 2047 section 6.2 for adjacent encoded-words) and ``rendered``, the sent text
    with its encoded-words decoded, each one quoted unless it is a plain phrase."""

    def __init__(self, tokens: list[_Token], defects: list[str] | None) -> None:
        self.values: list[tuple[str, bool]] = []  # (word, whitespace or comment before it)
        self.rendered: list[str] = []
        self.comments: list[str] = []
        self.decoded_word = False  # an encoded-word outside comments was decoded
        gap = False
        index = 0
        while index < len(tokens):
            kind, text = tokens[index]
            if kind == "ew":
                index, text = self._encoded_words(tokens, index, defects)
                plain = _PLAIN_PHRASE.fullmatch(text) is not None
                self._word(text, text if plain else _quote(text), gap=gap)
                self.decoded_word, gap = True, False
                continue
            if kind == "ws":
                self.rendered.append(text)
                gap = True
            elif kind == "comment":
                comment = _render_comment(text, defects)
                self.rendered.append(comment)
                self.comments.append(comment)
                gap = True
            elif kind == "quoted":
                self._quoted(text, defects, gap=gap)
                gap = False
            else:
                self._word(text, text, gap=gap)
                gap = False
            index += 1

    def _encoded_words(
        self, tokens: list[_Token], start: int, defects: list[str] | None
    ) -> tuple[int, str]:
        """Decode the encoded-words from ``start`` with only whitespace between them
        together; return the index after them and their text."""
        end = start + 1
        last = start
        while end < len(tokens) and tokens[end][0] in ("ew", "ws"):
            if tokens[end][0] == "ew":
                last = end
            end += 1
        raw = "".join(text for _, text in tokens[start : last + 1])
        return last + 1, _decode_encoded_words(raw, defects)

    def _quoted(self, token: str, defects: list[str] | None, *, gap: bool) -> None:
        content = _quoted_content(token)
        if "=?" in content:
            decoded = _decode_encoded_words(content, defects, _QUOTED_ENCODED_WORD)
            if decoded != content:
                self.decoded_word = True
                self._word(decoded, _quote(decoded), gap=gap)
                return
        self._word(content, token, gap=gap)

    def _word(self, value: str, rendered: str, *, gap: bool) -> None:
        self.values.append((value, gap))
        self.rendered.append(rendered)

    def phrase(self) -> str:
        # No strip: a decoded word's own leading or trailing space is part of the name.
        return "".join(
            " " + value if gap and index else value
            for index, (value, gap) in enumerate(self.values)
        )

    def dotted(self) -> str:
        """Words joined as in a local part or domain: no space next to a dot."""
        pieces: list[str] = []
        previous = "."
        for value, gap in self.values:
            spaced = gap and not previous.endswith(".") and not value.startswith(".")
            pieces.append(" " + value if spaced else value)
            previous = value
        return "".join(pieces)

    def with_comments(self, text: str) -> str:
        return "".join([text, *(" " + comment for comment in self.comments)])


def _split_outer_whitespace(tokens: list[_Token]) -> tuple[str, list[_Token], str]:
    """(leading whitespace, the tokens from the first to the last non-blank one, trailing
    whitespace): the blanks around a name separate it from its neighbours.  The tokenizer
    makes one "ws" token of each blank run, so there is at most one at either end."""
    lead = tokens[0][1] if tokens[0][0] == "ws" else ""
    inner = tokens[1:] if lead else tokens
    trail = inner[-1][1] if inner and inner[-1][0] == "ws" else ""
    return lead, inner[:-1] if trail else inner, trail


def _render_run(tokens: list[_Token], role: str, defects: list[str] | None) -> str:
    """The text of one phrase, local part or domain with its encoded-words decoded."""
    sent = "".join(text for _, text in tokens)
    if "=?" not in sent:
        return sent
    lead, inner, trail = _split_outer_whitespace(tokens)
    run = _Run(inner, defects)
    if not run.decoded_word:  # only comments changed
        return lead + "".join(run.rendered) + trail
    if role != "phrase":
        return lead + _render_addr_spec_part(run, inner, role, defects) + trail
    name = run.phrase()
    if _PLAIN_PHRASE.fullmatch(name) is not None:
        return lead + "".join(run.rendered) + trail
    return lead + run.with_comments(_quote(name)) + trail


def _render_addr_spec_part(
    run: _Run, tokens: list[_Token], role: str, defects: list[str] | None
) -> str:
    value = run.dotted()
    if role == "local":
        plain = _DOT_ATOM.fullmatch(value) is not None
        return run.with_comments(value if plain else _quote(value))
    if _DOT_ATOM.fullmatch(value) is not None and all(kind != "quoted" for kind, _ in tokens):
        return run.with_comments(value)
    # A domain cannot be quoted: keep its words as sent (RFC 2047 allows no encoded-word in
    # an addr-spec) and decode only the comments.
    if defects is not None:
        defects.append("encoded-word in a domain left as sent")
    return _comments_decoded(tokens, defects)


def _comments_decoded(tokens: list[_Token], defects: list[str] | None) -> str:
    return "".join(
        _render_comment(text, defects) if kind == "comment" else text for kind, text in tokens
    )


def _run_role(before: str, after: str, in_angle: bool) -> str:
    """What a run between the specials ``before`` and ``after`` is in an address list."""
    if before == "@":
        return "domain"
    if after == "<" or (after == ":" and not in_angle):
        return "phrase"
    return "local"  # a local part, or a mailbox without a domain


def decode_address_value(value: str, defects: list[str] | None = None) -> str:
    """Like :func:`decode_header_value`, for address fields: a decoded display name with
    specials becomes a quoted-string, so decoding never adds or moves a mailbox."""
    text = unfold(value)
    if "=?" not in text:  # the common case: as decode_header_value
        return text if _CONTROL_BREAKS.search(text) is None else replace_line_breaks(text, defects)
    tokens = _address_tokens(text)
    if tokens is None:
        # Readers may not agree where its words are: decoding could move the boundaries.
        if defects is not None:
            defects.append("malformed address field, its encoded-words left as sent")
        return replace_line_breaks(text, defects)
    pieces: list[str] = []
    run: list[_Token] = []
    before = ""
    in_angle = False
    for kind, token in tokens:
        if kind in _RUN_KINDS:
            run.append((kind, token))
            continue
        pieces.append(_render_run(run, _run_role(before, kind, in_angle), defects))
        pieces.append(token)
        run = []
        before = kind
        in_angle = kind == "<" or (in_angle and kind != ">")
    pieces.append(_render_run(run, _run_role(before, "", in_angle), defects))
    return replace_line_breaks("".join(pieces), defects)


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


def _collect_params(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], frozenset[str]]:
    """Parameter names (lower-cased) to values, RFC 2231 continuations joined and decoded;
    and the names whose value came in RFC 2231 form (``name*=``, ``name*0*=``, ...)."""
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
    return params, frozenset(extended)


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


def mime_params(value: str) -> tuple[str, dict[str, str], frozenset[str]]:
    """``(first word lower-cased, params, RFC 2231 names)`` of a Content-Type or
    Content-Disposition value.

    Parameter values are unquoted; those given in RFC 2231 form are decoded and final (they
    are literal text: RFC 2047 never applies to them), the names of those are the third item.
    RFC 2047 in the plain ``name=value`` forms is left to the caller.
    """
    main, _, rest = value.partition(";")
    # A comment after the type ("text/plain (fixed)") is not part of it.
    words = main.split("(", 1)[0].split()
    main = words[0].lower() if words else ""
    if not rest:
        return main, {}, frozenset()
    params, extended = _collect_params(_scan_params(rest))
    return main, params, extended


def split_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``(type/subtype lower-cased, params)`` of a Content-Type or Content-Disposition value;
    see :func:`mime_params`."""
    main, params, _ = mime_params(value)
    return main, params


# RFC 2045 section 5.1: type "/" subtype, both tokens (whitespace around "/" is tolerated,
# as is trailing text after a blank: "image/jpeg x-junk" is still read as image/jpeg).
_TYPE_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TYPE_NAME})[ \t]*/[ \t]*({_TYPE_NAME})(?![^ \t])")


def media_type(value: str) -> str | None:
    """The lower-cased ``type/subtype`` of a Content-Type value, or None when it cannot be
    read (RFC 2045 section 5.2 then says: text/plain; charset=us-ascii)."""
    main = value.partition(";")[0].split("(", 1)[0]
    match = _MEDIA_TYPE.match(main)
    if match is None:
        return None
    return f"{match.group(1)}/{match.group(2)}".lower()
