"""What the ingest role uses of asyncio beyond its documented API, checked against the
running Python: workers/ingest/asyncio_fence.py.

The tests fail loudly, naming that file, on a Python the fence was not checked on, or when
putting octets back into a ``StreamReader`` no longer works as the DATA reader needs: in
front of what is buffered, in order, readable by the next ``readuntil``; or when a
session's reader pauses its transport at its line limit again, or no longer at all.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from workers.ingest.asyncio_fence import (
    CHECKED_PYTHONS,
    FLOW_LIMIT,
    SessionReader,
    discard_held,
    unread,
)

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


@asynccontextmanager
async def _session_reader() -> AsyncIterator[
    tuple[SessionReader, asyncio.Transport, socket.socket]
]:
    """A SessionReader with aiosmtpd's line limit over a real socket's transport, and the
    socket's other end, where the client writes."""
    loop = asyncio.get_running_loop()
    ours, client = socket.socketpair()
    reader = SessionReader(limit=1001, loop=loop)
    transport, _ = await loop.create_connection(
        lambda: asyncio.StreamReaderProtocol(reader), sock=ours
    )
    try:
        yield reader, transport, client  # type: ignore[misc]
    finally:
        transport.close()
        client.close()


async def _until_buffered(reader: SessionReader, octets: int) -> None:
    async def arrived() -> None:
        while len(reader._buffer) < octets:  # type: ignore[attr-defined]
            await asyncio.sleep(0.001)

    await asyncio.wait_for(arrived(), 5)


async def test_a_message_of_a_few_kilobytes_does_not_pause_the_session() -> None:
    """asyncio paused the transport past twice the line limit (2002 octets): once per 2 KB
    message, two epoll_ctl calls each."""
    async with _session_reader() as (reader, transport, client):
        client.sendall(b"x" * 4096)
        await _until_buffered(reader, 4096)
        assert transport.is_reading(), FENCE
        assert await reader.read(65536) == b"x" * 4096


async def test_a_session_holding_more_than_its_window_is_paused_then_resumed() -> None:
    async with _session_reader() as (reader, transport, client):
        client.sendall(b"x" * (2 * FLOW_LIMIT + 1))
        await _until_buffered(reader, 2 * FLOW_LIMIT + 1)
        assert not transport.is_reading(), FENCE
        await reader.readexactly(FLOW_LIMIT + 1)
        assert transport.is_reading(), FENCE


async def test_a_session_line_is_still_limited_to_the_line_limit() -> None:
    async with _session_reader() as (reader, _, client):
        client.sendall(b"y" * 1500 + b"\r\n")
        await _until_buffered(reader, 1502)
        with pytest.raises(asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n")
        assert reader._limit == 1001, FENCE  # type: ignore[attr-defined]


async def test_discarding_what_a_paused_session_holds_lets_it_read_again() -> None:
    """STARTTLS's (aiosmtpd_fence.FencedSMTP.smtp_STARTTLS): the plaintext goes, and the
    transport reads what comes next (the client's TLS hello)."""
    async with _session_reader() as (reader, transport, client):
        client.sendall(b"x" * (2 * FLOW_LIMIT + 1))
        await _until_buffered(reader, 2 * FLOW_LIMIT + 1)
        assert not transport.is_reading(), FENCE
        discard_held(reader)
        assert transport.is_reading(), FENCE
        client.sendall(b"hello")
        assert await asyncio.wait_for(reader.read(5), 1) == b"hello"
