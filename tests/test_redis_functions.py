"""The Redis functions library: loading, versions, and what survives a restart (real
redis-server; the ACL side is in test_deploy_acl.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from tests.harness import RedisServer
from workers import redis_setup
from workers.config import ConfigError
from workers.streams import functions

# The code a library version stands for.  Workers of two releases share a Redis during a
# rollout, each calling its own `mailpool_v<N>`: changing the Lua under the same name would
# hand old workers new code.  Changed the Lua?  Bump LIBRARY_VERSION, then this pin.
PINNED = (2, "24428b91847afbe9")


def test_a_change_to_the_lua_needs_a_new_library_version() -> None:
    assert (functions.LIBRARY_VERSION, functions.DIGEST) == PINNED
    assert functions.LIBRARY_CODE.startswith(f"#!lua name={functions.LIBRARY}\n")


async def test_redis_setup_loads_once_and_names_other_releases(
    redis: aioredis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await redis.function_flush()
    await redis.function_load("#!lua name=mailpool_v0\nredis.register_function('mailpool_v0_x', "
                              "function() return 1 end)")  # fmt: skip
    config = redis_setup.RedisSetupConfig(redis_url=redis_url)
    assert await redis_setup.main(config) == 0
    assert await redis_setup.main(config) == 0
    out, err = capsys.readouterr()
    library, digest = functions.LIBRARY, functions.DIGEST
    assert out.splitlines() == [f"{library} loaded (digest {digest})",
                                f"{library} already loaded (digest {digest})"]  # fmt: skip
    assert "mailpool_v0 is loaded too" in err and "FUNCTION DELETE mailpool_v0" in err
    assert await redis.fcall(functions.VERSION, 0) == digest.encode()
    await redis.function_delete("mailpool_v0")


async def test_another_builds_library_under_the_same_name_is_replaced_where_allowed(
    redis: aioredis.Redis,
) -> None:
    stale = functions.LIBRARY_CODE.replace(functions.DIGEST, "0000000000000000")
    await redis.function_load(stale, replace=True)
    assert await functions.loaded_digest(redis) == "0000000000000000"
    assert await functions.ensure_library(redis) is True  # this user may: it loads its own
    assert await functions.loaded_digest(redis) == functions.DIGEST
    assert await functions.ensure_library(redis) is False


async def test_the_library_survives_a_restart_without_being_loaded_again(
    make_redis: Callable[..., RedisServer],
) -> None:
    """Unlike the script cache, functions are in the AOF: a role that may not load them
    finds them after Redis restarted."""
    server = make_redis(appendonly=True)
    client = aioredis.Redis.from_url(server.url)
    try:
        await functions.load_library(client)
    finally:
        await client.aclose()
    server.stop()
    server.start()
    admin = aioredis.Redis.from_url(server.url)
    caller = aioredis.Redis.from_url(server.url, username="caller", password="pw")
    try:
        await admin.execute_command("ACL", "SETUSER", "caller", "on", ">pw", "+fcall")
        await functions.require_library(caller)  # no FUNCTION LOAD right: found, not loaded
    finally:
        await caller.aclose()
        await admin.aclose()


async def test_a_user_that_may_not_fcall_stops_at_start_with_one_line(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """An ACL file from before the functions (no +fcall): exit 2 and what to change."""
    await redis.execute_command("ACL", "SETUSER", "old-role", "on", ">pw", "+ping")
    old_role = aioredis.Redis.from_url(redis_url, username="old-role", password="pw")
    try:
        with pytest.raises(ConfigError, match=r"may not call mailpool's functions .*\+fcall"):
            await functions.require_library(old_role)
    finally:
        await old_role.aclose()
        await redis.execute_command("ACL", "DELUSER", "old-role")
