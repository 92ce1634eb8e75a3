"""The redis-py calls whose form differs between the releases mailpool supports.

pyproject allows redis-py from 5.0.1 (the first with ``Redis.aclose``) to 8.x.  Everything
else mailpool calls is the same in all of them; the settlement connection that
:mod:`workers.streams.outcomes` holds outside the pool needs two calls that are not:

* ``ConnectionPool.get_connection`` requires a command name (which it ignores) before
  redis-py 5.3; from 5.3 the name is optional and passing one warns (DeprecationWarning).
* The liveness probe of an idle connection is ``can_read`` from 8.0, which deprecates the
  ``can_read_destructive`` of earlier releases (8.x runs the same code for both).

Only this module makes those calls, so a release that changes them again is fixed here;
``tests/test_library_internals.py`` names the range this was checked on.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

# What redis-py 5.0-5.2 want as the (unused) command name of a checkout.
_CHECKOUT_COMMAND = "EVALSHA"


def needs_command_name(pool: ConnectionPool) -> bool:
    """True where the pool's ``get_connection`` still requires a command name (< 5.3)."""
    parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


async def checkout(pool: ConnectionPool) -> AbstractConnection:
    """A connected connection of ``pool``'s, the caller's until ``pool.release``."""
    # redis-py's deprecation decorator leaves get_connection untyped.
    get_connection: Callable[..., Awaitable[AbstractConnection]] = pool.get_connection
    if needs_command_name(pool):
        return await get_connection(_CHECKOUT_COMMAND)
    return await get_connection()


async def is_stale(connection: AbstractConnection) -> bool:
    """True when a connection that sat idle is at EOF or holds unread data, so the next
    command would fail or read someone else's reply.  The probe may consume that data; a
    stale connection is disconnected anyway."""
    has_can_read = hasattr(connection, "can_read")  # redis-py >= 8.0
    probe = connection.can_read if has_can_read else connection.can_read_destructive
    try:
        return bool(await probe())
    except RedisConnectionError:  # closed by the server, or never connected
        return True
