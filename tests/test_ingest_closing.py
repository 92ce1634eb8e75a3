"""A reply that closes the session is its last: nothing the client pipelined behind it is
read, and a client that does not read it is cut off soon after.

Both found by an adversarial review.  After ``521 ... closing connection`` the command loop
read on while the transport closed, and a whole message pipelined behind the refused line
was stored (4 and 5 of 5 tries): a client retrying after the 521 would have it twice.  And
a session closed while its client read none of its replies (they filled our write buffer)
waited for them to be read for ever, holding its slot and its share of the memory budget.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis.asyncio as aioredis

from tests.harness import wait_until
from tests.ingest_util import SMTPConn, entries, ingest, message
from workers.ingest.server import CLOSE_LINGER

TRIES = 3  # the old loop stored the message in most tries, not in every one


@pytest.mark.parametrize(
    ("refused_line", "code"),
    [(b"BDAT x", 521), (b"GET / HTTP/1.1", 521)],
    ids=["bdat-size-unreadable", "http"],
)
async def test_nothing_pipelined_behind_a_closing_reply_is_read(
    redis_url: str, redis: aioredis.Redis, refused_line: bytes, code: int
) -> None:
    body = message("behind the closing reply")
    pipelined = b"BDAT %d LAST\r\n%b" % (len(body), body)
    async with ingest(redis_url) as server:
        for _ in range(TRIES):
            conn = await SMTPConn.open_session(server.port)
            await conn.send(
                b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
                + refused_line + b"\r\n" + pipelined
            )  # fmt: skip
            assert [(await conn.reply())[0] for _ in range(3)] == [250, 250, code]
            assert await conn.reader.read() == b""  # closed, and nothing more said
            await conn.close()
        await asyncio.sleep(0.2)  # a store under way would have landed by now
    assert await entries(redis) == []


def _park_and_stop_reading(port: int) -> socket.socket:
    """A client with a small receive buffer that parks a chunk and then pipelines BDATs
    without ever reading a reply, until the server stops taking them."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
        b"BDAT 50000\r\n" + b"p" * 50000
    )
    client.setblocking(False)
    flood, deadline = b"BDAT 0\r\n" * 4096, time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.send(flood)
        except BlockingIOError:
            time.sleep(0.2)
            try:
                client.send(flood)
            except BlockingIOError:
                break  # both buffers full: it reads nothing
    return client


async def test_a_client_that_reads_no_replies_is_cut_off_and_its_budget_freed(
    redis_url: str,
) -> None:
    async with ingest(redis_url, command_timeout=1.0, connection_timeout=3.0) as server:
        client = await asyncio.to_thread(_park_and_stop_reading, server.port)
        try:
            assert len(server.registry.sessions) == 1 and server.budget.used >= 50000
            # The command timeout closes it, and CLOSE_LINGER later it is cut off.
            limit = 1.0 + CLOSE_LINGER + 5.0
            await wait_until(lambda: not server.registry.sessions, timeout=limit)
            assert server.budget.used == 0
        finally:
            client.close()
