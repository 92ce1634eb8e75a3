"""``schema/examples/produce.rb`` (gems ``redis`` + ``msgpack``) against real parts: its send,
with a UTF-8 subject and an attachment holding every octet value, is delivered intact by the
Python delivery worker to an aiosmtpd sink.  Skipped when ruby or the gems are missing
(Debian: ``apt-get install ruby ruby-redis ruby-msgpack``)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Awaitable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.examples_util import (
    EXAMPLES_DIR,
    ScriptRun,
    producer_defaults_reach_the_pool_of_make_run,
    producer_send_is_delivered_intact,
    run_script,
)
from tests.sinks import RecordingSink

RUBY = shutil.which("ruby")


def _gems_missing() -> str | None:
    if RUBY is None:
        return "ruby is not installed (Debian: apt-get install ruby ruby-redis ruby-msgpack)"
    probe = subprocess.run(
        [RUBY, "-e", 'require "redis"; require "msgpack"'],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return "the ruby gems redis and msgpack are not installed (Debian: ruby-redis ruby-msgpack)"
    return None


SKIP_REASON = _gems_missing()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


def ruby(cwd: Path, **env: str) -> Awaitable[ScriptRun]:
    """produce.rb under LANG=C: environment strings arrive as US-ASCII, the script must still
    send UTF-8 text."""
    assert RUBY is not None
    return run_script(RUBY, EXAMPLES_DIR / "produce.rb", cwd=cwd, **{"LANG": "C", **env})


async def test_ruby_producer_send_is_delivered_intact(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    await producer_send_is_delivered_intact(ruby, redis, redis_url, sink, tmp_path)


async def test_ruby_producer_defaults_reach_the_pool_of_make_run(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    await producer_defaults_reach_the_pool_of_make_run(ruby, redis, redis_url, tmp_path)
