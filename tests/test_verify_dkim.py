"""DKIM on receive: messages signed by an independent signer (npm
mailauth), both algorithms, verified through a real DNS server (unbound on loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dkim_util import KeyFile, mailauth_sign, write_key
from tests.dns_util import DnsServer, running_dns
from workers.verify.dkim import verify
from workers.verify.resolver import Resolver

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello  there\r\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyFile, KeyFile]:
    directory = tmp_path_factory.mktemp("keys")
    return (
        write_key(directory, "example.com", "e1", "ed25519"),
        write_key(directory, "example.com", "r1", "rsa"),
    )


@pytest.fixture(scope="module")
def dns(
    keys: tuple[KeyFile, KeyFile], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DnsServer]:
    records = dict(key.dns_record() for key in keys)
    with running_dns(tmp_path_factory.mktemp("dns"), ["example.com"], records) as server:
        yield server


def _resolver(dns: DnsServer) -> Resolver:
    host, port = dns.address.split(":")
    return Resolver((host, int(port)), timeout=2.0)


async def test_both_algorithms_of_an_independent_signer_pass(
    dns: DnsServer, keys: tuple[KeyFile, KeyFile]
) -> None:
    signed = mailauth_sign(mailauth_sign(MESSAGE, keys[1]), keys[0])
    results = await verify(_resolver(dns), signed, deadline=time.monotonic() + 5)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "e1", "ed25519-sha256"),
        ("pass", "r1", "rsa-sha256"),
    ]
    changed = await verify(
        _resolver(dns), signed.replace(b"Hello", b"Hallo"), deadline=time.monotonic() + 5
    )
    assert [r.result for r in changed] == ["fail", "fail"]


async def test_no_key_no_answer_and_unsigned(dns: DnsServer, tmp_path: Path) -> None:
    assert await verify(_resolver(dns), MESSAGE, deadline=time.monotonic() + 5) == []
    forged = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=gone; h=from; bh=x; b=y\r\n" + MESSAGE
    )
    [missing] = await verify(_resolver(dns), forged, deadline=time.monotonic() + 5)
    assert missing.result == "permerror"
    silent = Resolver(("127.0.0.1", 9), timeout=10.0)
    [late] = await verify(silent, forged, deadline=time.monotonic() + 0.3)
    assert late.result == "temperror"
