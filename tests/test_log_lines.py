"""A log line (``--log-format json``) is one JSON object: the event, its level, a UTC
timestamp in ISO 8601 with microseconds, and every field; a value JSON has no form for is
written as its repr."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from datetime import UTC, datetime

import pytest
import structlog


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def lines(json_log: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in json_log.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_every_field(json_log: io.StringIO) -> None:
    before = time.time()
    structlog.get_logger("test").info("happened", count=3, text="x", thing=Opaque(), no=None)
    after = time.time()
    [line] = lines(json_log)
    assert {k: v for k, v in line.items() if k != "timestamp"} == {
        "event": "happened", "level": "info", "count": 3, "text": "x", "thing": "<opaque>",
        "no": None,
    }  # fmt: skip
    stamp = str(line["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    written = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 1e-6 <= written.timestamp() <= after + 1e-6


@pytest.mark.parametrize(
    ("now", "stamp"),
    [
        (100.999999, "1970-01-01T00:01:40.999999Z"),
        (101.000001, "1970-01-01T00:01:41.000001Z"),  # the next second: its own date and time
        (101.0, "1970-01-01T00:01:41.000000Z"),  # a whole second keeps its fraction
        (1796623888.5, "2026-12-07T06:11:28.500000Z"),
    ],
)
def test_the_timestamp_is_utc_to_the_microsecond(
    now: float, stamp: str, json_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = structlog.get_logger("test")
    log.info("first")  # at the real time: the second written before is another one
    monkeypatch.setattr(time, "time", lambda: now)
    log.info("then")
    assert lines(json_log)[-1]["timestamp"] == stamp


class CountingStream(io.StringIO):
    """Counts the writes it gets: each is a system call on a real stderr."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_line_is_written_at_once_with_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    """One write per line (print() wrote the line and then its newline: two system calls
    on stderr for every message ingest takes)."""
    from workers.logs import configure_logging

    saved = structlog.get_config()
    stream = CountingStream()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr("sys.excepthook", sys.excepthook)  # configure_logging sets its own
    try:
        configure_logging("json", "info")
        for number in range(3):
            structlog.get_logger("test").info("happened", number=number)
    finally:
        structlog.configure(**saved)
    assert stream.writes == 3
    assert [json.loads(line)["number"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
