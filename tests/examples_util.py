"""Helpers of the tests of ``schema/examples/``: run an example script as a real child process,
deliver what it enqueued with the Python delivery worker, and check the message that reached
the SMTP sink."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis

from tests.delivery_util import events, make_config, running_worker, settled, wait_until
from tests.sinks import Received, RecordingSink
from workers.codec.validate import decode_send

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "schema" / "examples"
SCRIPT_TIMEOUT = 60.0

# Every octet value once: a body that survives only if it travels as msgpack bin end to end.
ATTACHMENT = bytes(range(256))
SUBJECT = "Grüße aus Köln ✉ – 東京 🚀"
TEXT_BODY = "Hallo!\nDie Übersicht hängt an.\n"
HTML_BODY = "<p>Hallo!<br>Die <b>Übersicht</b> hängt an.</p>\n"


@dataclass(frozen=True)
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str


async def run_script(*command: str | Path, cwd: Path, **env: str) -> ScriptRun:
    """Run an example to its end (bounded in time) with extra environment variables."""
    process = await asyncio.create_subprocess_exec(
        *map(str, command),
        cwd=cwd,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return ScriptRun(process.returncode, out.decode(), err.decode())


def leaf_bodies(content: Mapping[str, Any]) -> list[Any]:
    """The ``body`` values of a content tree, depth first."""
    if "parts" in content:
        return [body for part in content["parts"] for body in leaf_bodies(part)]
    return [content["body"]]


async def produced_entry(redis: aioredis.Redis, entry_id: str) -> dict[str, Any]:
    """The one send entry a producer script wrote, decoded with plain msgpack (the contract);
    it must also pass mailpool's own validator."""
    entries = await redis.xrange("email.send")
    assert [stored_id.decode() for stored_id, _ in entries] == [entry_id]
    fields = entries[0][1]
    assert set(fields) == {b"data"}, "a producer writes the data field only"
    decode_send(fields[b"data"])
    message: dict[str, Any] = msgpack.unpackb(fields[b"data"], raw=False)
    return message


async def deliver_all(redis: aioredis.Redis, redis_url: str, sink: RecordingSink) -> None:
    """The Python delivery worker, in this event loop, until the send stream is settled."""
    async with running_worker(make_config(redis_url, sink.url)):
        await wait_until(lambda: settled(redis))


def assert_bodies_are_bin(message: Mapping[str, Any]) -> None:
    bodies = leaf_bodies(message["content"])
    assert len(bodies) == 3
    assert all(isinstance(body, bytes) for body in bodies), "bodies must be msgpack bin"
    assert bodies == [TEXT_BODY.encode(), HTML_BODY.encode(), ATTACHMENT]


async def assert_delivered_intact(
    redis: aioredis.Redis, sink: RecordingSink, entry_id: str, recipients: list[str], filename: str
) -> Received:
    """The example's message reached the relay once, with subject, bodies and octets intact."""
    assert len(sink.received) == 1
    got = sink.received[0]
    assert got.mail_from == "app@example.com"
    assert sorted(got.rcpt_tos) == sorted(recipients)
    parsed = got.message
    assert parsed["subject"] == SUBJECT
    plain, html = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert plain is not None and html is not None
    # text travels with CRLF line endings (the contract), the message keeps them
    assert plain.get_content().replace("\r\n", "\n") == TEXT_BODY
    assert html.get_content().replace("\r\n", "\n") == HTML_BODY
    attachments = list(parsed.iter_attachments())
    assert [part.get_filename() for part in attachments] == [filename]
    assert attachments[0].get_content() == ATTACHMENT
    delivered = [event for event in await events(redis) if event["event"] == "delivered"]
    assert [event["source_id"] for event in delivered] == [entry_id]
    assert await redis.xlen("email.send.dead") == 0
    return got
