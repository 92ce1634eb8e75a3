"""``mailpool run``: the whole pool in one process (ingest + delivery + housekeeping).

With no ``--redis-url`` it starts a private redis-server (see :mod:`workers.embedded`); with
no ``--relay`` it delivers into a maildir in the data directory and says where at start.
Each role runs its own ``serve(config, stop)``; one stop event drains them all.  The pool
serves one ``--http`` endpoint for all three (with the stream gauges), so the roles are
started with theirs turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from workers import delivery, housekeeping, ingest
from workers.config import ConfigError, DeliveryConfig, IngestConfig, mask_url_password, option
from workers.embedded import embedded_redis
from workers.health import serving_health
from workers.housekeeping import HousekeepConfig
from workers.lifecycle import serve_until_signalled
from workers.streams.connection import close_all, connect, partition_clients
from workers.streams.connection import data_dir as default_data_dir

log = structlog.get_logger("mailpool.run")


@dataclass
class RunConfig(IngestConfig, DeliveryConfig, HousekeepConfig):
    """All ingest, delivery and housekeeping options, plus where the pool keeps local data."""

    data_dir: str = option(str(default_data_dir()), "local data: embedded Redis, default maildir")

    def validate(self) -> None:
        if self.relay is None:
            self.relay = f"maildir:{self._own_data_dir() / 'maildir'}"
        super().validate()

    def _own_data_dir(self) -> Path:
        """The data directory, made if missing: it is the pool's own (a fresh clone has no
        ``.mailpool`` yet), unlike the parent of a ``--relay maildir:PATH``."""
        path = Path(self.data_dir).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--data-dir {path}: {exc.strerror or exc}") from None
        return path


@contextlib.asynccontextmanager
async def _redis_for(config: RunConfig) -> AsyncIterator[str]:
    if config.redis_url:
        yield config.redis_url
    else:
        async with embedded_redis(Path(config.data_dir)) as url:
            yield url


async def serve(config: RunConfig, stop: asyncio.Event) -> None:
    async with _redis_for(config) as url:
        role_config = dataclasses.replace(config, redis_url=url, http=None)
        log.info("pool_starting", redis_url=mask_url_password(url), smtp=config.listen,
                 relay=mask_url_password(config.relay or ""))  # fmt: skip
        if config.relay and config.relay.startswith("maildir:"):
            log.info("delivering_to_maildir", path=config.relay.partition(":")[2])
        roles = [
            asyncio.create_task(ingest.serve(role_config, stop), name="ingest"),
            asyncio.create_task(delivery.serve(role_config, stop), name="delivery"),
            asyncio.create_task(housekeeping.serve(role_config, stop), name="housekeeping"),
        ]
        partitions = config.partition_keys()
        clients = partition_clients(url, partitions, connect)
        try:
            async with serving_health(
                config.http, clients[0], partitions[0], lambda: not stop.is_set(),
                stream_gauges=True, partitions=list(zip(clients, partitions, strict=True)),
            ):  # fmt: skip
                done, _ = await asyncio.wait(roles, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a role that failed stops the pool with its error
        finally:
            stop.set()
            await asyncio.gather(*roles, return_exceptions=True)
            await close_all(clients)


async def main(config: RunConfig) -> int:
    return await serve_until_signalled(serve, config)
