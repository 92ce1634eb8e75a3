"""What mailpool uses of redis-py and hiredis below their command-level API, checked
against the installed releases: workers/streams/redis_fence.py and
workers/streams/hiredis_fence.py (msgpack's: tests/test_internals_msgpack.py).

Each test fails loudly, naming the file to revisit, when the installed release is outside
the range that file was checked against, no longer has a name it uses, or no longer behaves
as it relies on (against a real redis-server).  No other module of the package makes those
calls: the last test keeps it so.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from packaging.version import Version
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.harness import free_port
from tests.internals_util import check_release
from tests.sentinel_util import SentinelServer
from workers.streams import hiredis_fence, redis_fence

REDIS_FENCE = "workers/streams/redis_fence.py"
HIREDIS_FENCE = "workers/streams/hiredis_fence.py"


# -- redis-py: workers/streams/redis_fence.py ------------------------------------------------


def test_redis_py_has_what_the_fence_calls() -> None:
    installed = check_release("redis", redis_fence.CHECKED_RELEASES, REDIS_FENCE)
    probe = "can_read" if installed >= Version("8.0") else "can_read_destructive"
    used = [probe, "send_packed_command", "read_response", "disconnect", "connect"]
    missing = [name for name in used if not hasattr(AbstractConnection, name)]
    assert missing == [], f"revisit {REDIS_FENCE}: connections have no {missing}"
    assert hasattr(ConnectionPool, "get_connection") and hasattr(ConnectionPool, "release")
    for method, parameter in [("send_packed_command", "check_health"), ("disconnect", "nowait")]:
        signature = inspect.signature(getattr(AbstractConnection, method))
        assert parameter in signature.parameters, f"revisit {REDIS_FENCE}: {method}({parameter})"
    # The command name of a checkout became optional (and deprecated) in 5.3.0.
    wanted = installed < Version("5.3")
    assert redis_fence.needs_command_name(ConnectionPool()) is wanted, f"revisit {REDIS_FENCE}"
    # SlotConnection sets host and port, then lets the private _connect open the socket.
    connect = getattr(Connection, "_connect", None)
    assert inspect.iscoroutinefunction(connect), f"revisit {REDIS_FENCE}: Connection._connect"
    assert {"host", "port"} <= set(inspect.signature(Connection).parameters), REDIS_FENCE
    if installed >= Version("8.2"):  # read_replies reads the hiredis reader itself
        parser = redis_fence._HIREDIS_PARSER
        assert parser is not None, f"revisit {REDIS_FENCE}: no _AsyncHiredisParser"
        assert inspect.iscoroutinefunction(parser.read_from_socket), REDIS_FENCE
        assert inspect.iscoroutinefunction(parser.handle_push_response), REDIS_FENCE
        assert "_reader" in parser.__slots__, f"revisit {REDIS_FENCE}: the parser's _reader"
        assert redis_fence._NOT_ENOUGH_DATA is not False, REDIS_FENCE


async def test_a_packed_batch_with_an_error_reply_reads_every_reply(redis_url: str) -> None:
    """What the settlement relies on: one reply per packed command, an error reply raised
    for that command alone, the next reply still read from the same connection."""
    client = aioredis.Redis.from_url(redis_url)
    commands = [("SET", "k", "v"), ("INCR", "k"), ("GET", "k")]
    packed = b"".join(hiredis_fence.pack_command(c) for c in commands)
    try:
        async with redis_fence.borrowed(client.connection_pool) as connection:
            await redis_fence.send_packed(connection, packed)
            assert await redis_fence.read_reply(connection) == b"OK"  # raw: no callbacks
            with pytest.raises(ResponseError):
                await redis_fence.read_reply(connection)
            assert await redis_fence.read_reply(connection) == b"v"
            assert not await redis_fence.is_stale(connection)
    finally:
        await client.aclose()


async def test_replies_read_together_keep_each_error_in_its_place(redis_url: str) -> None:
    """redis_fence.read_replies, what a settlement batch is read with."""
    client = aioredis.Redis.from_url(redis_url)
    commands = [("SET", "k", "v"), ("INCR", "k"), ("GET", "k")]
    try:
        async with redis_fence.borrowed(client.connection_pool) as connection:
            await redis_fence.send_packed(connection, map(hiredis_fence.pack_command, commands))
            ok, error, value = await redis_fence.read_replies(connection, 3)
            assert not await redis_fence.is_stale(connection)
    finally:
        await client.aclose()
    assert (ok, value) == (b"OK", b"v") and isinstance(error, ResponseError)


async def read_blocking(redis_url: str, waits: list[str]) -> tuple[list[Any], float]:
    """One BLPOP per wait, packed together and read with read_replies against a socket
    timeout of 1 s: (the replies, or [] when the read timed out; seconds it took)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=1.0)
    blocking = [("BLPOP", "nothing-here", wait) for wait in waits]
    replies: list[Any] = []
    try:
        async with redis_fence.borrowed(client.connection_pool) as connection:
            await redis_fence.send_packed(connection, map(hiredis_fence.pack_command, blocking))
            started = time.monotonic()
            # Before redis-py 8.2 each reply has read_response's own timer, which raises
            # redis-py's TimeoutError (a RedisError, as the settler expects either way).
            with contextlib.suppress(TimeoutError, RedisTimeoutError):
                replies = await redis_fence.read_replies(connection, len(blocking))
            return replies, time.monotonic() - started
    finally:
        await client.aclose()


