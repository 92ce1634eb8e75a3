"""Helpers of the listener tests: the next message a ``Listener`` hands out, within a bound."""

from __future__ import annotations

import asyncio

from workers.listen import ListenedMessage, Listener


async def next_message(listener: Listener, timeout: float = 5.0) -> ListenedMessage:
    """The next message ``listener`` hands out; fails when none came within ``timeout`` s."""
    message = await asyncio.wait_for(listener.next(), timeout)
    assert message is not None
    return message
