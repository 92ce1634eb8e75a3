"""ARC on receive: a chain sealed by an independent implementation
(npm mailauth) across a forwarding hop, checked through a real DNS server."""

from __future__ import annotations

import time
from pathlib import Path

from tests.dkim_util import mailauth_seal, mailauth_sign, write_key
from tests.dns_util import running_dns
from workers.verify.arc import verify
from workers.verify.resolver import Resolver

MESSAGE = b"From: a@example.com\r\nTo: list@lists.test\r\nSubject: hi\r\n\r\nHello\r\n"


async def test_a_sealed_hop_passes_and_a_change_after_it_fails(tmp_path: Path) -> None:
    author = write_key(tmp_path, "example.com", "a1", "rsa")
    forwarder = write_key(tmp_path, "lists.test", "f1", "rsa")
    signed = mailauth_sign(MESSAGE, author)
    sealed = mailauth_seal(
        signed, forwarder, "mx.lists.test; dkim=pass header.d=example.com", "none"
    )
    records = dict([author.dns_record(), forwarder.dns_record()])
    with running_dns(tmp_path / "dns", ["example.com", "lists.test"], records) as dns:
        resolver = dns.resolver()
        deadline = time.monotonic() + 5
        assert (await verify(resolver, MESSAGE, deadline=deadline)).result == "none"
        chain = await verify(resolver, sealed, deadline=deadline)
        assert (chain.result, chain.instances) == ("pass", 1)
        changed = sealed.replace(b"Subject: hi", b"Subject: [list] hi")
        assert (await verify(resolver, changed, deadline=deadline)).result == "fail"


async def test_a_chain_over_fifty_sets_fails_without_asking_dns() -> None:
    """RFC 8617 caps a chain at 50 sets; a sender cannot make us ask DNS once per field."""
    seals = b"".join(
        f"ARC-Seal: i={n}; a=rsa-sha256; cv=pass; d=victim{n}.test; s=s; b=AAAA\r\n".encode()
        for n in range(1, 60)
    )
    resolver = Resolver(("127.0.0.1", 9), timeout=2.0)
    chain = await verify(resolver, seals + MESSAGE, deadline=time.monotonic() + 5)
    assert (chain.result, chain.instances) == ("fail", 59)
    assert resolver.questions == 0


async def test_a_message_dkimpy_cannot_read_fails_the_chain() -> None:
    unreadable = b" starts with a continuation line\r\nARC-Seal: i=1; b=x\r\n" + MESSAGE
    chain = await verify(Resolver(("127.0.0.1", 9)), unreadable, deadline=time.monotonic() + 5)
    assert chain.result == "fail"


async def test_a_signature_naming_too_many_fields_fails_the_chain() -> None:
    """dkimpy's cost is h= times the fields, for every set: bounded as for DKIM."""
    many = ":".join(f"x-{n}" for n in range(3000))
    sealed = (
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=lists.test; s=f1; b=AAAA\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; d=lists.test; s=f1; h="
        + many.encode() + b"; bh=AAAA; b=AAAA\r\n" + MESSAGE
    )  # fmt: skip
    resolver = Resolver(("127.0.0.1", 9), timeout=2.0)
    started = time.monotonic()
    chain = await verify(resolver, sealed, deadline=time.monotonic() + 5)
    assert (chain.result, chain.instances) == ("fail", 1) and "signed fields" in chain.comment
    assert time.monotonic() - started < 0.5 and resolver.questions == 0
