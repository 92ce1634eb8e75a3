"""``--relay`` and ``--tls-ca-file`` are checked before anything starts: a relay the worker
could never use stops ``mailpool deliver`` with one line and exit status 2 instead of failing
after ``delivery_started``, and a maildir is only created below a directory that exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import child_env


def _deliver(
    redis_url: str, relay: str, cwd: Path, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """The worker in an empty directory: a relay taken as a relative path lands there."""
    return subprocess.run(
        [sys.executable, "-m", "workers", "deliver", "--redis-url", redis_url, "--relay", relay,
         *extra],
        cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("relay", "reason"),
    [
        ("maildir", "maildir:PATH"),
        ("maildir:", "maildir:PATH"),
        ("smtp://relay.example:99999", "port"),
        ("smtp://relay.example:0", "port"),
        ("smtp://relay.example:25x", "port"),
        ("smtps://", "no host"),
        ("smtp:relay.example", "no host"),
    ],
)
def test_unusable_relay_is_one_line_and_status_2_before_start(
    redis_url: str, relay: str, reason: str, tmp_path: Path
) -> None:
    result = _deliver(redis_url, relay, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing created
    [line] = result.stderr.splitlines()
    assert line.startswith("mailpool deliver: --relay") and reason in line, line


def test_maildir_below_a_missing_directory_is_refused_and_not_created(
    redis_url: str, tmp_path: Path
) -> None:
    typo = tmp_path / "var" / "mial" / "Maildir"  # "mial": the parent does not exist
    result = _deliver(redis_url, f"maildir:{typo}", tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert "parent directory does not exist" in line and str(typo.parent) in line, line
    assert not (tmp_path / "var").exists()


def test_maildir_that_is_a_file_is_refused(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "Maildir").write_text("not a directory")
    result = _deliver(redis_url, f"maildir:{tmp_path / 'Maildir'}", tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "not a directory" in line, line


@pytest.mark.parametrize(
    ("contents", "extra", "reason"),
    [
        (None, (), "No such file"),
        (b"not a certificate\n", (), "--tls-ca-file"),
        (None, ("--no-tls-verify",), "contradict"),
    ],
    ids=["missing", "not-pem", "with-no-tls-verify"],
)
def test_unusable_tls_ca_file_is_one_line_and_status_2(
    redis_url: str, tmp_path: Path, contents: bytes | None, extra: tuple[str, ...], reason: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if contents is not None:
        ca_file.write_bytes(contents)
    result = _deliver(
        redis_url, "smtp://relay.example:25", tmp_path, "--tls-ca-file", str(ca_file), *extra
    )
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith("mailpool deliver: --tls-ca-file") and reason in line, line


def test_tls_ca_file_from_the_environment(redis_url: str, tmp_path: Path) -> None:
    """MAILPOOL_TLS_CA_FILE is the option's variable (as every option has one)."""
    missing = str(tmp_path / "missing.pem")
    result = _deliver(redis_url, "smtp://relay.example:25", tmp_path, MAILPOOL_TLS_CA_FILE=missing)
    assert result.returncode == 2
    assert "--tls-ca-file" in result.stderr and "missing.pem" in result.stderr
