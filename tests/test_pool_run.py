"""`mailpool run`, README's main command: with no Redis URL it starts its own redis-server,
with no relay it delivers into a maildir; swaks and `mailpool send` work, `mailpool listen`
shows what came in, and SIGTERM stops everything (the private redis-server too).

Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the pool must still
drain on its private Redis (which runs in a session of its own and is stopped last), exit 0
and keep what it acknowledged. A pool killed outright takes its redis-server with it."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from tests.harness import (
    child_env,
    free_port,
    running_redis,
    wait_for_port,
    wait_until_blocking,
)


def _mailpool(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def _wait_for_file(folder: Path, timeout: float = 20.0) -> Path:
    found: list[Path] = []

    def delivered() -> bool:
        found[:] = sorted(folder.glob("*")) if folder.is_dir() else []
        return bool(found)

    wait_until_blocking(delivered, f"something delivered into {folder}", timeout=timeout)
    return found[0]


def _pool_env(tmp_path: Path) -> dict[str, str]:
    return child_env(MAILPOOL_DATA_DIR=str(tmp_path / ".mailpool"))


@pytest.mark.timeout(120)
def test_run_embedded_pool_end_to_end(tmp_path: Path) -> None:
    smtp_port, http_port = free_port(), free_port()
    env = _pool_env(tmp_path)
    pool = subprocess.Popen(
        [sys.executable, "-m", "workers", "run", "--listen", f"127.0.0.1:{smtp_port}",
         "--http", f"127.0.0.1:{http_port}"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(smtp_port, timeout=30)
        url_file = tmp_path / ".mailpool" / "redis.url"
        redis_port = int(url_file.read_text().strip().rsplit(":", 1)[1].split("/")[0])

        swaks = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{smtp_port}", "--to", "someone@example.org",
             "--from", "sender@example.net", "--header", "Subject: swaks test"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert "250 2.0.0" in swaks.stdout

        listened = _mailpool("listen", "--group", "demo", "--start", "all", "--count", "1",
                             env=env, cwd=tmp_path)  # fmt: skip
        message = json.loads(listened.stdout.splitlines()[0])
        assert message["to"] == ["someone@example.org"]
        assert message["headers"]["subject"] == "swaks test"

        send = ("send", "--from", "me@example.org", "--to", "you@example.org",
                "--subject", "Grüße", "--text", "hello")  # fmt: skip
        entry_id = _mailpool(*send, env=env, cwd=tmp_path)
        assert entry_id.stdout.strip()
        delivered = _wait_for_file(tmp_path / ".mailpool" / "maildir" / "new")
        parsed = email.message_from_bytes(delivered.read_bytes(), policy=email.policy.default)
        assert parsed["subject"] == "Grüße"
        assert parsed["to"] == "you@example.org"

        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as ready:
            assert ready.status == 200
        status = json.loads(_mailpool("status", "--json", env=env, cwd=tmp_path).stdout)
        assert status["streams"]["email.receive"]["groups"]["demo"]["pending"] == 0
    finally:
        pool.send_signal(signal.SIGTERM)
        _, stderr = pool.communicate(timeout=60)
    assert pool.returncode == 0, stderr[-2000:]
    assert "delivering_to_maildir" in stderr
    assert not url_file.exists()
    with pytest.raises(OSError):
        wait_for_port(redis_port, timeout=0.5)  # the private redis-server is gone too


@contextlib.contextmanager
def _pool_in_own_group(tmp_path: Path, smtp_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``mailpool run`` as the leader of its own process group, as a terminal's foreground
    job is; its log (JSON lines) goes to ``pool.log``. Whatever is left is killed at the end."""
    with open(tmp_path / "pool.log", "wb") as log:
        pool = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--listen", f"127.0.0.1:{smtp_port}"],
            env=_pool_env(tmp_path), cwd=tmp_path, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port(smtp_port, timeout=30)
        yield pool
    finally:
        if pool.poll() is None:
            os.killpg(pool.pid, signal.SIGKILL)
            pool.wait(timeout=10)
        _kill_embedded_redis(tmp_path)


def _log_events(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "pool.log").read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _wait_for_event(tmp_path: Path, name: str, timeout: float = 20.0) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [e for e in _log_events(tmp_path) if e.get("event") == name]
        return bool(found)

    wait_until_blocking(logged, f"{name} in the pool's log", timeout=timeout)
    return found[0]


