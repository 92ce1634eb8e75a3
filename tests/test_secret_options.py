"""Secrets off the command line: every password can come from a MAILPOOL_*_PASSWORD variable
or a --*-password-file (a mounted Kubernetes Secret); a file that cannot be used stops the
command with one line and status 2; masking covers URLs, password fields, remembered secrets
and exceptions in every log line."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.harness import ROOT, child_env
from workers import cli
from workers.config import (
    CommonConfig,
    DeliveryConfig,
    add_arguments,
    describe,
    from_arguments,
    mask_secrets,
    mask_url_password,
)
from workers.pool import RunConfig

PASSWORD = "p@ss/w:rd-for-options"  # characters a URL must percent-encode
IN_URL = "p%40ss%2Fw%3Ard-for-options"


def configured(cls: type[CommonConfig], argv: list[str], env: dict[str, str] | None = None) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_arguments(cls, parser.parse_args(argv), env or {})


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")  # as `echo` and `kubectl create secret --from-file` leave it
    return path


def test_redis_password_from_a_file_or_the_environment_goes_into_the_url(
    password_file: Path,
) -> None:
    url = "redis://delivery@redis:6379/0"
    from_file = configured(
        CommonConfig,
        [],
        {"MAILPOOL_REDIS_URL": url, "MAILPOOL_REDIS_PASSWORD_FILE": str(password_file)},
    )
    assert from_file.redis_url == f"redis://delivery:{IN_URL}@redis:6379/0"
    from_env = configured(
        CommonConfig, [], {"MAILPOOL_REDIS_URL": "redis://delivery:old@redis:6379/0",
                           "MAILPOOL_REDIS_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert from_env.redis_url == from_file.redis_url  # it replaces the URL's password
    no_user = configured(CommonConfig, ["--redis-url", "unix:///run/redis.sock?db=1"],
                         {"MAILPOOL_REDIS_PASSWORD": PASSWORD})  # fmt: skip
    assert no_user.redis_url == f"unix://:{IN_URL}@/run/redis.sock?db=1"


def test_relay_password_from_a_file(password_file: Path) -> None:
    config = configured(
        DeliveryConfig,
        ["--relay", "smtp://mailer@relay.example:587", "--relay-password-file", str(password_file)],
    )
    settings = config.relay_settings()
    assert (settings.username, settings.password) == ("mailer", PASSWORD)
    assert PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("directory", "not a regular file"),
        ("", "the file is empty"),
        ("\n", "the file is empty"),
        ("one\ntwo\n", "more than one line"),
        ("x" * 5000, "over 4096 bytes"),
        (b"\xff\xfe", "not UTF-8"),
    ],
    ids=["missing", "directory", "empty", "newline", "two-lines", "too-big", "not-utf8"],
)
def test_an_unusable_password_file_is_one_line_and_status_2(
    tmp_path: Path, content: str | bytes | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "password"
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    status = cli.main(["status", "--redis-url", "redis://app@127.0.0.1:1/0",
                       "--redis-password-file", str(path)])  # fmt: skip
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"mailpool status: --redis-password-file {path}: ")
    assert message in line


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["deliver", "--relay", "smtp://h:25", "--relay-password-file", "{file}"],
         {"MAILPOOL_RELAY_PASSWORD": "something else"},
         "--relay-password and --relay-password-file: give one of them"),
        (["status"], {"MAILPOOL_REDIS_PASSWORD": PASSWORD},
         "--redis-password needs --redis-url: the URL says which server and user"),
    ],
    ids=["both", "password-without-url"],
)  # fmt: skip
def test_contradictory_secret_options_are_refused(
    argv: list[str], env: dict[str, str], message: str, password_file: Path
) -> None:
    argv = [arg.replace("{file}", str(password_file)) for arg in argv]
    done = subprocess.run(
        [sys.executable, "-m", "workers", *argv], cwd=ROOT, env=child_env(**env),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"mailpool {argv[0]}: {message}\n"


# ---------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://app:pw@h:6379/0", "redis://app:***@h:6379/0"),
        ("redis://:pw@h", "redis://:***@h"),
        ("smtp://u:p@ss@h:25 and more", "smtp://u:***@h:25 and more"),  # unencoded "@"
        ("'unix://:pw@/run/r.sock'", "'unix://:***@/run/r.sock'"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        ("redis://app@h:6379/0", "redis://app@h:6379/0"),
        ("maildir:/var/mail", "maildir:/var/mail"),
    ],
)
def test_url_passwords_are_masked_in_any_text(text: str, shown: str) -> None:
    assert mask_secrets(text) == shown
    if text.startswith(("redis", "smtp")):
        assert mask_url_password(text) == shown


def test_describe_masks_every_secret_option(password_file: Path, tmp_path: Path) -> None:
    pem = tmp_path / "tls.pem"  # AUTH needs TLS options; describe does not load them
    pem.touch()
    config = configured(
        RunConfig,
        ["--redis-url", "redis://app@127.0.0.1:6379/0", "--relay", f"smtp://m:{IN_URL}@h:25",
         "--relay-password-file", str(password_file), "--auth-users", f"a:{PASSWORD},b:other",
         "--tls-cert", str(pem), "--tls-key", str(pem)],
        {"MAILPOOL_REDIS_PASSWORD": PASSWORD},
    )  # fmt: skip
    shown = describe(config)
    assert shown["redis_url"] == "redis://app:***@127.0.0.1:6379/0"
    assert shown["relay"] == "smtp://m:***@h:25"
    assert shown["relay_password"] == shown["redis_password"] == shown["auth_users"] == "***"
    assert shown["relay_password_file"] == str(password_file)  # a path, not a secret
    assert "ss/w" not in json.dumps(shown) and "ss%2Fw" not in json.dumps(shown)


def test_log_lines_mask_urls_password_fields_remembered_secrets_and_exceptions(
    json_log: io.StringIO, password_file: Path
) -> None:
    configured(
        DeliveryConfig, ["--relay", "smtp://h:25", "--relay-password-file", str(password_file)]
    )  # reading the file remembers the password
    log = structlog.get_logger("test")
    log.info("plain", relay=f"smtp://u:{IN_URL}@h", detail=f"server said {PASSWORD!r}")
    log.info(
        "fields", smtp_password="anything", nested={"secret": "x", "urls": [f"redis://:{IN_URL}@h"]}
    )
    try:
        raise ConnectionError(f"cannot reach redis://app:{IN_URL}@h:1/0 with {PASSWORD}")
    except ConnectionError:
        log.exception("failed")
    output = json_log.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["event"] for line in lines] == ["plain", "fields", "failed"]
    assert "ss/w" not in output and "ss%2Fw" not in output
    assert lines[0]["relay"] == "smtp://u:***@h" and lines[0]["detail"] == "server said '***'"
    assert lines[1]["smtp_password"] == "***" and lines[1]["nested"]["secret"] == "***"
    assert "cannot reach redis://app:***@h:1/0 with ***" in lines[2]["exception"]


LIBRARY_AND_CRASH = f"""
import logging
from workers.config import remember_secret
from workers.logs import configure_logging
configure_logging("json", "info")
remember_secret({PASSWORD!r})
logging.getLogger("redis.connection").warning("lost redis://app:{IN_URL}@h:1/0")
raise RuntimeError("a bug, with {PASSWORD} in its message")
"""


def test_library_log_lines_and_a_crash_traceback_are_masked_too() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_AND_CRASH], cwd=ROOT, env=child_env(),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "WARNING redis.connection lost redis://app:***@h:1/0" in done.stderr
    assert "RuntimeError: a bug, with *** in its message" in done.stderr
    assert "ss/w" not in done.stderr and "ss%2Fw" not in done.stderr
