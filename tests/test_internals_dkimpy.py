"""What DKIM signing and verification rely on of dkimpy beyond ``dkim.sign`` and
``dkim.DKIM.verify``, checked against the installed release: workers/codec/dkimpy_fence.py.

Each test fails loudly, naming that file, when the installed dkimpy is outside the releases
the fence was checked against, when the fence's shortcuts in canonicalisation no longer
give exactly what dkimpy's own canonicalisation gives, or when a signature made by the
fence no longer verifies with dkimpy's verifier.
"""

from __future__ import annotations

import base64
import hashlib

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim import canonicalization
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
    assert dkimpy_fence.relaxed_body(body) == dkimpy_fence.DKIMPY_RELAXED_BODY(body), FENCE


@given(st.lists(st.tuples(st.sampled_from([b"Subject", b"TO ", b"x-a"]), _BYTES), max_size=4))
def test_relaxed_headers_are_dkimpys(headers: list[tuple[bytes, bytes]]) -> None:
    ours = dkimpy_fence.relaxed_headers(headers)
    assert ours == dkimpy_fence.DKIMPY_RELAXED_HEADERS(headers), FENCE


def test_dkimpys_verifier_canonicalises_with_the_fence() -> None:
    """Installed in dkimpy's place, and the originals kept are dkimpy's own (not the fence's
    functions again: the tests above would then compare them with themselves)."""
    relaxed = canonicalization.Relaxed
    assert relaxed.canonicalize_headers is dkimpy_fence.relaxed_headers, f"{FENCE}: not installed"
    assert relaxed.canonicalize_body is dkimpy_fence.relaxed_body, f"{FENCE}: not installed"
    assert dkimpy_fence.DKIMPY_RELAXED_BODY.__module__ == "dkim.canonicalization", FENCE
    assert dkimpy_fence.DKIMPY_RELAXED_HEADERS.__module__ == "dkim.canonicalization", FENCE


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


# -- verification: OpenSSL's RSA in dkimpy's place ---------------------------------------

_RSA_KEYS = {bits: rsa.generate_private_key(public_exponent=65537, key_size=bits)
             for bits in (1024, 2048)}  # fmt: skip
# A 512-bit public key (no private one is needed): below OPENSSL_FROM_BITS, dkimpy's path.
_SMALL = rsa.RSAPublicNumbers(65537, (1 << 511) | 12345678901234567).public_key()


def _spki(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _dkimpy_parse(data: bytes) -> object:
    try:
        return dkimpy_fence.DKIMPY_PARSE_PUBLIC_KEY(data)
    except Exception as exc:
        return type(exc)


def _fence_parse(data: bytes) -> object:
    try:
        parsed = dict(dkimpy_fence.parse_public_key(data))
    except Exception as exc:
        return type(exc)
    parsed.pop(dkimpy_fence.OPENSSL_KEY, None)
    return parsed


@pytest.mark.parametrize("bits", [512, *sorted(_RSA_KEYS)])
def test_parse_public_key_is_dkimpys(bits: int) -> None:
    public = _RSA_KEYS[bits].public_key() if bits in _RSA_KEYS else _SMALL
    pkcs1 = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    for data in (_spki(public), pkcs1, _spki(public)[:-1]):
        assert _fence_parse(data) == _dkimpy_parse(data), f"{FENCE}: key parse differs"
    parsed = dkimpy_fence.parse_public_key(_spki(public))
    assert (dkimpy_fence.OPENSSL_KEY in parsed) == (bits >= dkimpy_fence.OPENSSL_FROM_BITS)
    assert dkim.parse_public_key is dkimpy_fence.parse_public_key, f"{FENCE}: not installed"


@given(st.binary(max_size=300))
def test_parse_public_key_refuses_what_dkimpy_refuses(data: bytes) -> None:
    assert _fence_parse(data) == _dkimpy_parse(data), f"{FENCE}: key parse differs"


@given(
    bits=st.sampled_from(sorted(_RSA_KEYS)),
    message=st.binary(max_size=64),
    algorithm=st.sampled_from(["sha256", "sha1"]),
    damage=st.sampled_from(["none", "digest", "signature", "short", "zero-padded"]),
)
def test_rsa_verify_is_dkimpys(bits: int, message: bytes, algorithm: str, damage: str) -> None:
    private_key = _RSA_KEYS[bits]
    digest = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[algorithm]
    signature = private_key.sign(message, padding.PKCS1v15(), digest)
    signature_was_zero_led = signature[0] == 0
    hashed = hashlib.new(algorithm, message + (b"!" if damage == "digest" else b""))
    if damage == "signature":
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    elif damage == "short":  # valid all the same to dkimpy when that octet was zero
        signature = signature[1:]
    elif damage == "zero-padded":  # the same number: valid to dkimpy
        signature = b"\0" + signature
    key = dkimpy_fence.parse_public_key(_spki(private_key))
    plain = dkimpy_fence.DKIMPY_PARSE_PUBLIC_KEY(_spki(private_key))
    expected = dkimpy_fence.DKIMPY_RSA_VERIFY(hashed.copy(), signature, plain)
    assert dkimpy_fence.rsa_verify(hashed.copy(), signature, key) == expected, (
        f"{FENCE}: RSA verification differs from dkimpy's"
    )
    number_kept = damage == "zero-padded" or (damage == "short" and signature_was_zero_led)
    assert expected == (damage == "none" or number_kept)


def test_dkimpy_verifies_rsa_signatures_through_the_fence() -> None:
    """A message dkimpy signs (rsa-sha256) verifies through dkimpy's verifier with the fence
    in place, and a changed one does not: the whole path, not just the two functions."""
    pem = _RSA_KEYS[2048].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )  # fmt: skip
    signed = dkim.sign(MESSAGE, b"s1", b"example.com", pem, include_headers=[b"from", b"subject"])
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(_spki(_RSA_KEYS[2048]))
    calls = []

    def txt(name: bytes, timeout: int = 5) -> bytes:
        return record

    original = dkimpy_fence.DKIMPY_RSA_VERIFY
    try:
        dkimpy_fence.DKIMPY_RSA_VERIFY = lambda *a: calls.append(a) or original(*a)  # type: ignore[assignment]
        assert dkim.DKIM(signed + MESSAGE).verify(dnsfunc=txt), f"{FENCE}: valid one refused"
        changed = MESSAGE.replace(b"Subject: a subject", b"Subject: the subject")
        assert not dkim.DKIM(signed + changed).verify(dnsfunc=txt), f"{FENCE}: forgery passes"
    finally:
        dkimpy_fence.DKIMPY_RSA_VERIFY = original
    assert calls == [], f"{FENCE}: a 2048-bit key went to dkimpy's own RSA"


def test_a_signature_missing_its_leading_zero_octet_is_dkimpys_verdict() -> None:
    """One signature in 256 starts with a zero octet; a signer that drops it still signs the
    same number, which dkimpy accepts, so the fence must too."""
    private_key = _RSA_KEYS[1024]
    for attempt in range(5000):
        message = attempt.to_bytes(4, "big")
        signature = private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        if signature[0] == 0:
            break
    else:
        pytest.fail("no zero-led signature in 5000")
    key = dkimpy_fence.parse_public_key(_spki(private_key))
    hashed = hashlib.sha256(message)
    assert dkimpy_fence.DKIMPY_RSA_VERIFY(hashed.copy(), signature[1:], key)
    assert dkimpy_fence.rsa_verify(hashed.copy(), signature[1:], key), f"{FENCE}: refused"
