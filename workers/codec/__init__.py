"""Spec codec: RFC 5322 bytes <-> spec dicts <-> msgpack.  Pure functions, no I/O."""

from workers.codec.build import BuiltMessage, build_message
from workers.codec.errors import BuildError, CodecError, SchemaError, WireError
from workers.codec.parse import DEFAULT_PARSE_LIMITS, ParseLimits, parse_message
from workers.codec.types import SCHEMA_VERSION, Content, ReceiveMessage, SendMessage
from workers.codec.validate import decode_receive, decode_send, validate_receive, validate_send
from workers.codec.wire import DEFAULT_LIMITS, WireLimits, pack, unpack

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PARSE_LIMITS",
    "SCHEMA_VERSION",
    "BuildError",
    "BuiltMessage",
    "CodecError",
    "Content",
    "ParseLimits",
    "ReceiveMessage",
    "SchemaError",
    "SendMessage",
    "WireError",
    "WireLimits",
    "build_message",
    "decode_receive",
    "decode_send",
    "pack",
    "parse_message",
    "unpack",
    "validate_receive",
    "validate_send",
]
