"""Every command fails with one line and a non-zero status, and quickly: Redis that is down,
something that is not Redis at the Redis URL (a silent TCP service, an HTTP server), and a
wrong flag after a sub-command (that sub-command's usage, not the top level's)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness import ROOT, child_env, free_port, wait_for_port

# A TCP service that accepts connections and never says a word.
SILENT_SERVER = """
import asyncio, sys
async def hold(reader, writer):
    await reader.read()  # until the client goes away; never answers
async def main():
    server = await asyncio.start_server(hold, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

# Past the one-shot commands' first-reply timeout (3 s), well short of the 80 s they took.
QUICK = 10.0

ONE_SHOT_COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["dead", "list"],
    ["dead", "show", "1-1"],
    ["send", "--from", "a@example.com", "--to", "b@example.com", "--text", "x"],
]


def mailpool(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "workers", *args], capture_output=True, text=True,
        timeout=timeout, env={**child_env(), **(env or {})}, cwd=ROOT, check=False,
    )  # fmt: skip
    return done, time.monotonic() - started


def serving(args: list[str], port: int) -> Iterator[int]:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    port = free_port()
    yield from serving([sys.executable, "-c", SILENT_SERVER, str(port)], port)


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    port = free_port()
    yield from serving(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port
    )


def only_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mailpool {command}: cannot use Redis at ")
    return line


@pytest.mark.parametrize("args", ONE_SHOT_COMMANDS, ids=" ".join)
def test_redis_down_is_one_line_naming_the_url_with_the_password_masked(args: list[str]) -> None:
    url = f"redis://app:s3cret@127.0.0.1:{free_port()}/0"
    done, _ = mailpool(*args, "--redis-url", url)
    assert done.returncode == 1
    line = only_line(done, args[0])
    assert f"redis://app:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    assert "s3cret" not in done.stderr
    assert "Connect call failed" in line or "connecting" in line
    assert done.stdout == ""


def test_a_silent_tcp_service_fails_within_seconds(silent_port: int) -> None:
    """Every one-shot command at once (each waits out the 3 s first-reply timeout)."""
    url = f"redis://127.0.0.1:{silent_port}/0"
    with ThreadPoolExecutor(len(ONE_SHOT_COMMANDS)) as pool:
        runs = list(pool.map(lambda args: mailpool(*args, "--redis-url", url), ONE_SHOT_COMMANDS))
    for args, (done, took) in zip(ONE_SHOT_COMMANDS, runs, strict=True):
        assert done.returncode == 1, args
        line = only_line(done, args[0])
        assert "no reply within 3 s (is a Redis server listening there?)" in line, args
        assert took < QUICK, args


@pytest.mark.parametrize("args", ONE_SHOT_COMMANDS[::2], ids=" ".join)
def test_an_http_server_is_reported_as_not_redis(args: list[str], http_port: int) -> None:
    done, took = mailpool(*args, "--redis-url", f"redis://127.0.0.1:{http_port}/0")
    assert done.returncode == 1
    assert "not Redis protocol" in only_line(done, args[0])
    assert took < QUICK


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["send", "--bogus"], "send"),
        (["dead", "list", "--bogus"], "dead"),
        (["status", "--watch", "--bogus"], "status"),
    ],
)
def test_a_wrong_flag_after_a_sub_command_shows_its_usage(args: list[str], command: str) -> None:
    done, _ = mailpool(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"usage: mailpool {command} ")
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"mailpool {command}: error: unrecognized arguments: --bogus"


def test_a_wrong_flag_before_the_sub_command_is_the_top_levels() -> None:
    done, _ = mailpool("--bogus", "status")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: mailpool [-h]")


# An octet that is not UTF-8 (\xe7), as the shell passes it: os.fsdecode gives the lone
# surrogate the child's argv and os.environ will hold.
LATIN_1 = os.fsdecode(b"\xe7")


@pytest.mark.parametrize(
    "args",
    [
        ["dead", "show", f"1-{LATIN_1}"],
        ["suppress", "remove", f"bob{LATIN_1}@example.com"],
        ["status", "--redis-password", f"secr{LATIN_1}t"],
    ],
    ids=["dead-show", "suppress-remove", "password"],
)
def test_an_argument_that_is_not_utf8_is_refused_by_position(args: list[str]) -> None:
    """It failed in Redis's client with a traceback.  The value is not shown: it may be a
    password."""
    done, _ = mailpool(*args)
    assert done.returncode == 2, done.stderr
    said = done.stderr.splitlines()[-1]
    assert said == f"mailpool: error: argument {len(args)} is not valid UTF-8 text"
    assert "Traceback" not in done.stderr and "secr" not in done.stderr


def test_an_environment_value_that_is_not_utf8_names_its_option() -> None:
    done, _ = mailpool("status", env={"MAILPOOL_REDIS_PASSWORD": f"secr{LATIN_1}t"})
    assert (done.returncode, done.stderr) == (
        2, "mailpool status: --redis-password: not valid UTF-8 text\n"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["status", "--redis-url", "redis://127.0.0.1:1/0?foo=bar"], {},
         "--redis-url: cannot use 'redis://127.0.0.1:1/0?foo=bar': no parameter 'foo'"),
        (["status", "--redis-url", "redis://127.0.0.1:1/0?socket_timeout=abc"], {},
         "Invalid value for 'socket_timeout'"),
        (["status", "--redis-url", "redis://[::1:5"], {}, "--redis-url: Invalid IPv6 URL"),
        (["deliver", "--relay", "smtp://[::1"], {}, "--relay: Invalid IPv6 URL"),
        (["status"], {"MAILPOOL_PARTITIONS": ""}, "--partitions: cannot read ''"),
        (["deliver", "--relay", "smtp://127.0.0.1:25", "--smtp-timeout", "nan"], {},
         "--smtp-timeout: cannot read 'nan'"),
        (["status", "--watch", "--interval", "0"], {}, "--interval must be > 0"),
    ],
    ids=["query-name", "query-value", "ipv6-redis", "ipv6-relay", "empty-number", "nan",
         "interval"],
)  # fmt: skip
def test_bad_configuration_found_by_review_is_one_line_and_status_2(
    args: list[str], env: dict[str, str], said: str
) -> None:
    """Each of these was a traceback (exit 1), or a tight loop (--interval 0)."""
    done, _ = mailpool(*args, env=env)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert said in line and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--redis-password-file", "{fifo}"],
        ["deliver", "--relay", "smtp://127.0.0.1:25", "--tls-ca-file", "{fifo}"],
        ["dkim-records", "--dkim-keys", "{fifo}"],
    ],
    ids=["password-file", "ca-file", "key-table"],
)
def test_a_fifo_given_as_a_file_is_refused_at_once(tmp_path: Path, args: list[str]) -> None:
    """Opening it waited for a writer: the command hung at start (found by a review)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done, took = mailpool(*(arg.format(fifo=fifo) for arg in args), timeout=20)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.endswith(f"{fifo}: not a regular file") and took < 10
