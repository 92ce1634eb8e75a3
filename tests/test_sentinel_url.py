"""Sentinel URLs: ``redis+sentinel://[user:password@]host:port,.../<master>[/db]`` and
``rediss+sentinel://`` are read into the Sentinels' addresses, the master's name and the
servers' credentials; the Sentinels' own password comes from --sentinel-password (a file, the
environment) and is masked like every other secret; a URL mailpool cannot use stops every
command at start with one line and status 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, child_env
from workers.config import (
    CommonConfig,
    ConfigError,
    DeliveryConfig,
    add_arguments,
    describe,
    from_arguments,
    mask_secrets,
)
from workers.streams.sentinel import SentinelTarget, parse_sentinel_url

PASSWORD = "s3ntinel/p@ss-word"  # characters a URL must percent-encode
IN_URL = "s3ntinel%2Fp%40ss-word"


def configured(cls: type[CommonConfig], argv: list[str], env: dict[str, str]) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_arguments(cls, parser.parse_args(argv), env)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (
            "redis+sentinel://10.0.0.1:26380,10.0.0.2,sentinel-c:5000/mymaster",
            SentinelTarget(
                (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("sentinel-c", 5000)), "mymaster"
            ),
        ),
        (
            "redis+sentinel://ingest:pw%2F1@[::1]:26379,[fe80::2]/mail%20pool/3",
            SentinelTarget(
                (("::1", 26379), ("fe80::2", 26379)), "mail pool", db=3, username="ingest",
                password="pw/1",
            ),
        ),
        (
            "rediss+sentinel://:pw@s1:1,s2:2/m/0?ssl_ca_certs=/ca.pem&sentinel_password=x%26y",
            SentinelTarget(
                (("s1", 1), ("s2", 2)), "m", tls=True, password="pw", sentinel_password="x&y",
                tls_options={"ssl_ca_certs": "/ca.pem"},
            ),
        ),
    ],
)  # fmt: skip
def test_a_sentinel_url_names_the_sentinels_the_master_and_the_credentials(
    url: str, target: SentinelTarget
) -> None:
    assert parse_sentinel_url(url) == target


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s1:26379", "no master name"),
        ("redis+sentinel://s1:26379/", "no master name"),
        ("redis+sentinel://s1:26379/m/one", "database 'one' is not a number"),
        ("redis+sentinel://s1:26379/m/0/extra", "more than a master name and a database"),
        ("redis+sentinel://s1:0/m", "bad port in 's1:0'"),
        ("redis+sentinel://s1:99999/m", "bad port in 's1:99999'"),
        ("redis+sentinel://s1:26379,/m", "an empty Sentinel address"),
        ("redis+sentinel://:26379/m", "no host in ':26379'"),
        ("redis+sentinel://[::1/m", "Invalid IPv6 URL"),
        # urllib itself refuses this one on CPython 3.11.2 (Debian 12), later releases
        # leave it to us: either way one line naming the problem.
        ("redis+sentinel://[::1]x/m", "bad address '[::1]x'|Invalid IPv6 URL"),
        ("redis+sentinel://s1/m?socket_timeout=1", "unknown option 'socket_timeout'"),
        ("redis+sentinel://s1/m?ssl_ca_certs=/ca.pem", "without TLS (rediss+sentinel://)"),
        ("redis+sentinel://s1/m#frag", "a '#' part"),
    ],
)
def test_a_bad_sentinel_url_is_one_line_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        configured(CommonConfig, ["--redis-url", url], {})
    message = str(caught.value)
    assert any(one in message for one in problem.split("|")) and "\n" not in message
    assert message.startswith("--redis-url 'redis+sentinel://")


def test_every_command_stops_with_status_2_on_a_bad_sentinel_url() -> None:
    url = "redis+sentinel://app:hunter2hunter2@s1:26379,s2:bad/mailpool"
    for command in (["ingest"], ["deliver", "--relay", "maildir:/tmp"], ["status"]):
        out = subprocess.run(
            [sys.executable, "-m", "workers", *command, "--redis-url", url],
            capture_output=True, text=True, timeout=30, cwd=ROOT, env=child_env(), check=False,
        )  # fmt: skip
        assert out.returncode == 2, out
        assert out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
        assert "bad port in 's2:bad'" in out.stderr
        assert "hunter2" not in out.stderr and "app:***@" in out.stderr


def test_the_sentinel_password_goes_into_the_url_from_a_file_or_the_environment(
    tmp_path: Path,
) -> None:
    url = "redis+sentinel://delivery@s1:26379,s2:26379/mailpool/0"
    secret = tmp_path / "sentinel-password"
    secret.write_text(PASSWORD + "\n")
    from_file = configured(
        DeliveryConfig, ["--relay", "maildir:/tmp"],
        {"MAILPOOL_REDIS_URL": url, "MAILPOOL_SENTINEL_PASSWORD_FILE": str(secret),
         "MAILPOOL_REDIS_PASSWORD": "redis-pw"},
    )  # fmt: skip
    assert from_file.redis_url == (
        f"redis+sentinel://delivery:redis-pw@s1:26379,s2:26379/mailpool/0"
        f"?sentinel_password={IN_URL}"
    )
    target = parse_sentinel_url(from_file.redis_url)
    assert (target.sentinel_password, target.password) == (PASSWORD, "redis-pw")
    from_env = configured(
        CommonConfig, ["--redis-url", url + "?sentinel_password=old"],
        {"MAILPOOL_SENTINEL_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert from_env.redis_url == url + f"?sentinel_password={IN_URL}"  # replaces the URL's
    shown = describe(from_file)
    assert shown["sentinel_password"] == "***"
    assert shown["redis_url"].endswith("/mailpool/0?sentinel_password=***")
    assert "p@ss" not in json.dumps(shown) and "p%40ss" not in json.dumps(shown)
    assert mask_secrets(f"lost {from_file.redis_url}") == f"lost {shown['redis_url']}"


def test_a_sentinel_password_without_a_sentinel_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="--sentinel-password needs a Sentinel --redis-url"):
        configured(
            CommonConfig, ["--redis-url", "redis://h:6379/0"],
            {"MAILPOOL_SENTINEL_PASSWORD": PASSWORD},
        )  # fmt: skip
