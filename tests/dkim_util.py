"""DKIM test helpers: keys on disk, a key table, their DNS records, and the independent
verifier and signer (npm ``mailauth``, tests/mailauth) asking the test's DNS server."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.dns_util import txt
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


def _mailauth(args: list[str], message: bytes) -> subprocess.CompletedProcess[bytes]:
    install_node_packages(MAILAUTH_DIR)
    assert NODE is not None, "node is not installed (make setup-dev installs it)"
    return subprocess.run(
        [NODE, str(MAILAUTH_DIR / "dkim.mjs"), *args],
        input=message, capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def mailauth_verify(message: bytes, dns_address: str) -> list[dict[str, Any]]:
    """mailauth's verdict on every DKIM-Signature of ``message``."""
    done = _mailauth(["verify", dns_address], message)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def mailauth_sign(message: bytes, key: KeyFile) -> bytes:
    """``message`` signed by mailauth with ``key`` (relaxed/relaxed)."""
    done = _mailauth(["sign", str(key.path), key.domain, key.selector], message)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout
