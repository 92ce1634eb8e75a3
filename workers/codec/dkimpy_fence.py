"""What DKIM signing relies on of dkimpy beyond its documented ``dkim.sign``, in one place.

dkimpy is the canonicalisation and the header selection; the signature is libsodium's
(ed25519) or OpenSSL's (rsa), and workers/codec/signing.py writes the ``DKIM-Signature``
field.  ``dkim.sign`` itself is not used on the delivery path because it is too slow for it
(2 KB message, relaxed/relaxed, bench of 2026-12-06, 2 cores):

* rsa-sha256: 6.5 ms per message, its RSA being pure Python; OpenSSL signs in 0.29 ms;
* ed25519-sha256: 222 µs per message, against ~250 µs of the whole delivery worker per
  message; this module and signing.py take about 50 µs (65-70 µs inside the worker).
  Of dkim.sign's 222 µs, 95 are the relaxed body canonicalisation's two whitespace regexes
  over bodies they mostly leave unchanged (the builder's quoted-printable and base64 bodies
  have no tab, no run of spaces and no space before a line end), 53 re-parse the header the
  builder has just written, 21 canonicalise every field twice, 16 derive the key pair from
  the seed on every call.

:func:`relaxed_body` and :func:`relaxed_headers` run dkimpy's own canonicalisation steps,
skipping only a regex that provably changes nothing; :func:`select_headers` is dkimpy's
bottom-up search, or a dictionary look-up when every name occurs once
(tests/test_internals_dkimpy.py checks all three against dkimpy on arbitrary input).

Checked against dkimpy 1.1.8 (``CHECKED_RELEASES``, pyproject's pin).
tests/test_internals_dkimpy.py fails, naming this file, on another release, when these
functions no longer give what dkimpy's ``Relaxed`` canonicalisation gives, or when a
signature made with them no longer verifies with dkimpy's verifier; check
``dkim/canonicalization.py`` and ``select_headers`` in ``dkim/__init__.py`` of that
release, then widen the range.

Verification (workers/verify: DKIM and ARC on receive) goes through ``dkim.DKIM.verify`` and
``dkim.arc_verify``, but their RSA is dkimpy's pure-Python one: 0.64 ms per rsa-sha256
signature of a 2 KB message, two thirds of it parsing the key's ASN.1 and the modular
exponentiation; and its relaxed canonicalisation runs regexes that change nothing on most
mail.  :func:`relaxed_headers` and :func:`relaxed_body` replace ``Relaxed``'s two static
methods (dkimpy's own kept as ``DKIMPY_RELAXED_*``, which the tests compare with);
:func:`parse_public_key` and :func:`rsa_verify` take the place of
``dkim.parse_public_key`` and ``dkim.RSASSA_PKCS1_v1_5_verify`` (the names dkimpy's
``evaluate_pk`` and ``verify_sig_process`` call): OpenSSL (cryptography) parses the key and
checks the signature, a parsed key is remembered for the next message signed with it, and
anything OpenSSL does not take as an RSA key of 1024 bits or more (or a hash other than
sha256/sha1) goes to dkimpy's own functions, so dkimpy's errors stay its errors.
tests/test_internals_dkimpy.py holds both to dkimpy's on valid, tampered and malformed
input.

Pure like the rest of the codec: no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import canonicalization

CHECKED_RELEASES = ">=1.1.8,<1.1.9"

RELAXED = canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# dkimpy's own relaxed canonicalisation, kept before it is replaced (end of this module).
DKIMPY_RELAXED_HEADERS = canonicalization.Relaxed.canonicalize_headers
DKIMPY_RELAXED_BODY = canonicalization.Relaxed.canonicalize_body

Header = tuple[bytes, bytes]  # (name, value as written after the colon, CRLF of folds kept)


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 relaxed body canonicalisation: dkimpy's ``Relaxed.canonicalize_body`` step by
    step, each of its two whitespace regexes skipped where it would change nothing."""
    if b" \r\n" in body or b"\t\r\n" in body:  # "[\t ]+\r\n" has something to match
        body = canonicalization.strip_trailing_whitespace(body)
    # "[\t ]+" -> " " replaces single spaces with themselves: a no-op without these.
    if b"\t" in body or b"  " in body:
        body = canonicalization.compress_whitespace(body)
    return canonicalization.correct_empty_body(  # type: ignore[no-any-return]
        canonicalization.strip_trailing_lines(body)
    )


