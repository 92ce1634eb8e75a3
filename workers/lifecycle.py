"""The serve/stop life cycle shared by every role's ``main``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

ConfigT = TypeVar("ConfigT")


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM (Kubernetes) and SIGINT (a terminal) both start the graceful stop."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def serve_until_signalled(
    serve: Callable[[ConfigT, asyncio.Event], Awaitable[None]], config: ConfigT
) -> int:
    """A role's ``main``: serve until SIGTERM or SIGINT, then stop gracefully; exit 0."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    await serve(config, stop)
    return 0
