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

import asyncio
import base64
import json
import re
import shutil
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.examples_util import (
    ATTACHMENT,
    EXAMPLES_DIR,
    ROOT,
    SUBJECT,
    assert_bodies_are_bin,
    assert_delivered_intact,
    deliver_all,
    produced_entry,
    run_script,
)
from tests.ingest_util import ingest
from tests.node_util import NODE, NODE_DIR, NPM, install_node_packages
from tests.sinks import RecordingSink
from workers.codec.validate import decode_receive, decode_send
from workers.listen import content_to_json, jsonable

VECTOR_DIR = ROOT / "schema" / "vectors"
REDIS_CLI = shutil.which("redis-cli")

needs_node = pytest.mark.skipif(
    NODE is None or NPM is None, reason="node and npm are needed to run the Node.js examples"
)


@pytest.fixture(scope="module")
def node_scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding copies of the example scripts and a link to the node packages."""
    install_node_packages()
    directory = tmp_path_factory.mktemp("node-examples")
    for name in ("produce.mjs", "listen.mjs"):
        shutil.copyfile(EXAMPLES_DIR / name, directory / name)
    (directory / "node_modules").symlink_to(NODE_DIR / "node_modules", target_is_directory=True)
    return directory


async def run_node(scripts: Path, name: str, **env: str) -> list[Any]:
    """Run one example; returns its stdout lines (JSON-decoded for the listener)."""
    assert NODE is not None
    result = await run_script(NODE, scripts / name, cwd=scripts, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    return [json.loads(line) for line in lines] if name == "listen.mjs" else lines


# --- produce.mjs ---------------------------------------------------------------------------


@needs_node
async def test_node_producer_send_is_delivered_intact(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, node_scripts: Path, tmp_path: Path
) -> None:
    attachment = tmp_path / "Übersicht März.bin"
    attachment.write_bytes(ATTACHMENT)
    recipients = ["ann@example.com", "bob@example.com"]
    [entry_id] = await run_node(
        node_scripts, "produce.mjs", REDIS_URL=redis_url, MAIL_TO=", ".join(recipients),
        SUBJECT=SUBJECT, ATTACH_FILE=str(attachment),
    )  # fmt: skip
    message = await produced_entry(redis, entry_id)
    assert message["headers"]["subject"] == SUBJECT
    assert_bodies_are_bin(message)
    assert message["to"] == recipients
    await deliver_all(redis, redis_url, sink)
    await assert_delivered_intact(redis, sink, entry_id, recipients, "Übersicht März.bin")


@needs_node
async def test_node_producer_defaults_make_a_valid_send(
    redis: aioredis.Redis, redis_url: str, node_scripts: Path
) -> None:
    """Run as documented, with nothing but REDIS_URL: the sample attachment, one recipient."""
    [entry_id] = await run_node(node_scripts, "produce.mjs", REDIS_URL=redis_url)
    message = await produced_entry(redis, entry_id)
    assert message["to"] == ["ann@example.org"]
    attachment = message["content"]["parts"][1]
    assert (attachment["filename"], attachment["body"]) == ("sample.bin", ATTACHMENT)


# --- listen.mjs ----------------------------------------------------------------------------


def smtp_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Zoë Müller <zoe@example.org>"
    message["To"] = "bob@example.com"
    message["Subject"] = SUBJECT
    message.set_content("Hallo Bob,\r\nanbei die Zahlen für März.\r\n")
    message.add_attachment(
        ATTACHMENT, maintype="application", subtype="octet-stream", filename="zahlen.bin"
    )
    return message


def send_with_smtplib(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(smtp_message(), "zoe@example.org", ["bob@example.com"])


async def ingest_one_message(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        await asyncio.to_thread(send_with_smtplib, server.port)


def expected_json(entry_id: str, data: bytes) -> dict[str, Any]:
    """What `mailpool listen` prints for the entry (minus its ``deliveries`` counter)."""
    out: dict[str, Any] = {"entry_id": entry_id}
    for key, value in decode_receive(data).items():
        out[key] = content_to_json(value) if key == "content" else jsonable(value)
    return out


async def pending(redis: aioredis.Redis, group: str) -> int:
    summary = await redis.xpending("email.receive", group)
    return int(summary["pending"])


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
    redis: aioredis.Redis, redis_url: str, node_scripts: Path
) -> None:
    """A consumer restarted under its name gets what it read but never acknowledged first;
    an entry that is not msgpack is reported and acknowledged, not printed."""
    vectors = [
        (VECTOR_DIR / f"{name}.msgpack").read_bytes()
        for name in ("receive-minimal", "receive-utf8-headers")
    ]
    left_pending = await redis.xadd("email.receive", {"data": vectors[0]})
    await redis.xgroup_create("email.receive", "app", id="0")
    await redis.xreadgroup("app", "worker-1", {"email.receive": ">"}, count=1)  # read, no ack
    garbage = await redis.xadd("email.receive", {"data": b"\xc1 not msgpack"})
    fresh = await redis.xadd("email.receive", {"data": vectors[1]})
    assert NODE is not None
    result = await run_script(
        NODE, node_scripts / "listen.mjs", cwd=node_scripts, REDIS_URL=redis_url, GROUP="app",
        CONSUMER="worker-1", COUNT="3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["entry_id"] for p in printed] == [left_pending.decode(), fresh.decode()]
    assert printed[1] == expected_json(fresh.decode(), vectors[1])
    assert garbage.decode() in result.stderr
    assert await pending(redis, "app") == 0


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
