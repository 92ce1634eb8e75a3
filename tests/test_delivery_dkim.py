"""DKIM signing on send: the delivery worker signs with the From domain's keys (ed25519 and
rsa), and what the relay receives verifies with an independent implementation (npm
mailauth) that fetches the public keys from a real DNS server (unbound on loopback)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    make_config,
    run_until_settled,
    send_message,
    stream_fields,
    with_attachment,
)
from tests.dkim_util import KeyFile, mailauth_verify, opendkim_verify, write_key, write_table
from tests.dns_util import DnsServer, running_dns
from tests.harness import ROOT, child_env
from tests.sinks import RecordingSink


class Keys:
    def __init__(self, directory: Path) -> None:
        self.ed25519 = write_key(directory, "example.com", "ed1", "ed25519")
        self.rsa = write_key(directory, "example.com", "rsa1", "rsa")
        self.any = write_key(directory, "*", "any1", "ed25519")
        self.table = write_table(directory / "keys.txt", [self.ed25519, self.rsa])
        self.table_with_any = write_table(
            directory / "keys-any.txt", [self.ed25519, self.rsa], any_domain=self.any
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkim-keys"))


def _published(key: KeyFile, domain: str) -> tuple[str, list[tuple[str, str]]]:
    return KeyFile(domain, key.selector, key.path).dns_record()


@pytest.fixture(scope="module")
def dns(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    records = dict(
        [keys.ed25519.dns_record(), keys.rsa.dns_record(), _published(keys.any, "other.test")]
    )
    zones = ["example.com", "other.test"]
    with running_dns(tmp_path_factory.mktemp("dns"), zones, records) as server:
        yield server


async def _send(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, table: Path, **message: Any
) -> bytes:
    await enqueue(redis, send_message(**message))
    await run_until_settled(redis, make_config(redis_url, sink.url, dkim_keys=str(table)))
    assert len(sink.received) == 1, sink.received
    return sink.received[0].data


def _verdicts(results: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return sorted((r["result"], r["domain"], r["selector"], r["algorithm"]) for r in results)


BOTH_PASS = [
    ("pass", "example.com", "ed1", "ed25519-sha256"),
    ("pass", "example.com", "rsa1", "rsa-sha256"),
]


async def test_signed_with_both_keys_of_the_from_domain(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, dns: DnsServer
) -> None:
    data = await _send(redis, redis_url, sink, keys.table, sender="app@example.com")
    assert data.count(b"DKIM-Signature:") == 2
    assert _verdicts(mailauth_verify(data, dns.address)) == BOTH_PASS


async def test_opendkim_verifies_them_too(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, tmp_path: Path
) -> None:
    """A second independent verifier, in C: Debian's OpenDKIM (opendkim-testmsg), each
    algorithm alone, and a changed body refused."""
    for selector in ("ed1", "rsa1"):
        await enqueue(redis, send_message(dkim={"selector": selector}, text="Pay 10 EUR.\n"))
    await run_until_settled(redis, make_config(redis_url, sink.url, dkim_keys=str(keys.table)))
    signed = [received.data for received in sink.received]
    assert sorted(b"s=ed1;" in data for data in signed) == [False, True]
    changed = signed[0].replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    records = dict([keys.ed25519.dns_record(), keys.rsa.dns_record()])
    verdicts = opendkim_verify([*signed, changed], tmp_path / "dns", ["example.com"], records)
    assert verdicts == [0, 0, 70]


async def test_what_changes_after_signing_breaks_the_signature(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, dns: DnsServer
) -> None:
    """The verifier is not a rubber stamp: a changed body, or a second From, fails."""
    data = await _send(redis, redis_url, sink, keys.table, text="Pay 10 EUR.\n")
    assert _verdicts(mailauth_verify(data, dns.address)) == BOTH_PASS
    body_changed = data.replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    assert "pass" not in [r["result"] for r in mailauth_verify(body_changed, dns.address)]
    # A From added on top (what mail programs show): over-signing makes that fail too.
    second_from = b"From: ceo@example.com\r\n" + data
    assert "pass" not in [r["result"] for r in mailauth_verify(second_from, dns.address)]


async def test_hard_bodies_verify(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, dns: DnsServer
) -> None:
    """What trips signers ("body hash did not verify"): trailing spaces and tabs, runs of
    spaces, long lines, UTF-8, empty lines at the end, an attachment, folded headers."""
    text = "Grüße  aus Köln \t\n\tTabbed\tline   \n" + "x " * 600 + "\n\n\n\n"
    message = send_message(subject="Ünïcödé " + "long subject words " * 12, text=text)
    with_attachment(message, "Rechnung.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 20)
    message["headers"]["List-Unsubscribe"] = "<https://example.com/u/1>"
    await enqueue(redis, message)
    await run_until_settled(redis, make_config(redis_url, sink.url, dkim_keys=str(keys.table)))
    data = sink.received[0].data
    assert _verdicts(mailauth_verify(data, dns.address)) == BOTH_PASS
    signed = _signed_fields(data)
    assert signed.count("from") == 2  # over-signed
    assert {"to", "subject", "date", "message-id", "content-type", "list-unsubscribe"} <= set(
        signed
    )


def _signed_fields(data: bytes) -> list[str]:
    head = data.partition(b"\r\n\r\n")[0].decode()
    signature = re.search(r"DKIM-Signature:(.*?)(?=\r\n\S)", head, re.S)
    assert signature is not None
    tags = re.sub(r"\s+", "", signature.group(1))
    h = re.search(r";h=([^;]*)", tags)
    assert h is not None
    return h.group(1).lower().split(":")


async def test_a_subdomain_is_signed_by_its_parent_domains_keys(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, dns: DnsServer
) -> None:
    data = await _send(redis, redis_url, sink, keys.table, sender="news@mail.example.com")
    assert _verdicts(mailauth_verify(data, dns.address)) == BOTH_PASS


async def test_the_any_line_signs_as_the_from_domain(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, dns: DnsServer
) -> None:
    data = await _send(redis, redis_url, sink, keys.table_with_any, sender="a@other.test")
    assert _verdicts(mailauth_verify(data, dns.address)) == [
        ("pass", "other.test", "any1", "ed25519-sha256")
    ]


async def test_a_domain_without_keys_is_sent_unsigned(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys
) -> None:
    data = await _send(redis, redis_url, sink, keys.table, sender="a@other.test")
    assert b"DKIM-Signature" not in data


async def test_a_message_can_ask_not_to_be_signed(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys
) -> None:
    data = await _send(redis, redis_url, sink, keys.table, dkim=False)
    assert b"DKIM-Signature" not in data


async def test_a_message_can_name_its_selector(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, dns: DnsServer
) -> None:
    data = await _send(redis, redis_url, sink, keys.table, dkim={"selector": "rsa1"})
    assert _verdicts(mailauth_verify(data, dns.address)) == [BOTH_PASS[1]]


async def test_an_unknown_selector_is_a_dead_letter_with_the_reason(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys
) -> None:
    entry_id = await enqueue(redis, send_message(dkim={"selector": "gone"}))
    await run_until_settled(redis, make_config(redis_url, sink.url, dkim_keys=str(keys.table)))
    assert sink.received == []
    [dead] = await stream_fields(redis, "email.send.dead")
    assert dead["source_id"] == entry_id
    assert dead["reason"] == "invalid"
    assert "no key of selector 'gone' for example.com" in dead["error"]


async def test_the_records_mailpool_prints_are_what_verifiers_need(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, keys: Keys, tmp_path: Path
) -> None:
    """`mailpool dkim-records` output, published as it is, verifies the worker's mail."""
    printed = subprocess.run(
        [sys.executable, "-m", "workers", "dkim-records", "--dkim-keys", str(keys.table)],
        capture_output=True, text=True, timeout=30, check=True, cwd=ROOT, env=child_env(),
    ).stdout  # fmt: skip
    records: dict[str, list[tuple[str, str]]] = {}
    for line in printed.splitlines():
        if line.startswith(";"):
            continue
        found = re.fullmatch(r"(\S+)\. IN TXT \( (.*) \)", line)
        assert found is not None, line
        records[found[1]] = [("TXT", found[2])]
    assert sorted(records) == ["ed1._domainkey.example.com", "rsa1._domainkey.example.com"]
    data = await _send(redis, redis_url, sink, keys.table)
    with running_dns(tmp_path / "dns", ["example.com"], records) as published:
        assert _verdicts(mailauth_verify(data, published.address)) == BOTH_PASS
