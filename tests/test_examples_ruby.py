"""``schema/examples/produce.rb`` (gems ``redis`` + ``msgpack``) against real parts: its send,
with a UTF-8 subject and an attachment holding every octet value, is delivered intact by the
Python delivery worker to an aiosmtpd sink.  Skipped when ruby or the gems are missing
(Debian: ``apt-get install ruby ruby-redis ruby-msgpack``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.examples_util import (
    ATTACHMENT,
    EXAMPLES_DIR,
    SUBJECT,
    assert_bodies_are_bin,
    assert_delivered_intact,
    deliver_all,
    produced_entry,
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


async def run_ruby(tmp_path: Path, **env: str) -> str:
    assert RUBY is not None
    # LANG=C: environment strings arrive as US-ASCII; the script must still send UTF-8 text
    result = await run_script(RUBY, EXAMPLES_DIR / "produce.rb", cwd=tmp_path, LANG="C", **env)
    assert result.returncode == 0, result.stderr[-2000:]
    [entry_id] = result.stdout.split()
    return entry_id


async def test_ruby_producer_send_is_delivered_intact(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    attachment = tmp_path / "Übersicht März.bin"
    attachment.write_bytes(ATTACHMENT)
    recipients = ["ann@example.com", "bob@example.com"]
    entry_id = await run_ruby(
        tmp_path, REDIS_URL=redis_url, MAIL_TO=", ".join(recipients), SUBJECT=SUBJECT,
        ATTACH_FILE=str(attachment),
    )  # fmt: skip
    message = await produced_entry(redis, entry_id)
    assert message["headers"]["subject"] == SUBJECT
    assert_bodies_are_bin(message)
    assert message["to"] == recipients
    await deliver_all(redis, redis_url, sink)
    await assert_delivered_intact(redis, sink, entry_id, recipients, "Übersicht März.bin")


async def test_ruby_producer_defaults_make_a_valid_send(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    entry_id = await run_ruby(tmp_path, REDIS_URL=redis_url)
    message = await produced_entry(redis, entry_id)
    assert message["to"] == ["ann@example.org"]
    assert message["headers"]["subject"] == "Grüße aus Köln ✉"
    attachment = message["content"]["parts"][1]
    assert (attachment["filename"], attachment["body"]) == ("sample.bin", ATTACHMENT)
