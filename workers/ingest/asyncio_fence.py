"""What the ingest role uses of asyncio beyond its documented API: one function.

Written against CPython 3.11 and checked on 3.12 and 3.13 (``CHECKED_PYTHONS``);
tests/test_internals_asyncio.py fails, naming this file, on another implementation or
release, or when the function no longer does what it says.
"""

from __future__ import annotations

import asyncio

CHECKED_PYTHONS = ((3, 11), (3, 13))  # CPython, both ends included


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back in front of what ``reader`` holds, to be read again.

    ``StreamReader`` has no public unread (nor a peek); its buffer is a ``bytearray`` in
    CPython 3.8 to 3.13, the one aiosmtpd 1.4.6 itself clears after STARTTLS.

    What it buys: the DATA reader (data.py) reads whatever arrived, up to 64 KiB at a time,
    finds the end of data in it, and gives back what followed (pipelined commands).  A
    reader on the public API that never reads past the end of data (``readexactly`` while
    what was read ends in the beginning of one, ``readuntil`` otherwise) took 1.1 to 1.7x
    the time on ordinary messages (2 KB to 1 MB) and 72x on hostile ones: 1 MB of
    ``ab<CR>x<LF>.<CRLF>`` held the event loop for 1.28 s instead of 18 ms.
    """
    reader._buffer[:0] = data  # type: ignore[attr-defined]
