"""The serve/stop life cycle shared by every role's ``main``."""

from __future__ import annotations

import asyncio
import signal


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM (Kubernetes) and SIGINT (a terminal) both start the graceful stop."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
