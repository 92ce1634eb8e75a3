"""The Node.js examples in ``schema/examples/`` against real parts, and the redis-cli example.

* ``produce.mjs`` (npm ``redis`` + ``@msgpack/msgpack``) enqueues a send with a UTF-8 subject,
  text + HTML and an attachment holding every octet value into a real redis-server; the
  Python delivery worker delivers it to an aiosmtpd sink, and the message that arrived must
  have the subject and the attachment's octets intact.
* ``listen.mjs`` reads what the real ingest server made of a message sent with smtplib, in a
  consumer group, and prints JSON in the format of ``mailpool listen``.
* ``send.msgpack`` is what its documented Python line writes, and the documented
  ``redis-cli -x XADD`` puts it into ``email.send`` unchanged and deliverable.

The scripts are the example files themselves, copied byte for byte next to a link to
``tests/node/node_modules`` (Node resolves packages from the script's own directory);
``npm ci`` installs the pinned packages there when they are missing.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.examples_util import (
    ATTACHMENT,
    EXAMPLES_DIR,
    NO_REDIS_CHOSEN,
    SUBJECT,
    Run,
    ScriptRun,
    deliver_all,
    directory_below_a_pool,
    entry_id_printed,
    expected_json,
    ingest_one_message,
    listener_takes_its_own_pending_first_and_skips_garbage,
    pending,
    produced_entry,
    producer_defaults_reach_the_pool_of_make_run,
    producer_send_is_delivered_intact,
    run_script,
)
from tests.harness import free_port
from tests.node_util import NODE, NODE_DIR, NPM, install_node_packages
from tests.sinks import RecordingSink
from workers.codec.validate import decode_send

REDIS_CLI = shutil.which("redis-cli")

needs_node = pytest.mark.skipif(
    NODE is None or NPM is None, reason="node and npm are needed to run the Node.js examples"
)


@pytest.fixture(scope="module")
def node_scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding copies of the example scripts and a link to the node packages."""
    install_node_packages()
    directory = tmp_path_factory.mktemp("node-examples")
    for name in ("produce.mjs", "listen.mjs", "pool-url.mjs"):
        shutil.copyfile(EXAMPLES_DIR / name, directory / name)
    (directory / "node_modules").symlink_to(NODE_DIR / "node_modules", target_is_directory=True)
    return directory


def node(scripts: Path, name: str) -> Run:
    def run(cwd: Path, **env: str) -> Awaitable[ScriptRun]:
        assert NODE is not None
        return run_script(NODE, scripts / name, cwd=cwd, **env)

    return run


