"""Delivery status reports (RFC 3464 bounces) in received mail, read into a structured key.

A bounce is ``multipart/report; report-type=delivery-status`` (RFC 6522) with a
``message/delivery-status`` part (``message/global-delivery-status``, RFC 6533, too): one
block of per-message fields, then a block per recipient, in header syntax.  The third part,
``message/rfc822`` or ``text/rfc822-headers``, names the message that bounced
(``Message-ID``).  :func:`delivery_report` gives the receive entry's ``delivery_report``::

    {"reporting_mta": "dns; mx.example.org", "original_envelope_id": "QQ314159",
     "message_id": "<order-1.5f3c0a1b2c3d@mailpool.example>",
     "recipients": [{"final_recipient": "rfc822; bob@example.org", "address":
                     "bob@example.org", "action": "failed", "status": "5.1.1",
                     "diagnostic_code": "smtp; 550 5.1.1 no such user",
                     "original_recipient": "rfc822; bob@example.org",
                     "original_address": "bob@example.org",
                     "remote_mta": "dns; mx.example.org"}]}

Keys appear only when the report has the field; ``action`` is lower case.  No I/O; a report
that cannot be read gives None (the message is stored all the same).
"""

from __future__ import annotations

import contextlib
import re
from email.parser import HeaderParser
from email.policy import compat32
from typing import Any

from workers.codec.dsn import utf8_addr_decode

_STATUS_PARTS = ("message/delivery-status", "message/global-delivery-status")
_ORIGINAL_PARTS = (
    "message/rfc822", "text/rfc822-headers", "message/global", "message/global-headers"
)  # fmt: skip
_BLOCK_BREAK = re.compile(rb"\r?\n[ \t]*\r?\n")
_PER_MESSAGE = {
    "reporting-mta": "reporting_mta",
    "original-envelope-id": "original_envelope_id",
    "arrival-date": "arrival_date",
}
_PER_RECIPIENT = {
    "final-recipient": "final_recipient",
    "original-recipient": "original_recipient",
    "action": "action",
    "status": "status",
    "diagnostic-code": "diagnostic_code",
    "remote-mta": "remote_mta",
    "last-attempt-date": "last_attempt_date",
}
REPORTED_MESSAGE_ID = "message_id"  # the key naming the Message-ID of what bounced
REPORTED_RECIPIENTS = "recipients"  # the key of the per-recipient reports
MAX_RECIPIENTS = 1000
MAX_VALUE = 1000
# Octets of one block read: real blocks are a few hundred; the stdlib's header parser
# takes seconds over megabytes of folded lines (a hostile report, parsed at ingest).
MAX_BLOCK = 64 << 10
_parser = HeaderParser(policy=compat32)


def _media_type(content: dict[str, Any]) -> str:
    return str(content.get("content-type", "")).split(";", 1)[0].strip().lower()


def delivery_report(content: dict[str, Any]) -> dict[str, Any] | None:
    """The ``delivery_report`` of a received message's root ``content``, or None."""
    if _media_type(content) != "multipart/report":
        return None
    # report-type=delivery-status is required (RFC 6522), but some MTAs leave it out: the
    # delivery-status part decides.
    parts = [p for p in content.get("parts", []) if isinstance(p, dict)]
    status = next((p for p in parts if _media_type(p) in _STATUS_PARTS), None)
    if status is None or not isinstance(status.get("body"), bytes):
        return None
    blocks = [b for b in _BLOCK_BREAK.split(status["body"].strip()) if b.strip()]
    if not blocks:
        return None
    # The per-message fields come first, but some MTAs write them into the first
    # recipient's block (AOL's relays) or leave them out (no Reporting-MTA): every block
    # with a Final-Recipient is a recipient's, the first one included.
    report = _fields(blocks[0], _PER_MESSAGE)
    recipients = []
    for block in blocks[: MAX_RECIPIENTS + 1]:
        recipient = _fields(block, _PER_RECIPIENT)
        if "final_recipient" not in recipient or "action" not in recipient:
            continue
        recipient["action"] = recipient["action"].lower()
        recipient["address"] = _address(recipient["final_recipient"])
        if "original_recipient" in recipient:
            recipient["original_address"] = _address(recipient["original_recipient"])
        recipients.append(recipient)
    if not recipients:
        return None
    report[REPORTED_RECIPIENTS] = recipients
    original = next((p for p in parts if _media_type(p) in _ORIGINAL_PARTS), None)
    message_id = _message_id(original) if original is not None else None
    if message_id:
        report[REPORTED_MESSAGE_ID] = message_id
    return report


def _fields(block: bytes, names: dict[str, str]) -> dict[str, Any]:
    # UTF-8: message/global-delivery-status (RFC 6533) carries it raw; a delivery-status
    # part is ASCII, which reads the same.
    parsed = _parser.parsestr(block[:MAX_BLOCK].strip().decode("utf-8", "replace") + "\n")
    found: dict[str, Any] = {}
    for name, key in names.items():
        value = parsed.get(name)
        if value is not None:
            text = " ".join(str(value).split())  # unfolded
            found[key] = text[:MAX_VALUE]
    return found


def _address(typed: str) -> str:
    """``rfc822; <bob@example.org>`` -> ``bob@example.org``; a ``utf-8`` address type's
    ``\\x{HEX}`` escapes (RFC 6533 section 3) decoded."""
    kind, semicolon, address = typed.partition(";")
    address = (address if semicolon else typed).strip().strip("<>").strip()
    if semicolon and kind.strip().lower() == "utf-8":
        with contextlib.suppress(ValueError):
            return utf8_addr_decode(address)
    return address


def _message_id(original: dict[str, Any]) -> str | None:
    body = original.get("body")
    if not isinstance(body, bytes):
        return None
    head = _BLOCK_BREAK.split(body, maxsplit=1)[0]
    value = _parser.parsestr(head.decode("utf-8", "replace") + "\n").get("message-id")
    return " ".join(str(value).split()) if value else None
