"""msgpack encoding of spec messages with explicit limits on what a decoder will accept.

Stream entries come from any producer, so :func:`unpack` treats its input as hostile: the
size of the whole entry, the length of every str/bin/array/map and the nesting depth are
bounded, ext types are refused and every map key must be a str.  Text is msgpack str
(UTF-8) and bodies are msgpack bin, so ``str`` and ``bytes`` survive a round trip.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import msgpack

from workers.codec.errors import WireError
from workers.codec.msgpack_fence import UNPACKER_STACK, is_ext_refusal

__all__ = ["DEFAULT_LIMITS", "SPLICE_FROM", "WireLimits", "pack", "unpack"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class WireLimits:
    """What :func:`unpack` accepts.

    max_bytes: size of the whole entry (50 MiB: room for a large attachment plus overhead).
    max_depth: nesting of maps and arrays, the top-level map counting as 1 (64: each content
        level costs two (its map and the parts array holding it), so a content tree may be 30
        multiparts deep, which is what the parser keeps).
    max_str_len: octets of one str (10 MiB: a text body given as str).
    max_bin_len: octets of one bin (50 MiB: one attachment may use the whole entry).
    max_array_len: items of one array (100 000: header_list entries, recipients, parts).
    max_map_len: pairs of one map (100 000: header fields).
    """

    max_bytes: int = 50 * MiB
    max_depth: int = 64
    max_str_len: int = 10 * MiB
    max_bin_len: int = 50 * MiB
    max_array_len: int = 100_000
    max_map_len: int = 100_000


DEFAULT_LIMITS = WireLimits()


# bytes values from this size up are not copied through msgpack's buffer (see pack).
SPLICE_FROM = 1 << 20
# How deep pack looks for them (the parser's messages are far shallower).
_SPLICE_DEPTH = 80
_BIN8_OF_16 = b"\xc4\x10"  # msgpack's header of a 16-octet bin


def pack(message: Mapping[str, Any], *, small: bool = False) -> bytes:
    """msgpack bytes of ``message``: str -> msgpack str, bytes -> msgpack bin.

    A large bytes value (a body, the raw message) is packed as a 16-octet stand-in and
    joined into the result afterwards: msgpack would copy it into its buffer, which grows
    by doubling, and copy the buffer again into the bytes it returns, so a large message
    cost up to four times its size while packed; now it costs its size once more.  The
    octets are the same either way.

    ``small``: the caller knows no bytes value in ``message`` reaches :data:`SPLICE_FROM`
    (a parsed message whose raw octets are fewer), so the walk looking for them is skipped:
    on a 2 KB message with verdicts it costs twice what packing does.
    """
    large: dict[bytes, bytes] = {}
    shell = message if small else _stand_ins(message, large, _SPLICE_DEPTH)
    try:
        packed: bytes = msgpack.packb(shell, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError("", f"cannot encode as msgpack: {error}") from error
    return _spliced(packed, large) if large else packed


def _stand_ins(value: Any, large: dict[bytes, bytes], depth: int) -> Any:
    """``value`` with every large bytes in it replaced by a random 16-octet token (noted in
    ``large``); a container is copied only where something in it was replaced.

    Only where a large bytes can be is looked at (a value of a dict, an item of a list of
    dicts or bytes: bodies, parts, the raw message): walking every header costs more than
    packing a small message.
    """
    kind = type(value)
    if kind is bytes:
        if len(value) < SPLICE_FROM:
            return value
        token = os.urandom(16)
        large[token] = value
        return token
    if depth <= 0:
        return value
    if kind is dict:
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            if _may_hold_large(item):
                new = _stand_ins(item, large, depth - 1)
                if new is not item:
                    changed = changed or dict(value)
                    changed[key] = new
        return value if changed is None else changed
    if kind is list and value and type(value[0]) in _HOLDERS:
        replaced = [_stand_ins(item, large, depth - 1) for item in value]
        return replaced if any(a is not b for a, b in zip(replaced, value, strict=True)) else value
    return value


_HOLDERS = (bytes, dict)


def _may_hold_large(value: Any) -> bool:
    kind = type(value)
    if kind is bytes:
        return len(value) >= SPLICE_FROM
    return kind is dict or (kind is list and bool(value) and type(value[0]) in _HOLDERS)


def _spliced(packed: bytes, large: dict[bytes, bytes]) -> bytes:
    """``packed`` with each token's bin replaced by the bin of the value it stands for."""
    found = sorted((packed.find(_BIN8_OF_16 + token), token) for token in large)
    if any(packed.count(_BIN8_OF_16 + token) != 1 for token in large):
        raise WireError("", "cannot encode as msgpack: a stand-in was not unique")  # 2**-128
    pieces: list[bytes] = []
    position = 0
    for start, token in found:
        value = large[token]
        if len(value) >= 1 << 32:
            raise WireError("", f"cannot encode as msgpack: bin of {len(value)} octets")
        pieces += (packed[position:start], b"\xc6" + len(value).to_bytes(4, "big"), value)
        position = start + len(_BIN8_OF_16) + len(token)
    pieces.append(packed[position:])
    return b"".join(pieces)


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise WireError("", f"msgpack ext type {code} is not allowed")


