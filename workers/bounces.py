"""Bounce reports received by ingest -> ``bounced`` events and the suppression list.

Ingest stores a received delivery status report (RFC 3464) with a ``delivery_report`` key
(:mod:`workers.codec.report`).  Housekeeping reads ``email.receive`` in its own consumer
group, ``mailpool-bounces`` (created at the stream's end on the first pass: mail received
before it is not looked at), and for each report whose ``Message-ID`` is one delivery made
(:func:`workers.codec.build.sent_message_id`: the send's ``id``, or its entry id) and each
recipient with ``Action: failed`` that the send's idempotency record says a relay accepted
(so a forged or foreign report names no send of ours), it adds:

* a ``bounced`` event to ``email.send.events`` (of the partition the id maps to): ``id``,
  ``recipients``, ``status``, ``smtp_code``/``smtp_text`` from the report's
  ``Diagnostic-Code``, ``report_id`` (the bounce's ``email.receive`` entry), ``time``;
* for a status that blames the address (``5.1.x``, ``5.2.1``), the recipient to the
  suppression list for ``--suppress-ttl`` seconds.

The group's entries are acknowledged as read; an application's own groups still see every
bounce.  Records of sends are kept ``--sent-ttl`` (7 days): a bounce later than that names
no send.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import redis.asyncio as aioredis
import structlog

from workers.codec.build import sent_message_id
from workers.streams import layout, suppression
from workers.streams.consumer import ensure_group
from workers.streams.layout import Fields, StreamKeys
from workers.streams.suppression import Suppression, SuppressionList

log = structlog.get_logger("mailpool.bounces")

GROUP = "mailpool-bounces"
CONSUMER = "housekeeping"
BATCH = 500
EVENT_BOUNCED = "bounced"
_DIAGNOSTIC = re.compile(r"(?:smtp|x-[\w-]+)\s*;\s*([2-5]\d\d)[ -]?(.*)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class _Reply:
    code: int | None
    text: str


@dataclass(frozen=True)
class Bounce:
    message_id: str  # the send's idempotency id
    recipient: str
    status: str
    reply: _Reply
    report_id: str  # the email.receive entry of the report


def bounces_in(entry_id: str, message: dict[str, Any]) -> list[Bounce]:
    """The failed recipients of a received report that names one of our sends."""
    report = message.get("delivery_report")
    if not isinstance(report, dict):
        return []
    message_id = sent_message_id(str(report.get("message_id", "")))
    if message_id is None:
        return []
    found = []
    for recipient in report.get("recipients", []):
        if not isinstance(recipient, dict) or recipient.get("action") != "failed":
            continue
        match = _DIAGNOSTIC.match(str(recipient.get("diagnostic_code", "")))
        reply = _Reply(int(match.group(1)), match.group(2).strip()) if match else _Reply(None, "")
        found.append(Bounce(message_id, str(recipient.get("address", "")), str(
            recipient.get("status", "")), reply, entry_id))  # fmt: skip
    return found


def bounce_event(bounce: Bounce, now: float) -> Fields:
    fields: Fields = {
        layout.EVENT: EVENT_BOUNCED,
        layout.EVENT_ID: bounce.message_id,
        layout.RECIPIENTS: layout.recipients_text([bounce.recipient]),
        "status": bounce.status,
        layout.SMTP_CODE: "" if bounce.reply.code is None else bounce.reply.code,
        layout.SMTP_TEXT: bounce.reply.text[: layout.MAX_ERROR_TEXT],
        "report_id": bounce.report_id,
        layout.TIME: repr(round(now, 3)),
    }
    return fields


class BounceReader:
    """One pass over the reports received since the last: ``copies`` is (client, keys) per
    partition, in partition order."""

    def __init__(
        self,
        copies: Sequence[tuple[aioredis.Redis, StreamKeys]],
        *,
        suppress_ttl: float,
        events_maxlen: int = 100_000,
    ) -> None:
        self.copies = list(copies)
        self.suppress_ttl = suppress_ttl
        self.events_maxlen = events_maxlen
        self._suppression = SuppressionList(self.copies)

    async def read_once(self, partition: int) -> int:
        """Read this partition's new receive entries; the bounces recorded."""
        redis, keys = self.copies[partition]
        await ensure_group(redis, keys.receive, GROUP, start="$")
        reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = cast(
            "Any", await redis.xreadgroup(GROUP, CONSUMER, {keys.receive: ">"}, count=BATCH)
        )
        recorded = 0
        for _, entries in reply or []:
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                recorded += await self._record(entry_id, fields)
                await redis.xack(keys.receive, GROUP, entry_id)
        return recorded

    async def _record(self, entry_id: str, fields: dict[bytes, bytes]) -> int:
        data = fields.get(layout.DATA_KEY)
        if data is None or b"delivery_report" not in data:  # most mail: no unpacking
            return 0
        try:
            message = msgpack.unpackb(data, raw=False)
        except Exception:  # an entry no consumer can read is not a bounce of ours
            return 0
        bounces = bounces_in(entry_id, message) if isinstance(message, dict) else []
        recorded = 0
        for bounce in bounces:
            if await self._record_bounce(bounce):
                recorded += 1
        return recorded

    async def _record_bounce(self, bounce: Bounce) -> bool:
        number = layout.partition_of(bounce.message_id, len(self.copies))
        redis, keys = self.copies[number]
        sent = await redis.hgetall(keys.sent(bounce.message_id))
        accepted = {k.decode().lower() if isinstance(k, bytes) else str(k).lower() for k in sent}
        if bounce.recipient.lower() not in accepted:
            return False  # no send of ours reached this recipient under that id
        now = time.time()
        event: Any = bounce_event(bounce, now)
        await redis.xadd(keys.events, event, maxlen=self.events_maxlen, approximate=True)
        log.info("bounced", id=bounce.message_id, recipient=bounce.recipient,
                 status=bounce.status, report=bounce.report_id)  # fmt: skip
        reply = _Reply(bounce.reply.code or 550, f"{bounce.status} {bounce.reply.text}")
        if self.suppress_ttl > 0 and suppression.refuses_the_address(reply):
            await self._suppression.add([Suppression(
                address=suppression.normalise(bounce.recipient), until=now + self.suppress_ttl,
                reason="bounced", since=now, code=bounce.reply.code, text=bounce.reply.text[:200],
                message_id=bounce.message_id,
            )])  # fmt: skip
        return True
