"""``mailpool listen`` as a real subprocess against a real redis-server: JSON lines, acks,
--no-ack, --count, undecodable entries, SIGTERM, bad configuration."""

from __future__ import annotations

import base64
import contextlib
import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis as syncredis

from tests.harness import ROOT, child_env, free_port, wait_until_blocking
from workers.codec.parse import parse_message
from workers.codec.wire import pack
from workers.listen import ListenedMessage, body_to_json, to_json_line

STREAM = "email.receive"

MIXED = (
    b"From: =?utf-8?q?Ren=C3=A9?= <rene@example.com>\r\n"
    b"To: team@example.com\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"caf=E9\r\n"
    b"--b1\r\n"
    b"Content-Type: image/png\r\n"
    b'Content-Disposition: attachment; filename="dot.png"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"iVBORw0KGgo=\r\n"
    b"--b1--\r\n"
)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "workers", *args]


@contextlib.contextmanager
def listen_process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``mailpool listen`` as a running child with its output piped; killed if the test
    leaves it running."""
    process = subprocess.Popen(
        cli("listen", *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_listen(redis_url: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli("listen", "--redis-url", redis_url, *args),
        capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=ROOT, check=False,
    )  # fmt: skip


def add(client: syncredis.Redis, raw: bytes, mail_from: str | None = "a@example.com") -> str:
    message = parse_message(raw, mail_from=mail_from, rcpt_tos=["team@example.com"])
    return str(client.xadd(STREAM, {"data": pack(message)}).decode())


def lines_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def pending(client: syncredis.Redis, group: str) -> int:
    return int(client.xpending(STREAM, group)["pending"])


def test_prints_one_json_line_per_message_with_text_and_base64_bodies(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    first = add(client, MIXED)
    second = add(client, b"Subject: plain\r\n\r\nhello\r\nworld\r\n", mail_from=None)
    done = run_listen(redis_url, "--group", "audit", "--start", "all", "--count", "2")
    assert done.returncode == 0, done.stderr
    one, two = lines_of(done.stdout)
    assert (one["entry_id"], two["entry_id"]) == (first, second)
    assert one["from"] == "a@example.com" and two["from"] is None
    assert one["to"] == ["team@example.com"]
    assert one["headers"]["subject"] == "café"
    assert one["headers"]["from"] == "René <rene@example.com>"
    text, image = one["content"]["parts"]
    assert (text["body"], text["body_encoding"]) == (
        "café",
        "text",
    )  # CRLF before "--b1" is the boundary's
    assert image["body_encoding"] == "base64"
    assert base64.b64decode(image["body"]) == base64.b64decode("iVBORw0KGgo=")
    assert image["filename"] == "dot.png"
    assert two["content"] == {
        "content-type": "text/plain; charset=us-ascii",
        "body": "hello\nworld\n",
        "body_encoding": "text",
    }
    assert pending(client, "audit") == 0  # acknowledged after printing


def test_no_ack_leaves_entries_pending(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    add(client, MIXED)
    done = run_listen(redis_url, "--group", "peek", "--start", "all", "--count", "1", "--no-ack")
    assert done.returncode == 0, done.stderr
    assert len(lines_of(done.stdout)) == 1
    assert pending(client, "peek") == 1


def test_undecodable_entry_is_printed_with_its_error_and_acknowledged(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    bad = client.xadd(STREAM, {"data": b"\x92\x01"}).decode()  # msgpack, but an array
    done = run_listen(redis_url, "--group", "g", "--start", "all", "--count", "1")
    assert done.returncode == 0, done.stderr
    (line,) = lines_of(done.stdout)
    assert line["entry_id"] == bad and "from" not in line
    assert line["error"]
    assert (base64.b64decode(line["data"]), line["data_encoding"]) == (b"\x92\x01", "base64")
    assert "undecodable_entry" in done.stderr
    assert pending(client, "g") == 0


def test_follows_new_messages_and_stops_cleanly_on_sigterm(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    add(client, MIXED)  # history: a group starting "new" never prints it
    listen = ("--redis-url", redis_url, "--group", "live", "--consumer", "c1")
    with listen_process(*listen) as process:
        wait_until_blocking(lambda: group_exists(client, "live"), timeout=10)
        entry_id = add(client, b"Subject: live\r\n\r\nnow\r\n")
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "no line printed for the new message"
        line = json.loads(process.stdout.readline())
        assert (line["entry_id"], line["headers"]["subject"]) == (entry_id, "live")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    assert process.stdout.read() == b""  # nothing else printed
    assert pending(client, "live") == 0
    assert consumers(client, "live") == []  # a clean stop leaves no consumer behind


def test_sigint_while_idle_exits_zero(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    with listen_process("--redis-url", redis_url, "--group", "idle") as process:
        wait_until_blocking(lambda: group_exists(client, "idle"), timeout=10)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


def test_waits_for_redis_that_is_not_there_yet_then_stops_on_sigterm() -> None:
    port = free_port()
    url = f"redis://app:s3cret@127.0.0.1:{port}/0"
    with listen_process("--redis-url", url, "--group", "g") as process:
        assert process.stderr is not None
        told: dict[str, Any] = {}
        warnings = 0
        deadline = time.monotonic() + 15
        while warnings < 2 and time.monotonic() < deadline:  # it retries, it does not crash
            ready, _, _ = select.select([process.stderr], [], [], 1)
            line = process.stderr.readline() if ready else b""
            if b"redis_not_answering" in line:
                told = json.loads(line)
            if b"redis_unavailable" in line:
                warnings += 1
        assert warnings == 2 and process.poll() is None
        # The first warning says where it looked and how to point it at the pool.
        assert told["redis_url"] == f"redis://app:***@127.0.0.1:{port}/0"
        assert "--redis-url" in told["hint"] and "MAILPOOL_REDIS_URL" in told["hint"]
        assert ".mailpool/redis.url" in told["hint"] and "waiting" in told["hint"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_a_finished_run_removes_its_consumer(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    add(client, MIXED)
    add(client, MIXED)
    for _ in range(2):  # two runs, as a script would: no consumers pile up
        done = run_listen(redis_url, "--group", "jobs", "--start", "all", "--count", "1")
        assert done.returncode == 0, done.stderr
        assert "consumer_removed" in done.stderr
    assert consumers(client, "jobs") == []
    assert pending(client, "jobs") == 0


def test_a_consumer_with_pending_entries_is_kept_and_says_so(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    add(client, MIXED)
    done = run_listen(
        redis_url, "--group", "peek", "--start", "all", "--count", "1", "--no-ack",
        "--consumer", "peeker",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (kept,) = [json.loads(line) for line in done.stderr.splitlines() if "consumer_kept" in line]
    assert (kept["consumer"], kept["pending"]) == ("peeker", 1)
    assert consumers(client, "peek") == ["peeker"]


def test_missing_group_is_a_configuration_error(redis_url: str) -> None:
    done = run_listen(redis_url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mailpool listen: --group is required (one consumer group per application)"
    ]


def test_bad_start_is_a_configuration_error(redis_url: str) -> None:
    done = run_listen(redis_url, "--group", "g", "--start", "yesterday")
    assert done.returncode == 2
    assert "--start" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_group_and_options_from_the_environment(redis_url: str) -> None:
    client = syncredis.Redis.from_url(redis_url)
    add(client, MIXED)
    done = subprocess.run(
        cli("listen"), capture_output=True, text=True, timeout=20, cwd=ROOT, check=False,
        env=child_env(MAILPOOL_REDIS_URL=redis_url, MAILPOOL_GROUP="envgroup",
                      MAILPOOL_START="all", MAILPOOL_COUNT="1"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(lines_of(done.stdout)) == 1
    assert group_exists(client, "envgroup")


def test_body_encoding_rules() -> None:
    assert body_to_json(b"caf\xe9", "text/plain; charset=iso-8859-1") == ("café", "text")
    assert body_to_json("café".encode(), "text/html") == ("café", "text")  # no charset: UTF-8
    assert body_to_json(b"caf\xe9", "text/plain; charset=utf-8") == ("Y2Fm6Q==", "base64")
    assert body_to_json(b"abc", "text/plain; charset=x-no-such") == ("YWJj", "base64")
    assert body_to_json(b"abc", "application/json") == ("YWJj", "base64")
    assert body_to_json(b"abc", "message/rfc822") == ("YWJj", "base64")


def test_json_line_of_a_message_with_raw_bytes_and_part_headers() -> None:
    message = parse_message(
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\nContent-ID: <c1>\r\n\r\n\xff\x00\r\n--b--\r\n",
        mail_from="a@example.com", rcpt_tos=["b@example.com"], keep_raw="always",
    )  # fmt: skip
    listened = ListenedMessage("5-0", message, None, 3, b"", None)  # type: ignore[arg-type]
    line = json.loads(to_json_line(listened))
    assert (line["entry_id"], line["deliveries"], line["raw_encoding"]) == ("5-0", 3, "base64")
    assert base64.b64decode(line["raw"]) == message["raw"]
    (part,) = line["content"]["parts"]
    assert part["headers"]["content-id"] == "<c1>"
    assert (base64.b64decode(part["body"]), part["body_encoding"]) == (b"\xff\x00", "base64")
    assert "\n" not in to_json_line(listened)  # one line, whatever the message holds


def consumers(client: syncredis.Redis, group: str) -> list[str]:
    return [c["name"].decode() for c in client.xinfo_consumers(STREAM, group)]


def group_exists(client: syncredis.Redis, group: str) -> bool:
    try:
        groups = client.xinfo_groups(STREAM)
    except syncredis.ResponseError:
        return False
    return any(g["name"] == group.encode() for g in groups)
