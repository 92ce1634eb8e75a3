"""Schema validation of decoded send and receive messages, naming the path of every problem.

Hand-written rather than JSON-Schema driven: it runs on every stream entry, and an error
must say exactly which item is wrong ("content.parts[2].body: expected bin, got str").

Compatibility rule (see schema/README.md): unknown keys, at the top level and in content
objects, are allowed and ignored, so a newer producer may add extensions without breaking
older consumers.  Known extension keys must have their documented types.

The validators return the very object they were given, typed; nothing is copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

from workers.codec.dsn import validate_dsn
from workers.codec.encode import has_encoded_break
from workers.codec.errors import BuildError, SchemaError
from workers.codec.types import SCHEMA_VERSION, ReceiveMessage, SendMessage
from workers.codec.wire import DEFAULT_LIMITS, WireLimits, unpack

__all__ = [
    "MAX_CONTENT_DEPTH",
    "decode_receive",
    "decode_send",
    "validate_receive",
    "validate_send",
]

# Nesting of content objects below the root: 30 keeps a packed message within the wire
# depth limit of 64 (2 levels per content level plus the part's headers map) and matches
# the parser's multipart limit.
MAX_CONTENT_DEPTH = 30

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext
_PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_BREAKS = re.compile(r"[\r\n\x00]")
# What no_breaks has to look at more closely: a break, or the start of an encoded-word.
_BREAK_OR_WORD = re.compile(r"[\r\n\x00]|=\?")
_RESTRICTED_NAME = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_MEDIA_TYPE = re.compile(rf"\s*{_RESTRICTED_NAME}/{_RESTRICTED_NAME}\s*")


def _kind(value: object) -> str:
    names = {
        dict: "map",
        list: "array",
        str: "str",
        bytes: "bin",
        int: "int",
        float: "float",
        bool: "bool",
        type(None): "nil",
    }
    return names.get(type(value), type(value).__name__)


def _expect(value: object, expected: type | tuple[type, ...], path: str, label: str) -> None:
    if type(value) is expected:  # the common case, bool included
        return
    if not isinstance(value, expected) or isinstance(value, bool) is not (expected is bool):
        raise SchemaError(path, f"expected {label}, got {_kind(value)}")


def _field_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if _PLAIN_NAME.fullmatch(name) else f"{prefix}[{name!r}]"


class _Rules:
    """What differs between send and receive messages."""

    def __init__(self, *, send: bool) -> None:
        self.send = send
        self.body_types: tuple[type, ...] = (bytes, str) if send else (bytes,)
        self.body_label = "bin or str" if send else "bin"

    def plain(self, text: str) -> bool:
        """True when no_breaks would accept ``text`` (always, for receive messages)."""
        return not self.send or _plain_text(text)

    def header_name(self, name: object, path: str) -> str:
        _expect(name, str, path, "str header name")
        text = cast("str", name)
        if self.send and _BREAKS.search(text) is not None:
            raise BuildError(path, "CR, LF or NUL in a header name (header injection)")
        if _FIELD_NAME.fullmatch(text) is None:
            raise SchemaError(path, f"invalid header name {text!r}")
        return text

    def header_value(self, value: object, path: str) -> None:
        _expect(value, str, path, "str header value")
        if self.send:
            no_breaks(cast("str", value), path, "a header value")

    def plain_field(self, name: object, value: object) -> bool:
        """True when header_name and header_value would accept the field as it is.

        Cheaper and without a path: a field it is unsure of gets the full checks.
        """
        return (
            type(name) is str
            and type(value) is str
            and _FIELD_NAME.fullmatch(name) is not None  # ftext holds no CR, LF or NUL
            and (not self.send or _plain_text(value))
        )


def _plain_text(text: str) -> bool:
    """True when ``text`` has neither CR, LF, NUL nor an encoded-word: no_breaks accepts it."""
    return _BREAK_OR_WORD.search(text) is None


def no_breaks(text: str, path: str, what: str) -> None:
    """Refuse CR, LF and NUL in ``text``, also inside RFC 2047 encoded-words."""
    if _BREAKS.search(text) is not None:
        raise BuildError(path, f"CR, LF or NUL in {what} (header injection)")
    if has_encoded_break(text):
        raise BuildError(path, f"encoded-word in {what} decodes to CR, LF or NUL")


_SEND = _Rules(send=True)
_RECEIVE = _Rules(send=False)


# RFC 5322 section 3.6: fields a message has at most once.  Other fields of the message's
# ``headers`` map may hold several values joined by LF, as a received message's do.
ONCE_ONLY = frozenset(
    {"date", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id", "in-reply-to",
     "references", "subject"}
)  # fmt: skip


def _headers(value: object, path: str, rules: _Rules, *, repeated: bool = False) -> None:
    """A headers map; ``repeated``: the message's own, where an LF separates the values of
    a field given several times (each one is a field of its own: nothing can be injected,
    every line gets the field's name), as ``email.receive`` joins them."""
    _expect(value, dict, path, "map")
    for name, text in cast("dict[object, object]", value).items():
        if rules.plain_field(name, text):
            continue
        field_path = _field_path(path, name) if isinstance(name, str) else path
        rules.header_name(name, field_path)
        # A field a message has once keeps LF refused, as header injection.
        several = repeated and rules.send and isinstance(text, str) and "\n" in text
        if several and cast("str", name).lower() not in ONCE_ONLY:
            for line in cast("str", text).split("\n"):
                rules.header_value(line, field_path)
            continue
        rules.header_value(text, field_path)


def _header_list(value: object, path: str, rules: _Rules) -> None:
    _expect(value, list, path, "array")
    for index, pair in enumerate(cast("list[object]", value)):
        item_path = f"{path}[{index}]"
        _expect(pair, list, item_path, "[name, value] array")
        items = cast("list[object]", pair)
        if len(items) != 2:
            raise SchemaError(item_path, f"expected [name, value], got {len(items)} items")
        rules.header_name(items[0], f"{item_path}[0]")
        rules.header_value(items[1], f"{item_path}[1]")


def _addresses(message: dict[str, object], rules: _Rules) -> None:
    if "from" not in message:
        raise SchemaError("from", "missing spec key (nil for the null sender)")
    sender = message["from"]
    if sender is not None and not (type(sender) is str and rules.plain(sender)):
        _expect(sender, str, "from", "str or nil")
        if rules.send:
            no_breaks(cast("str", sender), "from", "an envelope address")
    if "to" not in message:
        raise SchemaError("to", "missing spec key")
    recipients = message["to"]
    _expect(recipients, list, "to", "array of str")
    if not recipients:
        raise SchemaError("to", "at least one recipient is required")
    for index, recipient in enumerate(cast("list[object]", recipients)):
        if type(recipient) is str and recipient and rules.plain(recipient):
            continue
        _expect(recipient, str, f"to[{index}]", "str")
        if not recipient:
            raise SchemaError(f"to[{index}]", "empty address")
        if rules.send:
            no_breaks(cast("str", recipient), f"to[{index}]", "an envelope address")


def _content(value: object, path: str, depth: int, rules: _Rules) -> None:
    _expect(value, dict, path, "content object (map)")
    content = cast("dict[str, object]", value)
    if depth > MAX_CONTENT_DEPTH:
        raise SchemaError(path, f"content nested deeper than {MAX_CONTENT_DEPTH} levels")
    content_type = _content_type(content, path, rules)
    if "headers" in content:
        _headers(content["headers"], f"{path}.headers", rules)
    if "filename" in content:
        filename = content["filename"]
        if not (type(filename) is str and rules.plain(filename)):
            _expect(filename, str, f"{path}.filename", "str")
            if rules.send:
                no_breaks(cast("str", filename), f"{path}.filename", "a filename")
    multipart = content_type.split(";", 1)[0].strip().lower().startswith("multipart/")
    if "parts" in content:
        _parts(content, path, depth, rules, multipart=multipart)
    elif multipart and (rules.send or "body" not in content):
        raise SchemaError(f"{path}.parts", "missing: a multipart needs parts")
    if "body" in content:
        if "parts" in content:
            raise SchemaError(f"{path}.body", "a content object has either parts or a body")
        if type(content["body"]) not in rules.body_types:
            _expect(content["body"], rules.body_types, f"{path}.body", rules.body_label)
    elif not multipart:
        raise SchemaError(
            f"{path}.body", f"missing: a {content_type.split(';')[0]} part needs a body"
        )


def _content_type(content: dict[str, object], path: str, rules: _Rules) -> str:
    if "content-type" not in content:
        raise SchemaError(f"{path}.content-type", "missing spec key")
    value = content["content-type"]
    if not (type(value) is str and rules.plain(value)):
        _expect(value, str, f"{path}.content-type", "str")
        if rules.send:
            no_breaks(cast("str", value), f"{path}.content-type", "the content type")
    text = cast("str", value)
    if rules.send:
        media_type = text.split(";", 1)[0]
        if _MEDIA_TYPE.fullmatch(media_type) is None:
            raise SchemaError(f"{path}.content-type", f"invalid media type {media_type!r}")
    return text


def _parts(
    content: dict[str, object], path: str, depth: int, rules: _Rules, *, multipart: bool
) -> None:
    parts_path = f"{path}.parts"
    if not multipart:
        raise SchemaError(parts_path, "only a multipart content type may have parts")
    parts = content["parts"]
    _expect(parts, list, parts_path, "array of content objects")
    items = cast("list[object]", parts)
    if rules.send and not items:
        raise SchemaError(parts_path, "a multipart needs at least one part")
    for index, part in enumerate(items):
        _content(part, f"{parts_path}[{index}]", depth + 1, rules)


def _positive_int(value: object, path: str) -> None:
    _expect(value, int, path, "int")
    if cast("int", value) < 1:
        raise SchemaError(path, "must be at least 1")


def _known_version(value: object, path: str) -> None:
    # A new major version may change what keys mean (schema/README.md, Versioning): refuse it.
    _positive_int(value, path)
    if cast("int", value) > SCHEMA_VERSION:
        raise SchemaError(path, f"unsupported version {value} (known: {SCHEMA_VERSION})")


def _positive_number(value: object, path: str) -> None:
    _expect(value, (int, float), path, "number")
    if not cast("float", value) > 0:
        raise SchemaError(path, "must be greater than 0")


def _non_negative_int(value: object, path: str) -> None:
    _expect(value, int, path, "int")
    if cast("int", value) < 0:
        raise SchemaError(path, "must not be negative")


def _number(value: object, path: str) -> None:
    _expect(value, (int, float), path, "number")


def _str_list(value: object, path: str) -> None:
    _expect(value, list, path, "array of str")
    for index, item in enumerate(cast("list[object]", value)):
        _expect(item, str, f"{path}[{index}]", "str")


def _non_empty_str(value: object, path: str) -> None:
    _expect(value, str, path, "str")
    if not value:
        raise SchemaError(path, "must not be empty")


def _map(value: object, path: str) -> None:
    _expect(value, dict, path, "map")


def _bool(value: object, path: str) -> None:
    _expect(value, bool, path, "bool")


def _raw(value: object, path: str) -> None:
    _expect(value, bytes, path, "bin")


def _dkim(value: object, path: str) -> None:
    """``true``/``false``, or ``{"selector": "..."}``: the From domain's key to sign with."""
    if isinstance(value, bool):
        return
    _expect(value, dict, path, "bool or map")
    choice = cast("dict[object, object]", value)
    unknown = sorted(str(key) for key in choice if key != "selector")
    if unknown:
        raise SchemaError(f"{path}.{unknown[0]}", "unknown key (only selector)")
    if "selector" in choice:
        _non_empty_str(choice["selector"], f"{path}.selector")


_Check = Callable[[object, str], None]
_SEND_EXTENSIONS: dict[str, _Check] = {
    "id": _non_empty_str,
    "version": _known_version,
    "max_attempts": _positive_int,
    "max_age": _positive_number,
    "ignore_suppression": _bool,
    "dkim": _dkim,
}
_RECEIVE_EXTENSIONS: dict[str, _Check] = {
    "id": _non_empty_str,
    "version": _known_version,
    "received_at": _number,
    "size": _non_negative_int,
    "defects": _str_list,
    "raw": _raw,
    "delivery_report": _map,
}


def _message(obj: object, rules: _Rules, extensions: dict[str, _Check]) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise SchemaError("", f"message must be a map, got {_kind(obj)}")
    message = cast("dict[str, object]", obj)
    _addresses(message, rules)
    if "headers" not in message:
        raise SchemaError("headers", "missing spec key")
    _headers(message["headers"], "headers", rules, repeated=True)
    if "header_list" in message:
        _header_list(message["header_list"], "header_list", rules)
    if "content" not in message:
        raise SchemaError("content", "missing spec key")
    _content(message["content"], "content", 0, rules)
    for key, check in extensions.items():
        if key in message:
            check(message[key], key)
    return message


def _with_dsn(message: dict[str, object]) -> dict[str, object]:
    """The ``dsn`` key checked against the message's recipients (:mod:`.dsn`)."""
    if "dsn" in message:
        validate_dsn(message["dsn"], cast("list[str]", message["to"]))
    return message


def validate_send(obj: object) -> SendMessage:
    """``obj`` typed as a send message, or :class:`SchemaError` naming the path and reason.

    CR, LF or NUL in a header name or value, a filename, a content type or an envelope
    address (also inside an RFC 2047 encoded-word) raise :class:`BuildError`: header
    injection.  Unknown keys are ignored (forward compatibility).
    """
    return cast("SendMessage", _with_dsn(_message(obj, _SEND, _SEND_EXTENSIONS)))


def validate_receive(obj: object) -> ReceiveMessage:
    """``obj`` typed as a receive message, or :class:`SchemaError` naming the path and reason.

    Receive header values may hold "\\n" (repeated fields are joined with it); a multipart
    the parser could not split carries its raw ``body``.  Unknown keys are ignored.
    """
    return cast("ReceiveMessage", _with_dsn(_message(obj, _RECEIVE, _RECEIVE_EXTENSIONS)))


def decode_send(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> SendMessage:
    """msgpack bytes -> validated send message (:class:`WireError`, :class:`SchemaError`)."""
    return validate_send(unpack(data, limits))


def decode_receive(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> ReceiveMessage:
    """msgpack bytes -> validated receive message (:class:`WireError`, :class:`SchemaError`)."""
    return validate_receive(unpack(data, limits))
