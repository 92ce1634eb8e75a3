"""Codec exceptions: every failure names where in the message it happened and why."""

from __future__ import annotations

__all__ = ["BuildError", "CodecError", "SchemaError", "WireError"]


class CodecError(ValueError):
    """A message that cannot be decoded, validated or built.

    ``path`` locates the offending item ("content.parts[1].body", "headers.subject"; "" for
    the message as a whole) and ``reason`` says what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)

    def __reduce__(self) -> tuple[type[CodecError], tuple[str, str]]:
        # Keeps pickling (multiprocessing, pytest-xdist) working with the two-argument init.
        return (type(self), (self.path, self.reason))


class WireError(CodecError):
    """msgpack-level problem: not msgpack, truncated, over a limit, ext type, non-str key."""


class SchemaError(CodecError):
    """Valid msgpack whose content breaks the message schema."""


class BuildError(CodecError):
    """A send message that cannot be turned into RFC 5322 bytes safely."""
