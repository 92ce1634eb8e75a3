"""`mailpool run`, README's main command: with no Redis URL it starts its own redis-server,
with no relay it delivers into a maildir; swaks and `mailpool send` work, `mailpool listen`
shows what came in, and SIGTERM stops everything (the private redis-server too)."""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import free_port, wait_for_port


def _mailpool(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def _wait_for_file(folder: Path, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob("*")) if folder.is_dir() else []
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"nothing delivered into {folder} within {timeout}s")


@pytest.mark.timeout(120)
def test_run_embedded_pool_end_to_end(tmp_path: Path) -> None:
    smtp_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPOOL_")}
    env |= {"MAILPOOL_DATA_DIR": str(tmp_path / ".mailpool"), "MAILPOOL_LOG_FORMAT": "json",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # fmt: skip
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