def _kill_embedded_redis(tmp_path: Path) -> None:
    """Clean-up after a failed test only: the redis-server this test's pool started."""
    started = [e for e in _log_events(tmp_path) if e.get("event") == "embedded_redis_started"]
    for event in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(event["pid"]), signal.SIGKILL)


def _process_gone(pid: int) -> bool:
    """``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


def _smtp_line(conn: socket.socket, line: bytes, expect: bytes) -> None:
    conn.sendall(line + b"\r\n")
    reply = _smtp_reply(conn)
    assert reply.startswith(expect), reply


def _smtp_reply(conn: socket.socket) -> bytes:
    """One SMTP reply (the last line of a multi-line one)."""
    buffered = b""
    while True:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed after {buffered!r}"
        buffered += chunk
        lines = buffered.split(b"\r\n")
        if any(len(line) >= 4 and line[3:4] == b" " for line in lines[:-1]):
            return [line for line in lines if line[3:4] == b" "][-1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_to_the_whole_group_drains_on_the_private_redis(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C reaches every process of the terminal's group. An SMTP transaction in the middle
    of DATA still ends with 250 (the drain needs Redis), a send enqueued just before stays
    stored, the pool exits 0 and stops its redis-server only after ingest and delivery."""
    smtp_port = free_port()
    with _pool_in_own_group(tmp_path, smtp_port) as pool:
        conn = socket.create_connection(("127.0.0.1", smtp_port), timeout=20)
        with conn:
            assert _smtp_reply(conn).startswith(b"220")
            _smtp_line(conn, b"EHLO client.test", b"250")
            _smtp_line(conn, b"MAIL FROM:<alice@example.org>", b"250")
            _smtp_line(conn, b"RCPT TO:<bob@example.com>", b"250")
            _smtp_line(conn, b"DATA", b"354")
            conn.sendall(b"From: alice@example.org\r\nSubject: in flight at Ctrl-C\r\n")
            enqueued = _mailpool("send", "--from", "me@example.org", "--to", "you@example.org",
                                 "--subject", "just enqueued", "--text", "hi",
                                 env=_pool_env(tmp_path), cwd=tmp_path).stdout.strip()  # fmt: skip
            os.killpg(pool.pid, signum)
            _wait_for_event(tmp_path, "ingest_draining")
            _wait_for_event(tmp_path, "delivery_stopped")  # delivery is done, ingest waits
            time.sleep(0.5)  # a slow sender: long enough for a redis-server hit by it to exit
            _smtp_line(conn, b"\r\nsent after the signal\r\n.", b"250 2.0.0")
        assert pool.wait(timeout=60) == 0, (tmp_path / "pool.log").read_text()[-3000:]

    order = [e["event"] for e in _log_events(tmp_path)]
    stopped_redis = order.index("embedded_redis_stopped")
    for earlier in ("ingest_draining", "ingest_stopped", "delivery_stopped"):
        assert order.index(earlier) < stopped_redis, order
    assert order.index("ingest_draining") < order.index("ingest_stopped")
    with running_redis(tmp_path / ".mailpool" / "redis", appendonly=True) as restarted:
        received = _entries(restarted.port, "email.receive")
        assert len(received) == 1 and b"in flight at Ctrl-C" in received[0][1][b"data"]
        assert [entry_id.decode() for entry_id, _ in _entries(restarted.port, "email.send")] == [
            enqueued
        ]


def _entries(port: int, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    with redis.Redis(port=port) as client:
        return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))


@pytest.mark.timeout(60)
def test_private_redis_does_not_outlive_a_killed_pool(tmp_path: Path) -> None:
    """kill -9 of the pool alone (no drain, no clean-up of its own): the redis-server it
    started must not stay behind holding the data directory and a port."""
    smtp_port = free_port()
    with _pool_in_own_group(tmp_path, smtp_port) as pool:
        redis_pid = int(_wait_for_event(tmp_path, "embedded_redis_started")["pid"])
        os.kill(pool.pid, signal.SIGKILL)
        pool.wait(timeout=10)
        gone = "redis-server gone with its pool (not outliving it)"
        wait_until_blocking(lambda: _process_gone(redis_pid), gone, timeout=10)
