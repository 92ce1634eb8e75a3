"""DKIM test helpers: keys on disk, a key table, their DNS records, and the independent
verifier and signer (npm ``mailauth``, tests/mailauth) asking the test's DNS server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.dns_util import DnsServer, txt
from tests.node_util import NODE, install_node_packages
from workers.codec.signing import SigningKey, load_key

MAILAUTH_DIR = Path(__file__).resolve().parent / "mailauth"


@dataclass(frozen=True)
class KeyFile:
    domain: str
    selector: str
    path: Path

    def signing_key(self) -> SigningKey:
        return SigningKey(self.domain, self.selector, load_key(self.path.read_bytes()))

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> tuple[str, list[tuple[str, str]]]:
        return self.record_name, [("TXT", txt(self.signing_key().public_record()))]


def write_key(directory: Path, domain: str, selector: str, algorithm: str) -> KeyFile:
    """A new private key, PEM-encoded PKCS 8 (``ed25519`` or ``rsa``: 2048 bits)."""
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{selector}.{domain}.pem"
    path.write_bytes(pem)
    return KeyFile(domain, selector, path)


def write_table(path: Path, keys: list[KeyFile], *, any_domain: KeyFile | None = None) -> Path:
    lines = ["# domain selector key"]
    lines += [f"{key.domain} {key.selector} {key.path}" for key in keys]
    if any_domain is not None:
        lines.append(f"* {any_domain.selector} {any_domain.path}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mailauth(
    args: list[str], message: bytes, *, node_options: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    install_node_packages(MAILAUTH_DIR)
    assert NODE is not None, "node is not installed (make setup-dev installs it)"
    return subprocess.run(
        [NODE, *node_options, str(MAILAUTH_DIR / "dkim.mjs"), *args],
        input=message, capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def mailauth_verify(message: bytes, dns_address: str) -> list[dict[str, Any]]:
    """mailauth's verdict on every DKIM-Signature of ``message``."""
    done = _mailauth(["verify", dns_address], message)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def mailauth_sign(message: bytes, key: KeyFile, *, node_options: Sequence[str] = ()) -> bytes:
    """``message`` signed by mailauth with ``key`` (relaxed/relaxed)."""
    args = ["sign", str(key.path), key.domain, key.selector]
    done = _mailauth(args, message, node_options=node_options)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout


def mailauth_seal(message: bytes, key: KeyFile, auth_results: str, cv: str) -> bytes:
    """``message`` with an ARC set by mailauth (``cv``: none for the first hop, pass...)."""
    done = _mailauth(["seal", str(key.path), key.domain, key.selector, auth_results, cv], message)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout


# Run inside a network and mount namespace of its own (root: the tests run as root, as CI
# does): unbound answers on 127.0.0.1:53 there, and /etc/resolv.conf points at it, so
# OpenDKIM's own resolver asks the test's DNS server and nothing else.
_IN_PRIVATE_NETWORK = """
ip link set lo up
mount --bind "$1/resolv.conf" /etc/resolv.conf
/usr/sbin/unbound -d -c "$1/unbound.conf" 2>/dev/null &
resolver=$!
trap 'kill "$resolver" 2>/dev/null' EXIT
for _ in $(seq 100); do (: </dev/tcp/127.0.0.1/53) 2>/dev/null && break; sleep 0.05; done
shift
for message in "$@"; do
  opendkim-testmsg < "$message" 2>/dev/null; echo "$?"
done
"""


def opendkim_verify(
    messages: list[bytes], directory: Path, zones: list[str], records: dict[str, Any]
) -> list[int]:
    """OpenDKIM's verdict on each message (``opendkim-testmsg``: 0 when every signature
    verifies, 70 for a bad one), its keys served by unbound in a private network."""
    server = DnsServer(directory, zones, records)
    server.port = 53
    server.write_config()
    (directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    paths = []
    for number, message in enumerate(messages):
        paths.append(directory / f"message{number}.eml")
        paths[-1].write_bytes(message)
    done = subprocess.run(
        # --kill-child: a timed-out run leaves nothing behind in the namespace.
        ["unshare", "--net", "--mount", "--fork", "--kill-child", "bash", "-c",
         _IN_PRIVATE_NETWORK, "bash",
         str(directory), *map(str, paths)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(line) for line in done.stdout.split()]
