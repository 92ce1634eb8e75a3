"""DKIM on receive: messages signed by an independent signer (npm
mailauth), both algorithms, verified through a real DNS server (unbound on loopback)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.dkim_util import MAILAUTH_DIR, KeyFile, mailauth_sign, write_key
from tests.dns_util import DnsServer, running_dns, txt
from tests.harness import longest_stall, verification_threads_idle, wait_until
from workers.verify.dkim import AT_ONCE, MAX_SIGNATURES, off_loop, verify
from workers.verify.resolver import Resolver

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello  there\r\n"


RESTRICTED = {"sha1only": "; h=sha1", "nosub": "; t=s"}


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
    records["broken._domainkey.example.com"] = [("TXT", txt("v=DKIM1; k=rsa; p=AAAA"))]
    # The RSA key again, with restrictions of its owner's (RFC 6376 section 3.6.1).
    rsa_record = keys[1].signing_key().public_record()
    for selector, restriction in RESTRICTED.items():
        records[f"{selector}._domainkey.example.com"] = [("TXT", txt(rsa_record + restriction))]
    with running_dns(tmp_path_factory.mktemp("dns"), ["example.com"], records) as server:
        yield server


async def test_both_algorithms_of_an_independent_signer_pass(
    dns: DnsServer, keys: tuple[KeyFile, KeyFile]
) -> None:
    signed = mailauth_sign(mailauth_sign(MESSAGE, keys[1]), keys[0])
    results = await verify(dns.resolver(), signed, deadline=time.monotonic() + 5)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "e1", "ed25519-sha256"),
        ("pass", "r1", "rsa-sha256"),
    ]
    changed = await verify(
        dns.resolver(), signed.replace(b"Hello", b"Hallo"), deadline=time.monotonic() + 5
    )
    assert [r.result for r in changed] == ["fail", "fail"]


async def test_the_signer_writes_the_time_it_signed_while_its_clock_turns(
    dns: DnsServer, keys: tuple[KeyFile, KeyFile]
) -> None:
    """The test signer (tests/mailauth/dkim.mjs) gives mailauth the signing time: left to
    itself, mailauth reads the clock for the signed t= and again for the written one, and
    the signature failed (twice in CI) when the half second turned in between."""
    turning = ["--import", (MAILAUTH_DIR / "turning_clock.mjs").as_uri()]
    signed = mailauth_sign(mailauth_sign(MESSAGE, keys[1], node_options=turning), keys[0],
                           node_options=turning)  # fmt: skip
    results = await verify(dns.resolver(), signed, deadline=time.monotonic() + 5)
    assert [r.result for r in results] == ["pass", "pass"], [r.comment for r in results]


async def test_no_key_no_answer_and_unsigned(dns: DnsServer, tmp_path: Path) -> None:
    assert await verify(dns.resolver(), MESSAGE, deadline=time.monotonic() + 5) == []
    forged = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=gone; h=from; bh=x; b=y\r\n" + MESSAGE
    )
    [missing] = await verify(dns.resolver(), forged, deadline=time.monotonic() + 5)
    assert missing.result == "permerror"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as never_answers:
        never_answers.bind(("127.0.0.1", 0))
        silent = Resolver(("127.0.0.1", never_answers.getsockname()[1]), timeout=10.0)
        started = time.monotonic()
        [late] = await verify(silent, forged, deadline=started + 0.3)
        waited = time.monotonic() - started
    assert late.result == "temperror"
    assert 0.25 < waited < 2, "the deadline, not dnspython's 10 s, ends the wait"


def _signature(selector: str, signed: str = "from") -> bytes:
    return (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; "
            f"s={selector}; h={signed};"
            " bh=AAAA; b=AAAA\r\n").encode()  # fmt: skip


@pytest.mark.parametrize(
    ("selector", "identity", "comment"),
    [
        ("sha1only", None, "the key does not allow sha256 (h=)"),
        ("nosub", b"a@mail.example.com", "the key allows no subdomain in i= (t=s)"),
    ],
)
async def test_a_signature_past_its_keys_restrictions_is_a_permerror(
    dns: DnsServer, keys: tuple[KeyFile, KeyFile], selector: str, identity: bytes | None,
    comment: str,
) -> None:  # fmt: skip
    """dkimpy checks neither: a key for sha1 only passed an rsa-sha256 signature, and a key
    that allows no subdomain passed an i= in one (found by an adversarial review)."""
    private = keys[1].path.read_bytes()
    signed = dkim.sign(MESSAGE, selector.encode(), b"example.com", private,
                       identity=identity, include_headers=[b"from"]) + MESSAGE  # fmt: skip
    [result] = await verify(dns.resolver(), signed, deadline=time.monotonic() + 5)
    assert (result.result, result.selector, result.comment) == ("permerror", selector, comment)
    same_key = dkim.sign(MESSAGE, b"r1", b"example.com", private, identity=identity,
                         include_headers=[b"from"]) + MESSAGE  # fmt: skip
    [unrestricted] = await verify(dns.resolver(), same_key, deadline=time.monotonic() + 5)
    assert unrestricted.result == "pass"


async def test_an_unusable_key_is_a_permerror(dns: DnsServer) -> None:
    [broken] = await verify(dns.resolver(), _signature("broken") + MESSAGE,
                            deadline=time.monotonic() + 5)  # fmt: skip
    assert (broken.result, broken.selector) == ("permerror", "broken")


async def test_limits_bound_the_work_a_sender_can_ask_for(dns: DnsServer) -> None:
    """A signature naming thousands of fields is not checked (dkimpy's cost is h= times the
    fields); a large message is read and checked off the loop, within the deadline."""
    many = ":".join(f"x-{n}" for n in range(8000))
    started = time.monotonic()
    [refused] = await verify(dns.resolver(), _signature("r1", many) + MESSAGE,
                             deadline=time.monotonic() + 5)  # fmt: skip
    assert refused.result == "neutral" and "signed fields" in refused.comment
    assert time.monotonic() - started < 1
    # Relaxed canonicalisation of 3 MB of spaced text, ten times: seconds of CPU.
    body = (b"y  x\t" * 40 + b"\r\n") * ((3 << 20) // 202)
    large = b"".join(_signature("r1") for _ in range(MAX_SIGNATURES)) + MESSAGE + body
    started = time.monotonic()
    verdicts, stall = await longest_stall(verify(dns.resolver(), large, deadline=started + 0.05))
    # Not read in time (one verdict) or read and not checked in time (one per signature).
    assert len(verdicts) in (1, MAX_SIGNATURES), verdicts
    assert {v.result for v in verdicts} == {"temperror"}, verdicts
    assert time.monotonic() - started < 1, "the deadline ends the wait for the thread"
    assert stall < 0.5, "the event loop stalled while the body was hashed"


async def test_verification_threads_take_a_bounded_amount_of_work() -> None:
    """Work waiting for verification's threads is bounded: beyond it a message's checks are
    temperror at once, and ingest's parsing (the default executor) is never queued behind."""
    await wait_until(verification_threads_idle, "earlier verification threads done", timeout=30)
    release = threading.Event()
    held = [asyncio.ensure_future(off_loop(release.wait, deadline=time.monotonic() + 30))
            for _ in range(AT_ONCE)]  # fmt: skip
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await off_loop(lambda: None, deadline=time.monotonic() + 30)
    assert time.monotonic() - started < 0.1
    assert await asyncio.wait_for(asyncio.to_thread(lambda: "parsed"), 1) == "parsed"
    release.set()
    assert await asyncio.gather(*held) == [True] * AT_ONCE
    assert await off_loop(lambda: "free again", deadline=time.monotonic() + 5) == "free again"


async def test_keys_are_asked_for_even_when_the_budget_is_spent(
    dns: DnsServer, keys: tuple[KeyFile, KeyFile]
) -> None:
    """A sender can spend a message's budget (a large message queued for the threads); the
    author's key is still looked up, so its verdict is a real one, not a temperror DMARC
    would read as "might have passed"."""
    signed = mailauth_sign(MESSAGE, keys[0])
    [verdict] = await verify(dns.resolver(), signed, deadline=time.monotonic() - 1)
    assert verdict.result == "pass"
