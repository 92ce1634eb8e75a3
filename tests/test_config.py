"""Configuration: flag, then MAILPOOL_* environment, then default; bad values stop the
command at start with one line and status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import child_env
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
        ({"MAILPOOL_DNS_SERVER": "127.0.0.1"}, "--dns-server: expected HOST:PORT"),
        ({"MAILPOOL_VERIFY_BUDGET": "0"}, "--verify-budget: seconds, more than 0"),
        ({"MAILPOOL_AUTHSERV_ID": "mx example"}, "--authserv-id: 'mx example' is not a name"),
        ({"MAILPOOL_HOSTNAME": "mx;evil"}, "--authserv-id: 'mx;evil' .* default is --hostname"),
        # The greeting carries it, and aiosmtpd sends it as ASCII: no client was greeted.
        ({"MAILPOOL_HOSTNAME": "mx ü.example"}, "--hostname: 'mx ü.example' is no ASCII host"),
        # An octet that is not UTF-8 (os.environ's lone surrogate) failed later, in Redis's
        # client or the greeting, with a traceback.
        ({"MAILPOOL_RECEIVE_STREAM": "r\udce7"}, "--receive-stream: not valid UTF-8 text"),
        ({"MAILPOOL_HOSTNAME": "mx\udce7.example"}, "--hostname: not valid UTF-8 text"),
        # A worker fed its own dead letters (or events) as sends: 22 720 entries in 8 s.
        ({"MAILPOOL_DEAD_STREAM": "email.send"}, "--dead-stream and --send-stream name the"),
        ({"MAILPOOL_EVENTS_STREAM": "x", "MAILPOOL_RECEIVE_STREAM": "x"}, "name the same"),
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


@pytest.mark.parametrize(
    ("hostname", "message"),
    [
        ("mx-€.example", "--hostname: invalid international domain 'mx-€.example'"),
        ("mx\udce7.example", "--hostname: not valid UTF-8 text"),
    ],
)
def test_a_delivery_hostname_no_message_could_be_built_with_stops_the_start(
    hostname: str, message: str
) -> None:
    """Every message's build takes it (EHLO, Message-ID): the worker started, and dead-lettered
    each message as invalid, past replaying."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, DeliveryConfig)
    args = parser.parse_args(["--relay", "maildir:/tmp/m", "--hostname", hostname])
    with pytest.raises(ConfigError, match=message):
        from_arguments(DeliveryConfig, args, {})


def test_bad_environment_stops_the_command_with_status_2() -> None:
    env = {"MAILPOOL_CONCURRENCY": "many", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "workers", "deliver", "--relay", "maildir:/tmp/m"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == "mailpool deliver: --concurrency: cannot read 'many' as int\n"


def test_verification_is_on_by_default_and_can_be_turned_off() -> None:
    config = _config(IngestConfig, ["--hostname", "mx.example.net"], {})
    assert (config.verify, config.our_authserv_id, config.verify_budget) == (
        True, "mx.example.net", 3.0
    )  # fmt: skip
    assert _config(IngestConfig, ["--no-verify"], {}).verify is False
    assert _config(IngestConfig, [], {"MAILPOOL_VERIFY": "false"}).verify is False
    # --no-verify: a host name that could not be an authserv-id does not matter.
    assert _config(IngestConfig, ["--no-verify", "--hostname", "mx;x"], {}).verify is False


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        ([], "no system DNS resolver (/etc/resolv.conf) for verification: give --dns-server "
             "HOST:PORT, or --no-verify"),
        (["--dns-server", "dns.example:53"], "--dns-server: cannot look up 'dns.example': "),
    ],
    ids=["no-resolver", "unknown-name"],
)  # fmt: skip
def test_no_way_to_ask_dns_stops_ingest_with_one_line(
    tmp_path: Path, arguments: list[str], line: str
) -> None:
    """Without /etc/resolv.conf (a minimal container) and without --dns-server, or with a
    --dns-server name that cannot be looked up, ingest does not start: one line, status 2.
    Run without a network and with the file hidden (network and mount namespaces): no
    question leaves the machine."""
    empty = tmp_path / "resolv.conf"
    empty.write_text("")
    script = (
        f"mount --bind {empty} /etc/resolv.conf && exec {sys.executable} -m workers ingest "
        "--redis-url redis://127.0.0.1:1 --listen 127.0.0.1:0 " + " ".join(arguments)
    )
    out = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", script],
        env=child_env(MAILPOOL_VERIFY="true"),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    [printed] = out.stderr.strip().splitlines()
    assert printed.startswith(f"mailpool ingest: {line}"), printed


def test_a_dns_server_name_is_looked_up_once_at_start() -> None:
    config = _config(IngestConfig, ["--dns-server", "localhost:5353"], {})  # /etc/hosts
    assert config.dns_address in {("127.0.0.1", 5353), ("::1", 5353)}