async def test_a_batch_that_keeps_answering_is_not_cut_short(redis_url: str) -> None:
    """Six replies 0.2-0.3 s apart (under half the 1 s socket timeout): 1.2 s or more in all
    (BLPOP's timeouts are checked ten times a second)."""
    replies, waited = await read_blocking(redis_url, ["0.2"] * 6)
    assert replies == [None] * 6 and waited > 1.0, waited


async def test_a_reply_later_than_the_socket_timeout_fails_the_read(redis_url: str) -> None:
    """The second reply 3 s after the first: the read fails 1 s after it started, or at most
    1 s after the first reply came (the timer is pushed back only when less than half of it
    is left), long before the second."""
    replies, waited = await read_blocking(redis_url, ["0.1", "3"])
    assert replies == [] and 0.9 < waited < 1.6, waited


async def test_a_batch_larger_than_one_socket_read_is_read_whole_and_in_order(
    redis_url: str,
) -> None:
    """read_replies takes what the hiredis reader holds, then reads the socket again:
    300 replies of 8 KB (2.4 MB, many socket reads) arrive complete, in order."""
    client = aioredis.Redis.from_url(redis_url)
    values = [bytes([65 + n % 26]) * 8192 + str(n).encode() for n in range(300)]
    try:
        await client.mset({f"big{n}": value for n, value in enumerate(values)})
        async with redis_fence.borrowed(client.connection_pool) as connection:
            gets = [("GET", f"big{n}") for n in range(300)]
            await redis_fence.send_packed(connection, map(hiredis_fence.pack_command, gets))
            assert redis_fence.hiredis_parser(connection) is not None  # the direct path
            replies = await redis_fence.read_replies(connection, len(gets))
            assert not await redis_fence.is_stale(connection)
    finally:
        await client.aclose()
    assert replies == values


async def test_a_connection_killed_mid_batch_fails_the_read_and_is_dropped(
    redis_url: str,
) -> None:
    """The server closes the connection after the first reply: redis-py's ConnectionError,
    as read_response raises it, and the connection is disconnected (not handed out again
    with half a batch in it)."""
    client = aioredis.Redis.from_url(redis_url)
    killer = aioredis.Redis.from_url(redis_url)
    try:
        async with redis_fence.borrowed(client.connection_pool) as connection:
            await redis_fence.send_packed(connection, hiredis_fence.pack_command(["CLIENT", "ID"]))
            (own_id,) = await redis_fence.read_replies(connection, 1)
            batch = [("PING",), ("BLPOP", "nothing-here", "5")]
            await redis_fence.send_packed(connection, map(hiredis_fence.pack_command, batch))
            read = asyncio.create_task(redis_fence.read_replies(connection, len(batch)))
            await asyncio.sleep(0.3)
            await killer.client_kill_filter(_id=own_id)
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(read, 5)
            assert not connection.is_connected
    finally:
        await client.aclose()
        await killer.aclose()


