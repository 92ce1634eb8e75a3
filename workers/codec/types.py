"""The shapes of spec messages as Python sees them after msgpack decoding.

Spec keys (from the Email ASGI draft) are spelled exactly as in the spec; everything
else is a mailpool extension documented in ``schema/README.md``.  A consumer that only
knows the spec can ignore every extension key.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

SCHEMA_VERSION = 1

# Content objects use hyphenated spec keys, so they are declared with the functional syntax.
Content = TypedDict(
    "Content",
    {
        # spec: the whole Content-Type field value with its parameters
        "content-type": str,
        # spec: multipart only
        "parts": NotRequired[list["Content"]],
        # spec: every non-multipart part; bytes after transfer decoding
        # (on send, a str is accepted and encoded as UTF-8)
        "body": NotRequired[bytes],
        # extension: the part's own MIME fields except Content-Type (kept when unreadable;
        # non-root parts only), lower-cased names, values decoded like message headers
        "headers": NotRequired[dict[str, str]],
        # extension: the filename (Content-Disposition filename or Content-Type name):
        # an RFC 2231 form decoded and literal, a plain form RFC 2047-decoded
        "filename": NotRequired[str],
    },
)


# "from" is a Python keyword, so the messages use the functional TypedDict syntax too.
ReceiveMessage = TypedDict(
    "ReceiveMessage",
    {
        # spec keys
        "from": str | None,  # envelope return path; None for MAIL FROM:<>
        "to": list[str],  # envelope recipients, at least one
        "headers": dict[str, str],  # lower-cased names; repeated fields joined with "\n"
        "content": Content,
        # extensions
        "id": NotRequired[str],  # mailpool message id, unique per received message
        "version": NotRequired[int],  # SCHEMA_VERSION of the producer
        "received_at": NotRequired[float],  # epoch seconds
        "size": NotRequired[int],  # raw message size in octets
        "header_list": NotRequired[list[list[str]]],  # ordered [name, value], original case
        "defects": NotRequired[list[str]],  # parser defects, "path: description"
        "raw": NotRequired[bytes],  # the message bytes as received, when kept
        "dsn": NotRequired[dict[str, object]],  # RFC 3461 parameters (workers.codec.dsn)
        "auth": NotRequired[dict[str, Any]],  # verdicts (workers.verify; schema/README.md)
        "delivery_report": NotRequired[dict[str, Any]],  # a bounce (workers.codec.report)
    },
)

SendMessage = TypedDict(
    "SendMessage",
    {
        # spec keys (same as receive)
        "from": str | None,  # envelope MAIL FROM; None sends with the null sender <>
        "to": list[str],
        "headers": dict[str, str],
        "content": Content,
        # extensions
        "id": NotRequired[str],  # idempotency id: one id is sent at most once per recipient
        "version": NotRequired[int],
        "header_list": NotRequired[list[list[str]]],  # when present, used instead of headers
        "max_attempts": NotRequired[int],  # per-message override of --max-attempts
        "max_age": NotRequired[float],  # per-message override of --max-age, seconds
        "ignore_suppression": NotRequired[bool],  # sent even to suppressed recipients
        "dsn": NotRequired[dict[str, object]],  # RFC 3461 parameters (workers.codec.dsn)
        # DKIM: false = not signed; {"selector": s} = signed by that key of the From domain
        "dkim": NotRequired[bool | dict[str, str]],
    },
)