async def run_node(scripts: Path, name: str, **env: str) -> list[Any]:
    """Run one example; returns its stdout lines (JSON-decoded for the listener)."""
    result = await node(scripts, name)(scripts, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    return [json.loads(line) for line in lines] if name == "listen.mjs" else lines


# --- produce.mjs ---------------------------------------------------------------------------


@needs_node
async def test_node_producer_send_is_delivered_intact(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, node_scripts: Path, tmp_path: Path
) -> None:
    produce = node(node_scripts, "produce.mjs")
    await producer_send_is_delivered_intact(produce, redis, redis_url, sink, tmp_path)


@needs_node
async def test_node_producer_defaults_reach_the_pool_of_make_run(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path, tmp_path: Path
) -> None:
    produce = node(node_scripts, "produce.mjs")
    await producer_defaults_reach_the_pool_of_make_run(produce, redis, redis_url, tmp_path)


@needs_node
async def test_node_listener_finds_the_pool_of_make_run(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path, tmp_path: Path
) -> None:
    """listen.mjs shares pool-url.mjs with produce.mjs: no REDIS_URL, the recorded pool."""
    await ingest_one_message(redis_url)
    cwd = directory_below_a_pool(tmp_path, redis_url)
    listen = node(node_scripts, "listen.mjs")
    listened = await listen(cwd, START="0", COUNT="1", **NO_REDIS_CHOSEN)
    assert listened.returncode == 0, listened.stderr[-2000:]
    assert json.loads(listened.stdout)["headers"]["subject"] == SUBJECT


@needs_node
async def test_node_producer_redis_url_wins_over_the_recorded_pool(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path, tmp_path: Path
) -> None:
    cwd = directory_below_a_pool(tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # stale
    produced = await node(node_scripts, "produce.mjs")(cwd, REDIS_URL=redis_url)
    await produced_entry(redis, entry_id_printed(produced))


# --- listen.mjs ----------------------------------------------------------------------------


@needs_node
async def test_node_listener_reads_a_message_received_over_smtp(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path
) -> None:
    await ingest_one_message(redis_url)
    [(entry_id, fields)] = await redis.xrange("email.receive")
    [line] = await run_node(
        node_scripts, "listen.mjs", REDIS_URL=redis_url, GROUP="billing", START="0", COUNT="1"
    )
    assert line["entry_id"] == entry_id.decode()
    assert line["from"] == "zoe@example.org"
    assert line["to"] == ["bob@example.com"]
    assert line["headers"]["subject"] == SUBJECT
    assert line["headers"]["from"] == "Zoë Müller <zoe@example.org>"
    text, attachment = line["content"]["parts"]
    assert (text["body"], text["body_encoding"]) == (
        "Hallo Bob,\nanbei die Zahlen für März.\n",
        "text",
    )
    assert attachment["body_encoding"] == "base64"
    assert base64.b64decode(attachment["body"]) == ATTACHMENT
    assert attachment["filename"] == "zahlen.bin"
    assert line == expected_json(entry_id.decode(), fields[b"data"])
    assert await pending(redis, "billing") == 0, "printed messages are acknowledged"


@needs_node
async def test_node_listener_every_group_sees_every_message(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path
) -> None:
    await ingest_one_message(redis_url)
    env = {"REDIS_URL": redis_url, "START": "0", "COUNT": "1"}
    [first] = await run_node(node_scripts, "listen.mjs", GROUP="billing", **env)
    [second] = await run_node(node_scripts, "listen.mjs", GROUP="audit", **env)
    assert first == second
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups("email.receive")}
    assert sorted(groups) == ["audit", "billing"]
    assert all(g["last-delivered-id"].decode() == first["entry_id"] for g in groups.values())


@needs_node
async def test_node_listener_takes_its_own_pending_first_and_skips_garbage(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path, tmp_path: Path
) -> None:
    listen = node(node_scripts, "listen.mjs")
    await listener_takes_its_own_pending_first_and_skips_garbage(listen, redis, redis_url, tmp_path)


# --- redis-cli and send.msgpack ------------------------------------------------------------


def documented_python_line() -> str:
    readme = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^python3 -c '(.+)' > send\.msgpack$", readme, re.MULTILINE)
    assert match, "README shows the python3 line that writes send.msgpack"
    return match.group(1)


def test_send_msgpack_is_what_the_documented_line_writes() -> None:
    written = subprocess.run(
        [sys.executable, "-c", documented_python_line()],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    assert written == (EXAMPLES_DIR / "send.msgpack").read_bytes()


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is needed for the redis-cli example")
async def test_redis_cli_example_enqueues_a_deliverable_send(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    assert REDIS_CLI is not None
    readme = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    assert "redis-cli -x XADD email.send '*' data < send.msgpack" in readme
    payload = (EXAMPLES_DIR / "send.msgpack").read_bytes()
    # the documented command, pointed at the test's server with -u
    command = f"{REDIS_CLI} -u {redis_url} -x XADD email.send '*' data < send.msgpack"
    result = await run_script("/bin/sh", "-c", command, cwd=EXAMPLES_DIR)
    assert result.returncode == 0, result.stderr
    [(entry_id, fields)] = await redis.xrange("email.send")
    assert result.stdout.strip() == entry_id.decode()
    assert fields[b"data"] == payload, "redis-cli -x carries the file octet for octet"
    message = decode_send(payload)
    assert message["headers"]["subject"] == "Grüße von redis-cli"
    await deliver_all(redis, redis_url, sink)
    [got] = sink.received
    assert got.message["subject"] == "Grüße von redis-cli"
    assert got.message.get_content() == "Hallo Ann!\r\n"


def test_example_package_pins_are_the_tested_ones() -> None:
    """schema/examples/package.json names the versions tests/node installs and tests."""
    documented = json.loads((EXAMPLES_DIR / "package.json").read_text())["dependencies"]
    tested = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    assert documented == {name: tested[name] for name in documented}
    assert set(documented) == {"redis", "@msgpack/msgpack"}
