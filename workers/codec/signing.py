"""DKIM signatures on built messages (RFC 6376; ed25519-sha256 by RFC 8463, rsa-sha256).

The key table says which keys sign a message: those of the ``From:`` address's domain, else
of its nearest parent domain in the table, else the ``*`` line's (which signs as the
``From:`` domain itself).  A domain with an ed25519 and an rsa key signs with both.  The
signature covers the exact bytes the builder wrote and is the last thing added, so nothing
changes the message after it (relaxed/relaxed canonicalisation, ``From`` over-signed).

Pure like the rest of the codec: keys arrive loaded (``load_key`` reads PEM bytes; the
configuration reads the files), and nothing here logs.  A private key's ``repr`` is hidden.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from workers.codec import dkimpy_fence
from workers.codec.encode import idna_domain, single_address
from workers.codec.errors import BuildError

ED25519 = "ed25519-sha256"
RSA = "rsa-sha256"
RSA_MIN_BITS = 1024  # RFC 8301 section 3.2: signers MUST use at least 1024 bits
ANY_DOMAIN = "*"
_ED25519_SIGNATURE = 64  # crypto_sign returns the signature, then the message

# Signed when present, every instance (RFC 6376 section 5.4.1's list, less the fields relays
# add or rewrite); From once more besides (over-signed: ``_signed_names``).
SIGNED_FIELDS = (
    b"from", b"reply-to", b"sender", b"to", b"cc", b"subject", b"date", b"message-id",
    b"in-reply-to", b"references", b"mime-version", b"content-type",
    b"content-transfer-encoding", b"content-disposition", b"list-id", b"list-unsubscribe",
    b"list-unsubscribe-post", b"feedback-id",
)  # fmt: skip
_SIGNED_SET = frozenset(SIGNED_FIELDS)
_FIELD_START = re.compile(rb"\r\n(?![ \t])")
# DNS labels of 63 octets at most (RFC 1035), underscores allowed (a TXT owner name).
_SELECTOR = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
)
_DOMAINKEY = "._domainkey."
NAME_MAX = 253  # octets of a DNS name (RFC 1035), the selector's record's included


PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class SigningKey:
    """One line of the key table: ``domain`` is an A-label, or ``*`` (the From domain)."""

    domain: str
    selector: str
    private_key: PrivateKey = field(repr=False, compare=False)
    source: str = ""  # where it came from ("keys.txt:3"), for messages
    # ed25519 signs with libsodium (PyNaCl, dkimpy's own ed25519 library): 18 µs a signature
    # against OpenSSL's 31 µs, the same bytes (ed25519 signatures are deterministic).
    _sodium_key: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            seed = self.private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            secret = nacl.bindings.crypto_sign_seed_keypair(seed)[1]
            object.__setattr__(self, "_sodium_key", secret)

    @property
    def algorithm(self) -> str:
        return ED25519 if self._sodium_key is not None else RSA

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature over a SHA-256 digest (RFC 8463: ed25519 signs the digest itself)."""
        if self._sodium_key is not None:
            return nacl.bindings.crypto_sign(digest, self._sodium_key)[:_ED25519_SIGNATURE]
        assert isinstance(self.private_key, rsa.RSAPrivateKey)
        return self.private_key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

    def public_record(self) -> str:
        """The DNS TXT record to publish at ``selector._domainkey.domain``."""
        public = self.private_key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={_b64(raw)}"
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={_b64(der)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_key(pem: bytes) -> PrivateKey:
    """A PEM private key (PKCS#8 or traditional), or ValueError saying what is wrong with it
    (never its content)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the key is encrypted: give it unencrypted (a mounted Secret)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits: at least {RSA_MIN_BITS}")
        return key
    raise ValueError(f"a key of type {type(key).__name__}: DKIM signs with ed25519 or rsa")


@dataclass(frozen=True)
class KeyLine:
    """One line of the key table as written."""

    domain: str
    selector: str
    path: str
    number: int


def parse_key_table(text: str) -> list[KeyLine]:
    """``DOMAIN SELECTOR PATH`` lines; ``#`` starts a comment.  ValueError names the line."""
    lines: list[KeyLine] = []
    seen: set[tuple[str, str]] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 3:
            raise ValueError(
                f"line {number}: expected DOMAIN SELECTOR PATH, got {len(words)} words"
            )
        domain, selector, path = words
        domain = _table_domain(domain.rstrip(".").lower(), number)
        if not _SELECTOR.fullmatch(selector):
            raise ValueError(f"line {number}: selector {selector!r} is not a DNS label sequence")
        if (domain, selector.lower()) in seen:  # DNS names: case does not tell them apart
            raise ValueError(f"line {number}: {domain} {selector} is given twice")
        if domain != ANY_DOMAIN and len(selector + _DOMAINKEY + domain) > NAME_MAX:
            raise ValueError(f"line {number}: {selector}{_DOMAINKEY}{domain} is too long")
        seen.add((domain, selector.lower()))
        lines.append(KeyLine(domain, selector, path, number))
    return lines


def _table_domain(domain: str, number: int) -> str:
    if domain == ANY_DOMAIN:
        return domain
    ascii_domain = host_name(domain)
    if ascii_domain is None:
        hint = " ('*' alone is the line for every other domain)" if "*" in domain else ""
        raise ValueError(f"line {number}: {domain!r} is not a domain name{hint}")
    return ascii_domain


def host_name(domain: str) -> str | None:
    """``domain`` as ``d=`` holds it (a lower-case A-label host name, no final dot), or
    None when it is not one."""
    try:
        ascii_domain = idna_domain(domain.rstrip(".").lower(), "domain").lower()
    except BuildError:
        return None
    return ascii_domain if is_host_name(ascii_domain) else None


class KeyTable:
    """The signing keys by domain, looked up by a message's author domain."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.by_domain: dict[str, list[SigningKey]] = {}
        for key in keys:
            self.by_domain.setdefault(key.domain, []).append(key)

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def keys_for(self, author_domain: str | None) -> tuple[str, list[SigningKey]] | None:
        """(d= domain, keys) for mail from ``author_domain``, or None: not signed."""
        if author_domain is None:
            return None
        labels = author_domain.split(".")
        for start in range(len(labels) - 1):
            parent = ".".join(labels[start:])
            if parent in self.by_domain:
                return parent, self.by_domain[parent]
        default = self.by_domain.get(ANY_DOMAIN)
        return (author_domain, default) if default else None


def author_domain(from_field: str) -> str | None:
    """:func:`find_author_domain`, remembered for the From fields a worker sees again and
    again (bulk mail repeats its From; a long field is not kept)."""
    if len(from_field) > _REMEMBERED_FROM:
        return find_author_domain(from_field)
    return _remembered_author_domain(from_field)


_REMEMBERED_FROM = 256  # octets: 1024 of them at most in memory


def find_author_domain(from_field: str) -> str | None:
    """The domain of the ``From:`` field's one address, a lower-case A-label of two or more
    labels; None when there is not exactly one unambiguous address (a list, a group, two
    addresses, a malformed field: no single author domain to sign for, RFC 7489 section 6.6.1)
    or its domain is not a DNS host name (an address literal, a single label)."""
    found = _SIMPLE_MAILBOX.fullmatch(from_field.strip(" \t"))
    spec = (found[1] or found[2]) if found else single_address(from_field)
    if spec is None:
        return None
    try:
        domain = idna_domain(spec.rpartition("@")[2].rstrip(".").lower(), "headers.From")
    except BuildError:
        return None
    return domain if is_host_name(domain) else None


_remembered_author_domain = functools.lru_cache(maxsize=1024)(find_author_domain)


_ATOMS = r'[^<>@\s"(),:;\[\]\\]+'  # a local part or domain with nothing that needs parsing
# The commonest forms, ``a@b`` and ``Name <a@b>`` (plain words), without the tokeniser.
_SIMPLE_MAILBOX = re.compile(
    rf"""(?:[^\x00-\x20"(),:;<>@\[\]\\]+\ +)*<({_ATOMS}@{_ATOMS})>  # words <addr-spec>
      | ({_ATOMS}@{_ATOMS})                                    # a bare addr-spec""",
    re.VERBOSE,
)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
# Two labels or more, the last with a letter (not an address: 10.0.0.10).
_HOST_NAME = re.compile(rf"(?=.{{4,253}}\Z)(?:{_LABEL}\.)+(?=[a-z0-9-]*[a-z]){_LABEL}")


def is_host_name(domain: str) -> bool:
    """An ASCII DNS host name of two labels or more (letters, digits, hyphens; lower case):
    what ``d=`` may hold, and what the key table's domains must be."""
    return _HOST_NAME.fullmatch(domain) is not None


def signature_fields(
    data: bytes,
    table: KeyTable,
    author: str | None,
    *,
    selector: str | None = None,
    now: float | None = None,
) -> bytes:
    """The ``DKIM-Signature`` fields to put in front of ``data`` (b"" when no key signs).

    ``selector``: the message's own choice among its domain's keys (BuildError when the
    domain has no key of that selector).
    """
    found = table.keys_for(author)
    if found is None:
        if selector is not None:
            raise BuildError("dkim.selector", f"no signing key for {author or 'the From domain'}")
        return b""
    domain, keys = found
    if not is_host_name(domain):  # d= must be a host name (no spaces, no ";", no "=")
        return b""
    if selector is not None:
        keys = [key for key in keys if key.selector.lower() == selector.lower()]  # DNS names
        if not keys:
            raise BuildError("dkim.selector", f"no key of selector {selector!r} for {domain}")
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[: end + 2], data[end + 4 :])
    headers = [field for field in _header_fields(head) if field[0].lower() in _SIGNED_SET]
    signed = _signed_names(tuple(name.lower() for name, _ in headers))
    if signed is None:
        return b""
    body_hash = _b64(_sha256(dkimpy_fence.relaxed_body(body))).encode("ascii")
    canonical = dkimpy_fence.relaxed_headers(headers)
    fields = b"".join(
        name + b":" + value for name, value in dkimpy_fence.select_headers(canonical, signed)
    )
    stamp = str(int(time.time() if now is None else now)).encode("ascii")
    tail = [b"t=" + stamp + b";", b"bh=" + body_hash + b";", b"b="]
    out = []
    for key in keys:
        if len(key.selector + _DOMAINKEY + domain) > NAME_MAX:  # a '*' key, a long domain
            continue
        text, lines, line = _field_start(key.algorithm, domain, key.selector, signed)
        # No tag holds a tab or a run of spaces, and the field is folded only at its spaces:
        # the joined tags are also the field's relaxed form (RFC 6376 section 3.4.2), which
        # is hashed last, its b= empty and without a CRLF (section 3.7).
        unsigned = text + b" ".join(tail)
        digest = _sha256(fields + b"dkim-signature:" + unsigned)
        lines, line = _fold(tail, lines, line)
        out.append(_fold_signature(base64.b64encode(key.sign_digest(digest)), lines, line))
    return b"".join(out)


@functools.lru_cache(maxsize=256)
def _signed_names(present: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """``h=`` for a header whose signed fields are ``present`` (lower-case names, in order);
    None for two From fields (no single author to sign for).

    Every instance of a field is signed (a second Subject above the signed one would be what
    mail programs show), and From once more than it occurs: over-signed, so that no From
    can be added (RFC 6376 section 8.15).
    """
    counts = Counter(present)
    if counts[b"from"] > 1:
        return None
    return (*[name for name in SIGNED_FIELDS for _ in range(counts[name])], b"from")


@functools.lru_cache(maxsize=256)
def _field_start(
    algorithm: str, domain: str, selector: str, signed: tuple[bytes, ...]
) -> tuple[bytes, bytes, bytes]:
    """The tags every message of this key and header shape shares (v, a, c, d, s, h): their
    text, and their folded form as complete lines (each with its CRLF) and the open line."""
    tags = [
        b"v=1;", b"a=" + algorithm.encode() + b";", b"c=relaxed/relaxed;",
        b"d=" + domain.encode() + b";", b"s=" + selector.encode() + b";",
        b"h=" + b" : ".join(signed) + b";",
    ]  # fmt: skip
    lines, line = _fold(tags, b"", b"DKIM-Signature:")
    return b" ".join(tags) + b" ", lines, line


_LINE = 76  # octets of a folded line, CRLF not counted (RFC 5322 asks for 78 at most)


def _fold(pieces: list[bytes], lines: bytes, line: bytes) -> tuple[bytes, bytes]:
    """``pieces`` appended after ``line``, each after a space, starting a new line (a fold:
    CRLF before that space, which unfolds to the space again) where the line would pass
    ``_LINE``, also at the spaces inside a long piece."""
    for piece in pieces:
        if len(line) + 1 + len(piece) <= _LINE:
            line += b" " + piece
            continue
        for word in piece.split(b" "):
            if len(line) + 1 + len(word) > _LINE:
                lines += line + b"\r\n"
                line = b""
            line += b" " + word
    return lines, line


def _fold_signature(signature: bytes, lines: bytes, line: bytes) -> bytes:
    """The whole field: ``signature`` after the open ``line`` (which ends in ``b=``), cut
    where a line is full: verifiers ignore white space in ``b=`` (section 3.5)."""
    while signature:
        if len(line) >= _LINE:
            lines += line + b"\r\n"
            line = b" "
        room = _LINE - len(line)
        line, signature = line + signature[:room], signature[room:]
    return lines + line + b"\r\n"


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _header_fields(head: bytes) -> list[dkimpy_fence.Header]:
    """(name, value) of each field of a header block (CRLF-terminated, folds kept)."""
    fields = []
    for line in _FIELD_START.split(head.removesuffix(b"\r\n")):
        name, _, value = line.partition(b":")
        fields.append((name, value + b"\r\n"))
    return fields