def relaxed_headers(headers: Sequence[Header]) -> list[Header]:
    """RFC 6376 relaxed header canonicalisation, as dkimpy computes it."""
    unfolded = [value.replace(b"\r\n", b"") for _, value in headers]
    joined = b"".join(unfolded)  # holds each unfolded value: one look at all of them
    if b"\t" in joined or b"  " in joined or b"\r" in joined or b"\n" in joined:
        return DKIMPY_RELAXED_HEADERS(list(headers))  # type: ignore[no-any-return]
    # dkimpy's unfolding ("\r?\n" -> "") and its "[\t ]+" -> " " would change nothing more.
    return [
        (name.lower().rstrip(), value.strip() + b"\r\n")
        for (name, _), value in zip(headers, unfolded, strict=True)
    ]


def select_headers(canonical: Sequence[Header], signed: Sequence[bytes]) -> list[Header]:
    """The fields ``h=`` names, in its order, each name taking the next occurrence from the
    bottom up (RFC 6376 section 5.4.2): dkimpy's ``select_headers``.  ``canonical``: the
    relaxed fields (lower-case names)."""
    by_name = dict(canonical)
    if len(by_name) < len(canonical):  # a name twice: dkimpy's bottom-up search
        return dkim.select_headers(list(canonical), list(signed))  # type: ignore[no-any-return]
    # Each name once: the search finds it the first time it is asked for, then nothing.
    selected = []
    for name in signed:
        value = by_name.pop(name, None)
        if value is not None:
            selected.append((name, value))
    return selected


# -- verification: OpenSSL's RSA under dkimpy's verifier ----------------------------------

DKIMPY_PARSE_PUBLIC_KEY = dkim.parse_public_key
DKIMPY_RSA_VERIFY = dkim.RSASSA_PKCS1_v1_5_verify
OPENSSL_KEY = "openssl"  # the extra key of the dict dkimpy's parse gives: modulus, exponent
OPENSSL_FROM_BITS = 1024  # smaller keys: dkimpy's checks and errors (it refuses them anyway)
# rsa-sha1 too: dkimpy still checks it (RFC 8301 says not to trust it; the verdict's
# algorithm is reported, so an application can tell).
_DIGESTS: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha1": hashes.SHA1(),  # noqa: S303 - verifying what dkimpy verifies, not signing
}


@functools.lru_cache(maxsize=512)
def parse_public_key(data: bytes) -> dict[str, Any]:
    """``dkim.parse_public_key``: the RSA key of a ``p=`` tag (DER SubjectPublicKeyInfo) as
    dkimpy's dict, plus the OpenSSL key.  Remembered: dkimpy's verifier treats it as read
    only, and a sender signs many messages with one key."""
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < OPENSSL_FROM_BITS:
        return DKIMPY_PARSE_PUBLIC_KEY(data)  # type: ignore[no-any-return]
    numbers = key.public_numbers()
    return {"modulus": numbers.n, "publicExponent": numbers.e, OPENSSL_KEY: key}


def rsa_verify(hashed: Any, signature: bytes, public_key: dict[str, Any]) -> bool:
    """``dkim.RSASSA_PKCS1_v1_5_verify``: whether ``signature`` is the RSASSA-PKCS1-v1_5
    signature of ``hashed`` (dkimpy's hash object) with ``public_key``."""
    key = public_key.get(OPENSSL_KEY)
    digest = _DIGESTS.get(str(hashed.name).lower())
    # dkimpy reads the signature as a number: leading zero octets added or missing change
    # nothing for it; OpenSSL wants exactly the modulus's length.
    length = (key.key_size + 7) // 8 if key is not None else 0
    significant = signature.lstrip(b"\0")
    if key is None or digest is None or len(significant) > length:
        return DKIMPY_RSA_VERIFY(hashed, signature, public_key)  # type: ignore[no-any-return]
    signature = significant.rjust(length, b"\0")
    try:
        key.verify(signature, hashed.digest(), padding.PKCS1v15(), utils.Prehashed(digest))
    except InvalidSignature:
        return False
    return True


dkim.parse_public_key = parse_public_key
dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify
# dkimpy's verifier canonicalises every field and the body with its regexes, also where
# they change nothing: relaxed_headers and relaxed_body (the same result, tested) instead,
# 223 -> 168 us per ed25519 signature of a 2 KB message.
canonicalization.Relaxed.canonicalize_headers = staticmethod(relaxed_headers)
canonicalization.Relaxed.canonicalize_body = staticmethod(relaxed_body)
