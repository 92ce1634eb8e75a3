"""``/metrics``, ``/healthz`` and ``/readyz`` for every worker, served by its event loop.

The server runs on the worker's own asyncio loop on purpose: a ``/healthz`` answer proves
the loop still turns (a thread-based exporter would keep answering while the loop is
stuck).  It speaks just enough HTTP/1.0 for probes and Prometheus: three GET paths, one
request per connection; anything else gets 404/405.  ``/healthz`` never looks at Redis, so
a Redis blink does not get pods restarted; ``/readyz`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from http import HTTPStatus

import redis.asyncio as aioredis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workers.config import parse_host_port
from workers.metrics import record_stream_status
from workers.streams.layout import StreamKeys
from workers.streams.snapshot import collect_partitions

log = structlog.get_logger("mailpool.health")

REQUEST_TIMEOUT = 5.0
READY_TIMEOUT = 2.0
MAX_REQUEST_HEAD = 8192
GAUGE_REFRESH = 15.0
# After a refresh that failed (Redis away, or slow to answer at start): the gauges are
# missing or stale, so the next try comes sooner.
GAUGE_RETRY = 1.0

ReadyCheck = Callable[[], Awaitable[bool]]


def redis_ready(clients: Sequence[aioredis.Redis], listening: Callable[[], bool]) -> ReadyCheck:
    """Ready = the role's listener is up and Redis answers PING: any of ``clients`` (one per
    partition): while one shard fails over, the others still take the mail."""

    async def check() -> bool:
        if not listening():
            return False
        pings = [asyncio.ensure_future(_answers(client)) for client in clients]
        try:
            for answered in asyncio.as_completed(pings):
                if await answered:
                    return True
            return False
        finally:
            for ping in pings:
                ping.cancel()

    return check


async def _answers(redis: aioredis.Redis) -> bool:
    try:
        return bool(await redis.ping())
    except (aioredis.RedisError, OSError):
        return False


class HealthServer:
    def __init__(self, address: str, ready: ReadyCheck) -> None:
        self.host, self.port = parse_host_port(address, "--http")
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])  # resolves port 0 for tests
        log.info("http_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, path = _request_line(head)
            status, content_type, body = await self._respond(method, path)
            writer.write(
                f"HTTP/1.0 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a probe that hung up or sent garbage gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[HTTPStatus, str, bytes]:
        if method != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"GET only\n"
        if path == "/healthz":
            return HTTPStatus.OK, "text/plain", b"ok\n"
        if path == "/readyz":
            try:
                ready = await asyncio.wait_for(self.ready(), READY_TIMEOUT)
            except TimeoutError:
                ready = False
            if ready:
                return HTTPStatus.OK, "text/plain", b"ready\n"
            return HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"not ready\n"
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest()
        return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"


def _request_line(head: bytes) -> tuple[str, str]:
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = first.split()
    if len(parts) < 2:
        return "", ""
    return parts[0], parts[1].split("?", 1)[0]


async def refresh_stream_gauges(
    redis: aioredis.Redis,
    keys: StreamKeys,
    stop: asyncio.Event,
    *,
    partitions: Sequence[tuple[aioredis.Redis, StreamKeys]] = (),
) -> None:
    """Keep the stream gauges (lag, pending, dead letters) fresh for /metrics.

    They cover every partition in ``partitions`` (``redis`` and ``keys`` alone when empty):
    each partition's streams under their own names, ``stream="email.send{3}"``, which
    Prometheus sums (``sum without (stream) (mailpool_stream_length{stream=~"email.send{.*"})``);
    dead letters and retries waiting summed.  Not partitioned: the contract's names.
    """
    sources = list(partitions) or [(redis, keys)]
    clients, partition_keys = [c for c, _ in sources], [k for _, k in sources]
    while not stop.is_set():
        wait = GAUGE_REFRESH
        try:
            # No counting of a lag Redis cannot tell: XRANGE returns whole messages (up to
            # --max-size each), too much to read every refresh; the series is absent then.
            snapshot = await collect_partitions(clients, partition_keys, lag_limit=0)
            record_stream_status(snapshot)
        except (aioredis.RedisError, OSError) as exc:
            # One partition away (a failover) keeps every gauge at its last value until
            # the next refresh reads them all.
            log.debug("gauge_refresh_failed", error=str(exc))
            wait = GAUGE_RETRY
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)


@contextlib.asynccontextmanager
async def serving_health(
    address: str | None,
    redis: aioredis.Redis,
    keys: StreamKeys,
    listening: Callable[[], bool],
    *,
    stream_gauges: bool = False,
    partitions: Sequence[tuple[aioredis.Redis, StreamKeys]] = (),
) -> AsyncIterator[HealthServer | None]:
    """Run the HTTP endpoints for the life of a role (no-op without --http).

    ``stream_gauges`` also refreshes the stream gauges; only roles whose Redis user may read
    every stream turn it on (housekeeping, ``mailpool run``), so with least-privilege ACLs
    one pod exports them and the others do not log NOPERM every refresh.  The gauges read
    every partition's client and keys in ``partitions`` (``redis`` and ``keys`` alone when
    empty, as when not partitioned); /readyz pings them too, and any that answers will do.
    """
    if not address:
        yield None
        return
    clients = [client for client, _ in partitions] or [redis]
    server = HealthServer(address, redis_ready(clients, listening))
    await server.start()
    stop = asyncio.Event()
    refresher = (
        asyncio.create_task(refresh_stream_gauges(redis, keys, stop, partitions=partitions))
        if stream_gauges
        else None
    )
    try:
        yield server
    finally:
        stop.set()
        if refresher is not None:
            await refresher
        await server.close()
