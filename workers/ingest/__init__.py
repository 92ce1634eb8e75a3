"""``mailpool ingest``: an SMTP server that turns each received message into an
``email.receive`` entry (``250`` only after Redis acknowledged it).

Modules: :mod:`.server` (listeners, sessions, limits, shutdown), :mod:`.handler` (envelope
checks, Received field, parse + XADD), :mod:`.auth` (AUTH PLAIN/LOGIN credentials).  The
life cycle is the one every role follows: ``serve(config, stop)`` runs until ``stop`` is
set, then drains; ``main(config)`` wires SIGTERM/SIGINT to ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import cast

import dns.resolver
import structlog

from workers.config import (
    NO_SYSTEM_RESOLVER,
    ConfigError,
    IngestConfig,
    describe,
)
from workers.health import serving_health
from workers.ingest.auth import Authenticator, load_credentials
from workers.ingest.handler import HandlerSettings, IngestHandler, KeepRaw, normalise_domain
from workers.ingest.memory import tune_allocator
from workers.ingest.server import IngestServer, SessionLimits, load_tls_context
from workers.lifecycle import serve_until_signalled
from workers.streams.connection import (
    close_all,
    connect,
    connect_for_writes,
    partition_clients,
    resolve_redis_url,
)
from workers.streams.receive import ReceiveStream, Store
from workers.verify.resolver import Resolver
from workers.verify.verifier import Verifier

__all__ = ["IngestConfig", "IngestServer", "main", "running_ingest", "serve"]

log = structlog.get_logger("mailpool.ingest")


def build_server(config: IngestConfig, store: Store) -> IngestServer:
    """The listeners and handler for ``config``; raises ConfigError on bad TLS/AUTH files."""
    tls = None
    if config.tls_cert and config.tls_key:
        tls = load_tls_context(config.tls_cert, config.tls_key)
    credentials = load_credentials(config.auth_file, config.auth_users)
    settings = HandlerSettings(
        hostname=config.hostname,
        max_recipients=config.max_recipients,
        accept_domains=frozenset(normalise_domain(d) for d in config.accept_domain),
        keep_raw=cast(KeepRaw, config.keep_raw),
        auth_enabled=bool(credentials),
    )
    limits = SessionLimits(
        hostname=config.hostname,
        max_size=config.max_size,
        command_timeout=config.command_timeout,
        connection_timeout=config.connection_timeout,
        require_tls=config.require_tls,
        auth_required=config.auth_required,
    )
    return IngestServer(
        IngestHandler(settings, store, build_verifier(config)),
        limits,
        listen=config.listen,
        tls_listen=config.tls_listen,
        tls_context=tls,
        authenticator=Authenticator(credentials) if credentials else None,
        max_connections=config.max_connections,
        max_connections_per_client=config.max_connections_per_ip,
        memory_budget=config.memory_budget,
        held_elsewhere=lambda: store.given_up_octets,
    )


DNS_TIMEOUT = 5.0  # seconds dnspython waits for an answer at most


def build_verifier(config: IngestConfig) -> Verifier | None:
    """The checks of received mail, None with --no-verify; ConfigError without a resolver."""
    if not config.verify:
        return None
    server = config.dns_address
    try:
        # A question may outlive one message's budget: its answer is kept for the next.
        resolver = Resolver(server, timeout=max(DNS_TIMEOUT, config.verify_budget))
    except dns.resolver.NoResolverConfiguration:  # gone since validate() looked
        raise ConfigError(NO_SYSTEM_RESOLVER) from None
    return Verifier(resolver, config.our_authserv_id, config.verify_budget)


@contextlib.asynccontextmanager
async def running_ingest(config: IngestConfig) -> AsyncIterator[IngestServer]:
    """Listening ingest for the body of the ``with``; stops gracefully on exit.

    The server's ``port``/``tls_port`` are the bound ports (``--listen 127.0.0.1:0`` in tests).
    """
    url = resolve_redis_url(config.redis_url)
    partitions = config.partition_keys()
    # The XADDs go over clients that never retry (a retried batch is stored twice);
    # the health probes over one that may.
    writes = partition_clients(url, partitions, connect_for_writes)
    health = partition_clients(url, partitions, connect, retries=1)
    # One stream, a batch per partition in turn (a partition failing is passed over).
    store = ReceiveStream(
        writes[0],
        partitions[0].receive,
        min_replicas=config.min_replicas,
        replica_timeout=config.replica_timeout,
        store_timeout=config.store_timeout,
        more_partitions=[(c, k.receive) for c, k in zip(writes[1:], partitions[1:], strict=True)],
    )
    try:
        server = build_server(config, store)
        await server.start()
        # Move everything allocated at start-up out of the collector's reach: full
        # collections then scan only per-message garbage, which keeps GC pauses short.
        gc.freeze()
        try:
            async with serving_health(
                config.http, health[0], partitions[0], server.is_listening,
                partitions=list(zip(health, partitions, strict=True)),
            ):  # fmt: skip
                yield server
        finally:
            await server.stop(config.shutdown_grace)
    finally:
        await close_all(health)
        await close_all(writes)


async def serve(config: IngestConfig, stop: asyncio.Event) -> None:
    # Before any thread starts (the parse threads): large buffers mapped on their own and
    # two heaps, so memory goes back to the system after a burst (see .memory).
    tune_allocator()
    log.info("ingest_starting", **describe(config))
    async with running_ingest(config):
        await stop.wait()


async def main(config: IngestConfig) -> int:
    return await serve_until_signalled(serve, config)
