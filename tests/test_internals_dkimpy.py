"""What DKIM signing relies on of dkimpy beyond ``dkim.sign``, checked against the installed
release: workers/codec/dkimpy_fence.py.

Each test fails loudly, naming that file, when the installed dkimpy is outside the releases
the fence was checked against, when the fence's shortcuts in canonicalisation no longer
give exactly what dkimpy's own canonicalisation gives, or when a signature made by the
fence no longer verifies with dkimpy's verifier.
"""

from __future__ import annotations

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from tests.internals_util import check_release
from workers.codec import dkimpy_fence
from workers.codec.signing import KeyTable, SigningKey, signature_fields

FENCE = "workers/codec/dkimpy_fence.py"

# Bodies and field values made of what canonicalisation cares about: spaces, tabs, CR, LF.
_TEXT = st.lists(st.sampled_from([" ", "\t", "\r", "\n", "\r\n", "a", "b", "=", "é"])).map("".join)
_BYTES = _TEXT.map(lambda text: text.encode())


def test_the_installed_dkimpy_is_the_checked_release() -> None:
    check_release("dkimpy", dkimpy_fence.CHECKED_RELEASES, FENCE)


@given(_BYTES)
def test_relaxed_body_is_dkimpys(body: bytes) -> None:
    assert dkimpy_fence.relaxed_body(body) == dkimpy_fence.RELAXED.canonicalize_body(body), FENCE


@given(st.lists(st.tuples(st.sampled_from([b"Subject", b"TO ", b"x-a"]), _BYTES), max_size=4))
def test_relaxed_headers_are_dkimpys(headers: list[tuple[bytes, bytes]]) -> None:
    ours = dkimpy_fence.relaxed_headers(headers)
    assert ours == dkimpy_fence.RELAXED.canonicalize_headers(headers), FENCE


_NAMES = st.sampled_from([b"from", b"to", b"subject", b"date"])


@given(
    st.lists(st.tuples(_NAMES, st.sampled_from([b"a\r\n", b"b\r\n", b"c\r\n"])), max_size=6),
    st.lists(_NAMES, max_size=6),
)
def test_select_headers_is_dkimpys(headers: list[tuple[bytes, bytes]], signed: list[bytes]) -> None:
    ours = dkimpy_fence.select_headers(headers, signed)
    assert ours == dkim.select_headers(headers, signed), FENCE


MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
    b"Subject: a subject long enough to be folded by the signer, and then a bit\r\n"
    b"  more, folded by hand\r\n"
    b"Date: Sun, 06 Dec 2026 20:00:00 +0000\r\nMessage-ID: <a@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    b"Hello  there,\r\n\tindented line \r\n\r\n\r\n"
)


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa"])
def test_a_fence_signature_verifies_with_dkimpy(algorithm: str) -> None:
    """dkimpy's verifier takes the key from this function instead of DNS: this checks the
    fence against dkimpy; tests/test_delivery_dkim.py checks signatures against mailauth
    through a real DNS server."""
    private_key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519":
        private_key = ed25519.Ed25519PrivateKey.generate()
    else:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = SigningKey("example.com", "s1", private_key)
    signed = signature_fields(MESSAGE, KeyTable([key]), "example.com") + MESSAGE
    record = key.public_record().encode()

    def txt(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.example.com."
        return record

    assert dkim.DKIM(signed).verify(dnsfunc=txt), f"{FENCE}: dkimpy refuses the signature"
    tampered = signed.replace(b"Hello  there", b"Hello there!")
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        dkim.DKIM(tampered).verify(dnsfunc=txt)
