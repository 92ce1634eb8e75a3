"""Configuration: flag, then MAILPOOL_* environment, then default; bad values stop the
command at start with one line and status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from workers.config import ConfigError, DeliveryConfig, IngestConfig, add_arguments, from_arguments


def _config(cls: type[IngestConfig], argv: list[str], env: dict[str, str]) -> IngestConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_arguments(cls, parser.parse_args(argv), env)


def test_flag_beats_environment_beats_default() -> None:
    env = {"MAILPOOL_MAX_SIZE": "2048", "MAILPOOL_LISTEN": "127.0.0.1:2626"}
    config = _config(IngestConfig, ["--max-size", "4096"], env)
    assert (config.max_size, config.listen) == (4096, "127.0.0.1:2626")
    assert _config(IngestConfig, [], {}).max_size == 26_214_400


def test_environment_lists_and_booleans() -> None:
    env = {"MAILPOOL_ACCEPT_DOMAIN": "example.org, example.net", "MAILPOOL_REQUIRE_TLS": "no"}
    config = _config(IngestConfig, ["--accept-domain", "example.com"], {})
    assert config.accept_domain == ["example.com"]
    config = _config(IngestConfig, [], env)
    assert (config.accept_domain, config.require_tls) == (["example.org", "example.net"], False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAILPOOL_MAX_SIZE": "big"}, "--max-size: cannot read 'big'"),
        ({"MAILPOOL_MAX_RECIPIENTS": "5"}, "--max-recipients must be at least 100"),
        ({"MAILPOOL_TLS_CERT": "/nonexistent.pem", "MAILPOOL_TLS_KEY": "/x"}, "file not found"),
        ({"MAILPOOL_LOG_FORMAT": "xml"}, "--log-format"),
    ],
)
def test_bad_values_name_the_option(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(IngestConfig, [], env)


def test_claim_after_must_outlast_an_smtp_transaction() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DeliveryConfig)
    args = parser.parse_args(["--relay", "maildir:/tmp/m", "--claim-after", "10"])
    with pytest.raises(ConfigError, match="--claim-after"):
        from_arguments(DeliveryConfig, args, {})


def test_bad_environment_stops_the_command_with_status_2() -> None:
    env = {"MAILPOOL_CONCURRENCY": "many", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "workers", "deliver", "--relay", "maildir:/tmp/m"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == "mailpool deliver: --concurrency: cannot read 'many' as int\n"
