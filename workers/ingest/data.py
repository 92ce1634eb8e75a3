"""Reading the DATA section of an SMTP transaction in chunks instead of line by line.

aiosmtpd reads DATA one ``readuntil(b"\\r\\n")`` per line (several microseconds each, the
largest single cost of a transaction after the message parse); here the bytes are read as
they come and searched for the one end-of-data sequence RFC 5321 section 4.1.1.4 defines,
``<CRLF>.<CRLF>``.  Nothing else ends DATA: a bare ``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n``
and the other SMTP smuggling variants stay inside the message.

The limits are aiosmtpd's: more than ``size_limit`` octets (counted as sent, with the CRLFs
and transparency dots) is "too big"; a line longer than 1001 octets with its CRLF and
transparency dot (RFC 5321 section 4.5.3.1.6) is "line too long".  Both are reported after
the end of data, as RFC 5321 section 4.2.5 implies, and memory stays bounded while an
oversized message is drained.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

END_OF_DATA = b"\r\n.\r\n"
LINE_LIMIT = 1001
CHUNK = 1 << 16


class DataRefusal(enum.Enum):
    TOO_BIG = "too_big"
    LINE_TOO_LONG = "line_too_long"


@dataclass(frozen=True)
class ReceivedData:
    content: bytes  # dot-unstuffed, ends with CRLF unless empty; b"" when refused
    size: int  # octets as sent (before unstuffing)
    refusal: DataRefusal | None = None


def unstuff(stuffed: bytes) -> bytes:
    """Remove the transparency dot of every line that starts with one (RFC 5321 4.5.2)."""
    if stuffed.startswith(b"."):
        stuffed = stuffed[1:]
    return stuffed.replace(b"\r\n.", b"\r\n")


def longest_line(stuffed: bytes) -> int:
    """Length of the longest CRLF-terminated line, CRLF included."""
    return max(map(len, stuffed.split(b"\r\n"))) + 2


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back bytes read past the end of data (pipelined commands) to the command loop.

    StreamReader has no public unread; its buffer is a bytearray (CPython 3.8 to 3.13), the
    same internal aiosmtpd itself clears after STARTTLS.
    """
    reader._buffer[:0] = data  # type: ignore[attr-defined]


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> ReceivedData | None:
    """The DATA section up to and without the end-of-data line; None if the peer hung up."""
    # A virtual CRLF in front: the end-of-data line may be the very first (empty message).
    buffer = bytearray(b"\r\n")
    scan_from = 0
    dropped = 0  # octets discarded once the message is known to be too big
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            return None
        buffer += chunk
        end = buffer.find(END_OF_DATA, scan_from)
        if end >= 0:
            break
        # The sequence may straddle two reads: rescan the last four octets next time.
        scan_from = max(0, len(buffer) - 4)
        if size_limit and dropped + len(buffer) - 2 > size_limit + len(END_OF_DATA):
            dropped += scan_from
            del buffer[:scan_from]
            scan_from = 0
    leftover = bytes(buffer[end + len(END_OF_DATA) :])
    if leftover:
        _unread(reader, leftover)
    if dropped:
        return ReceivedData(b"", dropped + end, DataRefusal.TOO_BIG)
    stuffed = bytes(buffer[2 : end + 2])
    if size_limit and len(stuffed) > size_limit:
        return ReceivedData(b"", len(stuffed), DataRefusal.TOO_BIG)
    if stuffed and longest_line(stuffed) > LINE_LIMIT:
        return ReceivedData(b"", len(stuffed), DataRefusal.LINE_TOO_LONG)
    return ReceivedData(unstuff(stuffed), len(stuffed))