async def test_a_sockets_own_timeout_reads_as_a_lost_connection(redis_url: str) -> None:
    """The socket's ETIMEDOUT (an errno: the peer is gone) is a ConnectionError, as
    read_response reports it; only the read's own time running out is a TimeoutError.
    Before redis-py 8.2 the fence reads each reply with read_response, which there
    reports it as a TimeoutError (the lowest-deps run)."""
    expected = RedisConnectionError if redis_fence._READS_WITHOUT_TIMER else RedisTimeoutError
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with redis_fence.borrowed(client.connection_pool) as connection:
            await redis_fence.send_packed(connection, hiredis_fence.pack_command(["PING"]))
            assert await redis_fence.read_replies(connection, 1) == [b"PONG"]
            # What asyncio's transport sets on its reader for a socket's ETIMEDOUT.
            connection._reader.set_exception(TimeoutError(110, "Connection timed out"))
            with pytest.raises(expected):
                await redis_fence.read_replies(connection, 1)
            assert not connection.is_connected
    finally:
        await client.aclose()


async def _trickling_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A RESP2 peer that answers GET with a 10-octet bulk string, one octet every 0.4 s,
    and anything else (the client's set-up) with OK."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while head := await reader.readline():
            words = []
            for _ in range(int(head[1:])):
                length = int((await reader.readline())[1:])
                words.append((await reader.readexactly(length + 2))[:-2])
            if words[0].upper() != b"GET":
                writer.write(b"+OK\r\n")
                continue
            writer.write(b"$10\r\n")
            for _ in range(10):
                await asyncio.sleep(0.4)
                writer.write(b"x")
                await writer.drain()
            writer.write(b"\r\n")


async def test_a_reply_that_trickles_in_is_cut_at_the_socket_timeout() -> None:
    """The shared timer is pushed back by a reply, not by each octet: a peer sending one
    octet every 0.4 s (under the 1 s socket timeout) cannot hold the read past it."""
    server = await asyncio.start_server(_trickling_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=1.0)
    try:
        async with redis_fence.borrowed(client.connection_pool) as connection:
            await redis_fence.send_packed(connection, hiredis_fence.pack_command(["GET", "k"]))
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await redis_fence.read_replies(connection, 1)
            assert time.monotonic() - started < 2.0  # all of it would take 4 s
    finally:
        await client.aclose()
        server.close()


@pytest.mark.parametrize(
    ("release", "without_timer"),
    [("5.0.1", False), ("8.1.0", False), ("8.2.0", True), ("8.10.1", True), ("9.0.0b1", True)],
)
def test_replies_are_read_without_a_timer_each_from_redis_py_8_2(
    release: str, without_timer: bool
) -> None:
    """Before 8.2 a socket's own timeout came back as a None reply for a caller-given
    timeout (math.inf included): read_replies reads each reply as read_response does."""
    assert redis_fence._reads_without_timer(release) is without_timer


async def test_the_probe_finds_a_connection_the_server_closed(redis_url: str) -> None:
    """What ingest relies on before a write: an idle connection killed by the server is
    stale, and a reconnect makes it usable again."""
    client = aioredis.Redis.from_url(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    pool = client.connection_pool
    try:
        connection = await redis_fence.checkout(pool)
        try:
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            assert await redis_fence.is_stale(connection), f"revisit {REDIS_FENCE}: is_stale"
            await redis_fence.reconnect(connection)
            assert not await redis_fence.is_stale(connection)
            await redis_fence.send_packed(connection, hiredis_fence.pack_command(["PING"]))
            assert await redis_fence.read_reply(connection) == b"PONG"
        finally:
            await redis_fence.release(pool, connection)
    finally:
        await client.aclose()
        await admin.aclose()


@pytest.fixture
def lone_sentinel(tmp_path: Path) -> Iterator[int]:
    """The port of a real Sentinel that knows no master ``absent`` (it watches only one on
    a port where nothing listens)."""
    sentinel = SentinelServer(tmp_path, free_port(), settings=[])
    sentinel.start()
    try:
        yield sentinel.port
    finally:
        sentinel.stop()


async def _no_master_error(sentinels: list[tuple[str, int]]) -> str:
    sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_connect_timeout": 1})
    try:
        with pytest.raises(MasterNotFoundError) as raised:
            await sentinel.discover_master("absent")
    finally:
        await redis_fence.close_sentinel(sentinel)
    return str(raised.value)


async def test_redis_pys_no_master_error_reads_as_one_line(lone_sentinel: int) -> None:
    """The text of the error redis-py raises, with one Sentinel that knows no such master
    and one that is down, reads as that down Sentinel's error without object reprs."""
    down = free_port()
    raw = await _no_master_error([("127.0.0.1", lone_sentinel), ("127.0.0.1", down)])
    said = redis_fence.readable_master_not_found(raw, "absent")
    revisit = f"revisit {REDIS_FENCE} readable_master_not_found: redis-py said {raw!r}"
    assert said.startswith("no Sentinel names a master 'absent' ("), revisit
    assert f"Error 111 connecting to 127.0.0.1:{down}." in said, revisit
    assert "<" not in said and "Redis" not in said and len(said) < 200, revisit
    raw = await _no_master_error([("127.0.0.1", lone_sentinel)])
    said = redis_fence.readable_master_not_found(raw, "absent")
    assert said == (
        "no Sentinel names a master 'absent' (none of them watches it or it is down)"
    ), revisit


def test_no_master_found_reads_as_what_each_sentinel_answered() -> None:
    """redis-py's MasterNotFoundError carries the repr of every client (thousands of
    characters); the one line keeps each Sentinel's error."""
    readable = redis_fence.readable_master_not_found
    raw = (
        "No master found for 'mailpool' : <redis.asyncio.client.Redis(<redis.asyncio."
        "connection.ConnectionPool(<redis.asyncio.connection.Connection(host=s1,port=1)>)>)> - "
        "ConnectionError: Error 111 connecting to s1:1. Connect call failed ('s1', 1)., "
        "<redis.asyncio.client.Redis(<...>)> - TimeoutError: Timeout connecting to s2:2"
    )
    assert readable(raw, "mailpool") == (
        "no Sentinel names a master 'mailpool' (ConnectionError: Error 111 connecting to s1:1. "
        "Connect call failed ('s1', 1).; TimeoutError: Timeout connecting to s2:2)"
    )
    redis_py_5 = (
        "No master found for 'm' : Redis<ConnectionPool<Connection<host=s1,port=1,db=0>>> - "
        "ConnectionError('Error 111 connecting to s1:1. 111.')"
    )
    assert readable(redis_py_5, "m") == (
        "no Sentinel names a master 'm' (ConnectionError('Error 111 connecting to s1:1. 111.'))"
    )
    assert readable("No master found for 'm'", "m") == (
        "no Sentinel names a master 'm' (none of them watches it or it is down)"
    )


# -- hiredis: workers/streams/hiredis_fence.py -----------------------------------------------


def test_hiredis_packs_a_settlement_command() -> None:
    check_release("hiredis", hiredis_fence.CHECKED_RELEASES, HIREDIS_FENCE)
    packed = hiredis_fence.pack_command(("FCALL", b"\x00sha", 6, "Zoë"))
    assert packed == b"*4\r\n$5\r\nFCALL\r\n$4\r\n\x00sha\r\n$1\r\n6\r\n$4\r\nZo\xc3\xab\r\n"


# -- msgpack: workers/codec/wire.py ----------------------------------------------------------

WORKERS = Path(__file__).resolve().parent.parent / "workers"
FENCES = {WORKERS / "streams" / "redis_fence.py", WORKERS / "streams" / "hiredis_fence.py"}
# Connection-level names of redis-py and hiredis (aiosmtplib's protocol has a read_response
# of its own: workers/relay/ is left to its fence's test).
BELOW_THE_COMMAND_API = {
    "send_packed_command", "read_response", "get_connection", "can_read",
    "can_read_destructive", "pack_command", "pack_commands",
}  # fmt: skip


def reaches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = [
        f"{path.relative_to(WORKERS)}:{node.lineno} .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in BELOW_THE_COMMAND_API
    ]
    found += [
        f"{path.relative_to(WORKERS)}:{node.lineno} imports hiredis"
        for node in ast.walk(tree)
        if (isinstance(node, ast.Import) and any(a.name == "hiredis" for a in node.names))
        or (isinstance(node, ast.ImportFrom) and node.module == "hiredis")
    ]
    return found


def test_no_module_outside_the_fences_reaches_below_redis_pys_command_api() -> None:
    outside = [
        reach
        for path in sorted(WORKERS.rglob("*.py"))
        if path not in FENCES and "relay" not in path.relative_to(WORKERS).parts
        for reach in reaches(path)
    ]
    allowed = {
        "connection_pool"
    }  # handed to the fence: ``redis_fence.checkout(r.connection_pool)``
    assert [r for r in outside if r.rpartition(".")[2] not in allowed] == []
