"""BDAT (RFC 3030 CHUNKING): a message sent as chunks of a declared size, without dot-stuffing
and without an end-of-data line to search for.

``BDAT <size> [LAST]`` is followed by exactly ``size`` octets of the message.  Those octets
are always read, also when the command is refused (no transaction, a message already too
big): else they would be taken for commands, and a message could smuggle some in.  A BDAT
whose size cannot be read leaves no way to tell where its octets end, so the session replies
and closes.  The limits are the DATA section's (:mod:`.data`): ``--max-size`` over all
chunks (552 5.3.4), the worker's memory budget (452 4.3.1); a chunk that crosses one is
refused when it has been read, and the transaction ends there (RFC 3030 section 4.2: the
client sends no more chunks after a refusal).  Lines are not limited to 1000 octets here:
without dot-stuffing no line can end the message early, and the parser reads long lines.
"""

from __future__ import annotations

import asyncio
import io
import re
from dataclasses import dataclass

from workers.ingest.data import CHUNK, DataRefusal
from workers.ingest.memory import Reservation

# RFC 3030: "BDAT" SP chunk-size [ SP end-marker ]; chunk-size is 1*DIGIT.  Eighteen digits
# (up to an exabyte) keep int() cheap; any real size fits.
_BDAT_ARGUMENT = re.compile(r"(\d{1,18})(?: +(LAST))?", re.IGNORECASE)

# 521 as Postfix's smtpd answers it: the reply says the connection closes.
REPLY_BDAT_SYNTAX = "521 5.5.4 Syntax: BDAT chunk-size [LAST]; closing connection"
REPLY_DATA_AFTER_BDAT = "503 5.5.1 Error: DATA after BDAT in one transaction"


@dataclass(frozen=True)
class BdatCommand:
    size: int
    last: bool


def parse_bdat(arg: str | None) -> BdatCommand | None:
    match = _BDAT_ARGUMENT.fullmatch((arg or "").strip())
    if match is None:
        return None
    return BdatCommand(int(match.group(1)), match.group(2) is not None)


class ChunkedMessage:
    """The chunks of one transaction's message so far, held once, within the limits."""

    def __init__(self, size_limit: int | None, reservation: Reservation | None) -> None:
        self.size_limit = size_limit
        self.reservation = reservation
        self.out: io.BytesIO | None = io.BytesIO()
        self.size = 0  # octets received, all chunks
        self.refusal: DataRefusal | None = None

    def take(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.out is None:
            return
        if self.size_limit and self.size > self.size_limit:
            self._refuse(DataRefusal.TOO_BIG)
        elif self.reservation is not None and not self.reservation.fill(len(piece)):
            self._refuse(DataRefusal.NO_MEMORY)
        else:
            self.out.write(piece)

    def _refuse(self, refusal: DataRefusal) -> None:
        self.refusal = refusal
        self.out = None  # free what was kept (and what it held of the budget)
        if self.reservation is not None:
            self.reservation.release()

    def content(self) -> bytes:
        assert self.out is not None, "a refused message has no content"
        return self.out.getvalue()


async def read_chunk(reader: asyncio.StreamReader, size: int, into: ChunkedMessage | None) -> bool:
    """Read ``size`` octets into ``into`` (or drop them when None); False if the peer hung up
    first.  Memory stays bounded whatever ``size`` says: octets beyond a limit are dropped
    as they arrive."""
    remaining = size
    while remaining:
        piece = await reader.read(min(remaining, CHUNK))
        if not piece:
            return False
        remaining -= len(piece)
        if into is not None:
            into.take(piece)
    return True
