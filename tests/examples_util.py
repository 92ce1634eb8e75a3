"""Helpers of the tests of ``schema/examples/``: run an example script as a real child process,
deliver what it enqueued with the Python delivery worker, and check the message that reached
the SMTP sink; for the listeners, a message received by the real ingest server and what
`mailpool listen` prints for it."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis

from tests.delivery_util import events, make_config, run_until_settled
from tests.ingest_util import ingest
from tests.sinks import Received, RecordingSink
from workers.codec.validate import decode_receive, decode_send
from workers.listen import content_to_json, jsonable

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "schema" / "examples"
VECTOR_DIR = ROOT / "schema" / "vectors"
SCRIPT_TIMEOUT = 60.0

# Every octet value once: a body that survives only if it travels as msgpack bin end to end.
ATTACHMENT = bytes(range(256))
SUBJECT = "Grüße aus Köln ✉ – 東京 🚀"
TEXT_BODY = "Hallo!\nDie Übersicht hängt an.\n"
HTML_BODY = "<p>Hallo!<br>Die <b>Übersicht</b> hängt an.</p>\n"


# The environment of an example run that names no Redis (empty counts as unset): it must
# find the private redis-server of `mailpool run` by itself.
NO_REDIS_CHOSEN = {"REDIS_URL": "", "MAILPOOL_DATA_DIR": ""}


def directory_below_a_pool(base: Path, redis_url: str) -> Path:
    """A working directory two levels below ``base``, where ``.mailpool/redis.url`` names
    ``redis_url``: what `make run` in a clone at ``base`` leaves for its private Redis."""
    (base / ".mailpool").mkdir()
    (base / ".mailpool" / "redis.url").write_text(redis_url + "\n")
    below = base / "app" / "src"
    below.mkdir(parents=True)
    return below


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
    await run_until_settled(redis, make_config(redis_url, sink.url))


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


# --- listeners: one message received over SMTP, and what `mailpool listen` prints for it ---


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


# --- scenarios every language's example passes ---------------------------------------------

# An example program, run to its end in a working directory with extra environment variables.
Run = Callable[..., Awaitable[ScriptRun]]


def entry_id_printed(run: ScriptRun) -> str:
    assert run.returncode == 0, run.stderr[-2000:]
    [entry_id] = run.stdout.split()
    return entry_id


async def producer_send_is_delivered_intact(
    produce: Run, redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    """A UTF-8 subject, two recipients and an attachment of every octet value (its file name
    not ASCII) are enqueued as the contract says and delivered intact by the Python worker."""
    attachment = tmp_path / "Übersicht März.bin"
    attachment.write_bytes(ATTACHMENT)
    recipients = ["ann@example.com", "bob@example.com"]
    entry_id = entry_id_printed(
        await produce(
            tmp_path, REDIS_URL=redis_url, MAIL_TO=", ".join(recipients), SUBJECT=SUBJECT,
            ATTACH_FILE=str(attachment),
        )
    )  # fmt: skip
    message = await produced_entry(redis, entry_id)
    assert message["headers"]["subject"] == SUBJECT
    assert_bodies_are_bin(message)
    assert message["to"] == recipients
    await deliver_all(redis, redis_url, sink)
    await assert_delivered_intact(redis, sink, entry_id, recipients, "Übersicht März.bin")


async def producer_defaults_reach_the_pool_of_make_run(
    produce: Run, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """With no variables at all, from a directory below the clone: the URL `mailpool run`
    recorded in .mailpool/redis.url, the sample attachment and one recipient."""
    cwd = directory_below_a_pool(tmp_path, redis_url)
    message = await produced_entry(redis, entry_id_printed(await produce(cwd, **NO_REDIS_CHOSEN)))
    assert message["to"] == ["ann@example.org"]
    attachment = message["content"]["parts"][1]
    assert (attachment["filename"], attachment["body"]) == ("sample.bin", ATTACHMENT)


async def listener_takes_its_own_pending_first_and_skips_garbage(
    listen: Run, redis: aioredis.Redis, redis_url: str, tmp_path: Path
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
    result = await listen(
        tmp_path, REDIS_URL=redis_url, GROUP="app", CONSUMER="worker-1", COUNT="3"
    )
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["entry_id"] for p in printed] == [left_pending.decode(), fresh.decode()]
    assert printed[1] == expected_json(fresh.decode(), vectors[1])
    assert garbage.decode() in result.stderr
    assert await pending(redis, "app") == 0
