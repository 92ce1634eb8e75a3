"""``mailpool run``: the whole pool in one process (ingest + delivery).

With no ``--redis-url`` it starts a private redis-server (see :mod:`workers.embedded`); with
no ``--relay`` it delivers into a maildir in the data directory and says where at start.
Each role runs its own ``serve(config, stop)``; one stop event drains them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from workers import delivery, ingest
from workers.config import DeliveryConfig, IngestConfig, option
from workers.embedded import embedded_redis
from workers.lifecycle import install_stop_signals
from workers.streams.connection import data_dir as default_data_dir

log = structlog.get_logger("mailpool.run")


@dataclass
class RunConfig(IngestConfig, DeliveryConfig):
    """All ingest and delivery options, plus where the pool keeps its local data."""

    data_dir: str = option(str(default_data_dir()), "local data: embedded Redis, default maildir")

    def validate(self) -> None:
        if self.relay is None:
            self.relay = f"maildir:{Path(self.data_dir).resolve() / 'maildir'}"
        super().validate()


@contextlib.asynccontextmanager
async def _redis_for(config: RunConfig) -> AsyncIterator[str]:
    if config.redis_url:
        yield config.redis_url
    else:
        async with embedded_redis(Path(config.data_dir)) as url:
            yield url


async def serve(config: RunConfig, stop: asyncio.Event) -> None:
    async with _redis_for(config) as url:
        config = dataclasses.replace(config, redis_url=url)
        log.info("pool_starting", redis_url=url, smtp=config.listen, relay=config.relay)
        roles = [
            asyncio.create_task(ingest.serve(config, stop), name="ingest"),
            asyncio.create_task(delivery.serve(config, stop), name="delivery"),
        ]
        try:
            done, _ = await asyncio.wait(roles, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a role that failed stops the pool with its error
        finally:
            stop.set()
            await asyncio.gather(*roles, return_exceptions=True)


async def main(config: RunConfig) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await serve(config, stop)
    return 0
