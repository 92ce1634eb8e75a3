"""What the ingest role uses of asyncio beyond its documented API: putting octets back
into a ``StreamReader`` (:func:`unread`), dropping what it holds (:func:`discard_held`),
and a ``StreamReader`` whose flow control is not tied to its line limit and whose
``readuntil`` ends the session at the end of the input (:class:`SessionReader`).

Written against CPython 3.11 and checked on 3.12 and 3.13 (``CHECKED_PYTHONS``);
tests/test_internals_asyncio.py fails, naming this file, on another implementation or
release, or when the function no longer does what it says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, SupportsIndex

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


def discard_held(reader: asyncio.StreamReader) -> None:
    """Drop what ``reader`` holds unread, and let its transport read again if holding it
    had paused the transport (``_maybe_resume_transport`` resumes it, the buffer now empty).

    For STARTTLS: plaintext pipelined behind it is never to be read (RFC 3207 section 4.2),
    and a transport paused by it must read the client's TLS hello (see
    ``FencedSMTP.smtp_STARTTLS``).
    """
    reader._buffer.clear()  # type: ignore[attr-defined]
    reader._maybe_resume_transport()  # type: ignore[attr-defined]


# Octets a session's reader may hold before its transport is paused (asyncio: twice the
# line limit), and resumed once it holds this half: see SessionReader.
FLOW_LIMIT = 8 << 10


class SessionReader(asyncio.StreamReader):
    """asyncio's ``StreamReader`` with lines of at most ``limit`` octets, as ever
    (``readuntil`` raises ``LimitOverrunError`` past it), but a transport paused only when
    more than ``2 * flow_limit`` octets wait, and resumed at ``flow_limit``.

    asyncio uses its one ``_limit`` for both.  aiosmtpd's is the line limit, 1001 octets, so
    every 2 KB message pushed the buffer past 2002: its transport was paused (``epoll_ctl``
    DEL) and resumed (ADD) once per message, two system calls and their event-loop
    bookkeeping (bench/ingest.py, reused sessions).  ``feed_data`` and
    ``_maybe_resume_transport`` are the only two readers of ``_limit`` for flow control in
    CPython 3.11 to 3.13; each runs with the flow limit in its place, synchronously, and
    puts the line limit back.  What a session may hold unread grows from 2 to 16 KiB (plus
    one socket read, as before).
    """

    def __init__(
        self, *, limit: int, flow_limit: int = FLOW_LIMIT, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(limit=limit, loop=loop)
        self._line_limit = limit
        self._flow_limit = max(flow_limit, limit)

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        self._limit = self._flow_limit
        try:
            super().feed_data(data)
        finally:
            self._limit = self._line_limit

    def _maybe_resume_transport(self) -> None:
        self._limit = self._flow_limit
        try:
            super()._maybe_resume_transport()  # type: ignore[misc]
        finally:
            self._limit = self._line_limit

    async def readuntil(self, separator: Any = b"\n") -> bytes:  # typeshed's type is private
        """A line, as ever; at the end of the input (the client half-closed, and every
        command it sent before has been read) ``CancelledError``, on which aiosmtpd's
        command loop closes the connection.  asyncio's ``IncompleteReadError`` would reach
        the loop's handler of unexpected errors, which answers and reads again, forever."""
        try:
            return await super().readuntil(separator)
        except asyncio.IncompleteReadError:
            raise asyncio.CancelledError from None
