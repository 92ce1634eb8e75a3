"""The ``size`` of ingest's log line and the ``size`` of the stored entry are one quantity:
the octets of the message as stored, i.e. ingest's own ``Received`` field followed by what the
client sent after DATA (dot-unstuffed, without the end mark), which is also ``len(raw)``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from tests.harness import wait_until
from tests.ingest_util import IngestProcess, entries, message, send_one


@pytest.fixture
def process(redis_url: str, ingest_workers: Callable[..., IngestProcess]) -> IngestProcess:
    return ingest_workers(redis_url, "--keep-raw", "always")


def _accepted_lines(process: IngestProcess) -> list[dict[str, object]]:
    events = [json.loads(line) for line in process.log_lines() if line.startswith("{")]
    return [event for event in events if event.get("event") == "message_accepted"]


async def test_log_line_size_is_the_entry_size(
    process: IngestProcess, redis: aioredis.Redis
) -> None:
    sent = message(subject="size", body="x" * 900 + "\r\n.leading dot, stuffed on the wire")
    code, _ = await send_one(process.port, sent)
    assert code == 250
    [(_, entry)] = await entries(redis)

    async def logged() -> bool:
        return bool(_accepted_lines(process))

    await wait_until(logged, timeout=5)
    [line] = _accepted_lines(process)
    assert line["size"] == entry["size"] == len(entry["raw"])
    received_field = entry["raw"][: len(entry["raw"]) - len(sent)]
    assert received_field.startswith(b"Received: ") and entry["raw"].endswith(sent)
