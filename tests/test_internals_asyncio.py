"""What the ingest role uses of asyncio beyond its documented API, checked against the
running Python: workers/ingest/asyncio_fence.py.

The tests fail loudly, naming that file, on a Python the fence was not checked on, or when
putting octets back into a ``StreamReader`` no longer works as the DATA reader needs: in
front of what is buffered, in order, readable by the next ``readuntil``.
"""

from __future__ import annotations

import asyncio
import sys

from workers.ingest.asyncio_fence import CHECKED_PYTHONS, unread

FENCE = "workers/ingest/asyncio_fence.py"


def test_the_python_is_one_the_fence_was_checked_on() -> None:
    implementation, version = sys.implementation.name, sys.version_info[:2]
    assert implementation == "cpython", f"revisit {FENCE} for {implementation}"
    oldest, newest = CHECKED_PYTHONS
    assert oldest <= version <= newest, (
        f"revisit {FENCE} for Python {version}: checked on {oldest} to {newest}"
    )


async def test_unread_octets_are_read_first_and_in_order() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"QUIT\r\n")
    unread(reader, b"RCPT TO:<b@example.com>\r\nNOOP\r\n")  # read past the end of DATA
    lines = [await reader.readuntil(b"\r\n") for _ in range(3)]
    assert lines == [b"RCPT TO:<b@example.com>\r\n", b"NOOP\r\n", b"QUIT\r\n"], FENCE


async def test_unread_octets_are_read_without_new_data_arriving() -> None:
    """The command loop's next read after DATA finds what was given back at once."""
    reader = asyncio.StreamReader()
    unread(reader, b"NOOP\r\n")
    assert await asyncio.wait_for(reader.readline(), 1) == b"NOOP\r\n", FENCE
