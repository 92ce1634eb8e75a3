"""Fixtures that start real servers: redis-server on a free loopback port."""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from tests.cluster_util import ClusterSet, all_keys, flush_primaries, running_cluster
from tests.harness import RedisServer, running_redis
from tests.ingest_util import IngestProcess, make_certificate
from tests.no_skips import pytest_sessionfinish, pytest_terminal_summary
from tests.sinks import PostfixSink, RecordingSink
from workers.logs import configure_logging
from workers.streams.connection import close_all, connect, partition_clients

# The hooks that make skips fail `make test` and CI (see tests/no_skips.py).
__all__ = ["pytest_sessionfinish", "pytest_terminal_summary"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests get it flushed (see ``redis_url``)."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    """One Redis Cluster (3 primaries, 3 replicas) for the session's tests that do not kill
    its nodes; they get it emptied (see ``partitions``)."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
async def partitions(cluster: ClusterSet) -> AsyncIterator[list[aioredis.Redis]]:
    """A client per partition of the shared cluster (``cluster_util.PARTITIONS``), every
    primary emptied first."""
    flush_primaries(cluster)
    clients = partition_clients(cluster.url(), all_keys(), connect)
    yield clients
    await close_all(clients)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.cli("FLUSHALL")
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """A redis-server of the test's own, for tests that stop, restart or fill it."""
    servers: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(kill=True)


@pytest.fixture
def ingest_workers(tmp_path: Path) -> Iterator[Callable[..., IngestProcess]]:
    """Start ``python -m workers ingest`` processes; all are killed at the end."""
    started: list[IngestProcess] = []

    def start(redis_url: str, *args: str) -> IngestProcess:
        worker = IngestProcess(redis_url, *args, log_path=tmp_path / f"ingest{len(started)}.log")
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (cert.pem, key.pem)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def make_sink() -> Iterator[Callable[..., RecordingSink]]:
    """Recording SMTP relays (aiosmtpd) of the test's own options (``certificate``,
    ``users``, ``implicit_tls``, ``size_limit``), started on free loopback ports; all
    stopped at the end."""
    sinks: list[RecordingSink] = []

    def make(**options: Any) -> RecordingSink:
        sinks.append(RecordingSink(**options).start())
        return sinks[-1]

    yield make
    for server in sinks:
        server.stop()


@pytest.fixture
def sink(make_sink: Callable[..., RecordingSink]) -> RecordingSink:
    """A recording SMTP relay (aiosmtpd) on a free loopback port."""
    return make_sink()


@pytest.fixture
def make_postfix_sink() -> Iterator[Callable[..., PostfixSink]]:
    """Postfix's smtp-sink with the given fault options (``-f RCPT``, ``-Q DATA``, ...) on
    free loopback ports; all closed at the end."""
    sinks: list[PostfixSink] = []

    def make(*options: str) -> PostfixSink:
        sinks.append(PostfixSink(*options).start())
        return sinks[-1]

    yield make
    for server in sinks:
        server.close()


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """JSON log lines of structlog as configured by the CLI, written into a buffer."""
    saved, hook = structlog.get_config(), sys.excepthook
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    configure_logging("json", "debug")
    try:
        yield buffer
    finally:
        structlog.configure(**saved)
        sys.excepthook = hook
