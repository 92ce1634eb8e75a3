"""The DKIM key table (--dkim-keys, MAILPOOL_DKIM_KEYS): read and checked at start, one clear
line and exit status 2 for a missing, unreadable or malformed table or key, and the private
key never shown (errors, logs, the config's repr)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.dkim_util import KeyFile, write_key, write_table
from tests.harness import ROOT, child_env
from workers.codec.signing import KeyTable, SigningKey, load_key, parse_key_table
from workers.config import ConfigError, load_key_table


def _deliver(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "deliver", "--relay", "maildir:/tmp", *args],
        capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
        env=child_env(**(env or {})),
    )  # fmt: skip


def _pem_lines(path: Path) -> list[str]:
    """The base64 lines of a PEM key: none of them may ever be shown."""
    return [line for line in path.read_text().splitlines() if not line.startswith("-----")]


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: bytes | None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.fixture
def good(tmp_path: Path) -> KeyFile:
    return write_key(tmp_path / "keys", "example.com", "s1", "ed25519")


def test_a_good_table_loads_every_key(tmp_path: Path, good: KeyFile) -> None:
    rsa_key = write_key(tmp_path / "keys", "example.com", "r1", "rsa")
    table = load_key_table(str(write_table(tmp_path / "t.txt", [good, rsa_key])))
    found = table.keys_for("example.com")
    assert found is not None
    assert [(k.selector, k.algorithm) for k in found[1]] == [
        ("s1", "ed25519-sha256"),
        ("r1", "rsa-sha256"),
    ]


def test_a_relative_key_path_is_relative_to_the_table(tmp_path: Path, good: KeyFile) -> None:
    table = tmp_path / "keys" / "table.txt"
    table.write_text(f"example.com s1 {good.path.name}  # next to the table\n")
    assert load_key_table(str(table)).keys_for("example.com") is not None


def test_lookup_by_domain_parent_and_default(good: KeyFile) -> None:
    key = good.signing_key()
    default = SigningKey("*", "any", key.private_key)
    table = KeyTable([key, default])
    assert table.keys_for("example.com") == ("example.com", [key])
    assert table.keys_for("a.b.example.com") == ("example.com", [key])
    assert table.keys_for("example.org") == ("example.org", [default])
    assert table.keys_for("com") == ("com", [default])  # no parent matches: the default
    assert KeyTable([key]).keys_for("example.org") is None
    assert KeyTable([key]).keys_for("notexample.com") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("example.com s1\n", "line 1: expected DOMAIN SELECTOR PATH, got 2 words"),
        ("# c\nexample.com s1 k.pem extra\n", "line 2: expected DOMAIN SELECTOR PATH"),
        ("localhost s1 k.pem\n", "line 1: 'localhost' is not a domain name"),
        ("*.example.com s1 k.pem\n", "'\\*' alone is the line for every other domain"),
        ("a@example.com s1 k.pem\n", "line 1: 'a@example.com' is not a domain name"),
        ("example.com bad/sel k.pem\n", "line 1: selector 'bad/sel' is not"),
        ("example.com s1 a.pem\nEXAMPLE.com s1 b.pem\n", "line 2: example.com s1 is given twice"),
        (
            "example.com Sel a.pem\nexample.com sel b.pem\n",
            "line 2: example.com sel is given twice",
        ),
        ("example.com " + "a" * 64 + " k.pem\n", "is not a DNS label sequence"),
        (
            "example.com " + ".".join(["a" * 60] * 4) + " k.pem\n",
            "_domainkey.example.com is too long",
        ),
    ],
)
def test_malformed_lines_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_key_table(text)


def test_unicode_domains_become_a_labels() -> None:
    assert parse_key_table("bücher.example s1 k.pem")[0].domain == "xn--bcher-kva.example"


def _error_of(tmp_path: Path, table_text: str) -> str:
    table = tmp_path / "table.txt"
    table.write_text(table_text)
    with pytest.raises(ConfigError) as caught:
        load_key_table(str(table))
    return str(caught.value)


def test_key_problems_name_the_line_and_file_never_the_key(tmp_path: Path) -> None:
    (tmp_path / "ec.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1()), None))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "locked.pem").write_bytes(_pem(weak, b"secret"))
    (tmp_path / "garbage.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    (tmp_path / "big.pem").write_bytes(b"x" * 70_000)
    cases = {
        "missing.pem": "line 1: " + str(tmp_path / "missing.pem") + ": No such file",
        "ec.pem": "DKIM signs with ed25519 or rsa",
        "locked.pem": "the key is encrypted",
        "garbage.pem": "not a PEM private key",
        "big.pem": "over 65536 bytes",
    }
    for name, message in cases.items():
        error = _error_of(tmp_path, f"example.com s1 {name}\n")
        assert message in error, (name, error)
        assert error.startswith(f"--dkim-keys {tmp_path / 'table.txt'} line 1: "), error
    assert "no keys" in _error_of(tmp_path, "# nothing yet\n")


def test_rsa_keys_under_1024_bits_are_refused(tmp_path: Path) -> None:
    """RFC 8301: verifiers may refuse them, so a signer must not use them (cryptography no
    longer makes such keys: openssl does)."""
    weak = subprocess.run(
        ["openssl", "genrsa", "768"], capture_output=True, check=True, timeout=30
    ).stdout
    with pytest.raises(ValueError, match="an RSA key of 768 bits: at least 1024"):
        load_key(weak)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert load_key(_pem(key, None)).key_size == 1024  # type: ignore[union-attr]


def test_the_command_stops_with_one_line_and_status_2(tmp_path: Path) -> None:
    done = _deliver("--dkim-keys", str(tmp_path / "absent.txt"))
    assert done.returncode == 2
    assert done.stderr == (
        f"mailpool deliver: --dkim-keys {tmp_path / 'absent.txt'}: No such file or directory\n"
    )


def test_the_environment_names_the_table_too(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("example.com s1\n")
    done = _deliver(env={"MAILPOOL_DKIM_KEYS": str(tmp_path / "t.txt")})
    assert done.returncode == 2
    assert "line 1: expected DOMAIN SELECTOR PATH" in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_private_key_is_never_shown(tmp_path: Path, good: KeyFile) -> None:
    """Not in the start-up line (debug logging), not in the key's repr."""
    table = write_table(tmp_path / "t.txt", [good])
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "deliver", "--relay", f"maildir:{tmp_path}",
         "--dkim-keys", str(table), "--log-level", "debug",
         "--redis-url", "redis://127.0.0.1:1/0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env(),
    )  # fmt: skip
    assert process.stderr is not None
    first = process.stderr.readline()  # the start-up line (logs go to stderr), then stop
    os.kill(process.pid, signal.SIGTERM)
    out, rest = process.communicate(timeout=20)
    err = first + rest
    shown = out + err + repr(good.signing_key()) + repr(load_key_table(str(table)).by_domain)
    assert "example.com s1 ed25519-sha256" in out + err  # the start-up line names the keys
    for line in _pem_lines(good.path):
        assert line not in shown


def test_dkim_records_needs_the_domain_for_a_star_line(tmp_path: Path, good: KeyFile) -> None:
    table = write_table(tmp_path / "t.txt", [good], any_domain=good)
    base = [sys.executable, "-m", "workers", "dkim-records", "--dkim-keys", str(table)]
    run = {"capture_output": True, "text": True, "timeout": 30, "cwd": ROOT, "env": child_env()}
    refused = subprocess.run(base, check=False, **run)  # type: ignore[call-overload]
    assert refused.returncode == 2
    assert "the table has a '*' line: give --domain" in refused.stderr
    shown = subprocess.run([*base, "--domain", "Bücher.Example"], check=True, **run)  # type: ignore[call-overload]
    assert "s1._domainkey.xn--bcher-kva.example. IN TXT" in shown.stdout  # as the signer writes d=
    bad = subprocess.run([*base, "--domain", "not a domain"], check=False, **run)  # type: ignore[call-overload]
    assert bad.returncode == 2 and "--domain 'not a domain' is not a domain name" in bad.stderr
    assert "s1._domainkey.example.com. IN TXT" in shown.stdout