def unpack(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The top-level map encoded in ``data``; raises :class:`WireError` on anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("", f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise WireError("", f"entry of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    if not data:
        raise WireError("", "empty entry")
    value = _unpack_one(bytes(data), limits)
    if not isinstance(value, dict):
        raise WireError("", f"top level must be a msgpack map, got {_kind(value)}")
    _check_nesting(value, limits.max_depth)
    return value


def _unpack_one(data: bytes, limits: WireLimits) -> object:
    """The one value ``data`` holds, decoded within ``limits``.

    ``unpackb`` is the fast path (no Unpacker object per entry).  Whatever it refuses,
    trailing data included, is decoded again by :func:`_unpack_checked`, which alone
    words the errors: both run the same C decoder with the same options.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except Exception:  # any refusal: the checked decoder finds it again and words it
        return _unpack_checked(data, limits)


def _unpack_checked(data: bytes, limits: WireLimits) -> object:
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_refuse_ext,
        max_buffer_size=max(len(data), 1),
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
    )
    unpacker.feed(data)
    try:
        value = unpacker.unpack()
    except WireError:
        raise
    except msgpack.OutOfData as error:
        raise WireError("", "truncated msgpack data") from error
    except msgpack.StackError as error:
        # The C unpacker's own stack (msgpack_fence): a configured depth above it is
        # reported with the same clear WireError.
        raise WireError("", f"nesting deeper than {UNPACKER_STACK} levels") from error
    except UnicodeDecodeError as error:
        raise WireError("", f"msgpack str is not valid UTF-8: {error.reason}") from error
    except (ValueError, TypeError) as error:
        # msgpack reports limit breaches, reserved codes and non-str keys as ValueError.
        raise WireError("", f"invalid msgpack: {_describe(error)}") from error
    if unpacker.tell() != len(data):
        if not isinstance(value, dict):  # e.g. text whose first byte reads as a fixint
            raise WireError("", f"top level must be a msgpack map, got {_kind(value)}")
        raise WireError("", f"{len(data) - unpacker.tell()} bytes of trailing data after the map")
    return value


def _describe(error: Exception) -> str:
    text = str(error)
    if is_ext_refusal(error):
        return "msgpack ext types are not allowed"
    return text or "reserved or unknown type code"


def _kind(value: object) -> str:
    names = {dict: "map", list: "array", str: "str", bytes: "bin", type(None): "nil"}
    return names.get(type(value), type(value).__name__)


def _check_nesting(root: dict[str, Any], max_depth: int) -> None:
    """Depth limit and str-only keys, checked iteratively (no recursion on hostile input)."""
    if not _nesting_fits(root, max_depth):
        _report_nesting(root, max_depth)


def _nesting_fits(root: dict[str, Any], max_depth: int) -> bool:
    """True when every key is a str and no container is deeper than ``max_depth``.

    Walks level by level, so the depth is counted once per level rather than stored with
    every container: the common case costs a few type checks per item.
    """
    level: list[object] = [root]
    depth = 1
    while level:
        if depth > max_depth:
            return False
        below: list[object] = []
        for value in level:
            if type(value) is dict:
                for key, item in value.items():
                    if type(key) is not str:
                        return False
                    if type(item) is dict or type(item) is list:
                        below.append(item)
            else:
                for item in cast("list[object]", value):
                    if type(item) is dict or type(item) is list:
                        below.append(item)
        level = below
        depth += 1
    return True


def _report_nesting(root: dict[str, Any], max_depth: int) -> None:
    """Raise the error of :func:`_check_nesting`, found depth first (the order it reports)."""
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise WireError("", f"nesting deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise WireError("", f"map key must be a str, got {_kind(key)}")
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value if isinstance(item, dict | list))
