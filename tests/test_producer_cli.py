"""``mailpool send`` as a real subprocess against a real redis-server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis as syncredis

from tests.harness import ROOT, child_env, free_port
from workers.codec.validate import decode_send


def send(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "send", *args],
        capture_output=True, text=True, timeout=20, env=child_env(json_logs=False, **env),
        cwd=ROOT, input=stdin, check=False,
    )  # fmt: skip


def only_entry(redis_url: str) -> tuple[str, bytes]:
    client = syncredis.Redis.from_url(redis_url)
    ((entry_id, fields),) = client.xrange("email.send")
    return entry_id.decode(), fields[b"data"]


def test_send_prints_the_entry_id_of_a_complete_message(redis_url: str, tmp_path: Path) -> None:
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")
    done = send(
        "--redis-url", redis_url, "--from", "app@example.com",
        "--to", "ann@example.com", "--to", "bob@example.com",
        "--subject", "Monthly report", "--text", "Attached.", "--html", "<p>Attached.</p>",
        "--attach", str(report), "--header", "Reply-To: desk@example.com", "--id", "report-11",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entry_id, data = only_entry(redis_url)
    assert done.stdout == entry_id + "\n"
    message = decode_send(data)
    assert message["from"] == "app@example.com"
    assert message["to"] == ["ann@example.com", "bob@example.com"]
    assert message["id"] == "report-11"
    assert message["headers"]["reply-to"] == "desk@example.com"
    assert message["headers"]["subject"] == "Monthly report"
    alternative, attachment = message["content"]["parts"]
    assert [p["body"] for p in alternative["parts"]] == [b"Attached.", b"<p>Attached.</p>"]
    assert (attachment["filename"], attachment["body"]) == ("report.csv", b"a,b\n1,2\n")
    assert attachment["content-type"] == "text/csv"


def test_options_from_the_environment_and_text_from_stdin(redis_url: str) -> None:
    done = send(
        "--text", "-", stdin="from a pipe\n", MAILPOOL_REDIS_URL=redis_url,
        MAILPOOL_FROM="app@example.com", MAILPOOL_TO="ann@example.com,bob@example.com",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    message = decode_send(only_entry(redis_url)[1])
    assert message["to"] == ["ann@example.com", "bob@example.com"]
    assert message["content"]["body"] == b"from a pipe\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--from", "a@x.org"], "--to is required"),
        (["--to", "b@x.org"], "--from is required"),
        (["--from", "a@x.org", "--to", "b@x.org", "--attach", "/nonexistent/f.pdf"],
         "--attach: cannot read file '/nonexistent/f.pdf'"),
        (["--from", "a@x.org", "--to", "b@x.org", "--header", "no colon here"],
         "--header: expected 'Name: value'"),
        (["--from", "a@x.org", "--to", "b@x.org", "--subject", "a\rBcc: c@x.org"],
         "invalid message"),
        # what delivery would dead-letter as invalid is refused before it is enqueued
        (["--from", "not an address", "--to", "b@x.org"],
         "invalid message: from: invalid envelope address 'not an address'"),
        (["--from", "a@x.org", "--to", "b@x.org", "--to", "bob"],
         "invalid message: to[1]: envelope address 'bob' has no domain"),
    ],
)  # fmt: skip
def test_bad_input_stops_with_one_line_and_status_2(
    redis_url: str, args: list[str], expected: str
) -> None:
    done = send("--redis-url", redis_url, *args)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("mailpool send: ") and expected in line
    assert done.stdout == ""
    assert syncredis.Redis.from_url(redis_url).exists("email.send") == 0


def test_text_from_stdin_that_is_not_utf8_stops_with_one_line(redis_url: str) -> None:
    """It gave a UnicodeEncodeError traceback (found by an adversarial review)."""
    done = subprocess.run(
        [sys.executable, "-m", "workers", "send", "--from", "a@x.org", "--to", "b@x.org",
         "--text", "-", "--redis-url", redis_url],
        capture_output=True, timeout=20, env=child_env(json_logs=False), cwd=ROOT,
        input=b"caf\xe9\n", check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode().strip() == (
        "mailpool send: --text -: standard input is not UTF-8 text (octet 3)"
    )
    assert syncredis.Redis.from_url(redis_url).exists("email.send") == 0


def test_a_message_over_the_wire_limit_is_refused_before_it_is_enqueued(
    redis_url: str, tmp_path: Path
) -> None:
    """A 51 MiB attachment was enqueued, and the worker dead-lettered it as invalid: over
    the 50 MiB an entry may hold (workers.codec.wire)."""
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        out.truncate(51 << 20)
    done = send("--redis-url", redis_url, "--from", "a@x.org", "--to", "b@x.org",
                "--attach", str(big))  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("mailpool send: invalid message: ") and "exceeds the limit" in line
    assert syncredis.Redis.from_url(redis_url).exists("email.send") == 0


def test_unreachable_redis_fails_with_one_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = send("--redis-url", url, "--from", "a@x.org", "--to", "b@x.org", "--text", "x")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mailpool send: cannot use Redis at {url}: ")
