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
* for a status that blames the address (``5.1.x`` but the sender's ``5.1.7``/``5.1.8``,
  ``5.2.1``), the recipient to the suppression list for ``--suppress-ttl`` seconds.

A recipient matches by its Final-Recipient or its Original-Recipient (an alias expanded on
the way), case-insensitively and in either form of an internationalised domain; the event
names it as the send did.  Once per send and recipient: ``<prefix>bounced:<id>`` (a hash,
recipient -> report entry, expiring with the send's record) remembers what was recorded, so
a report received twice makes one event.

The group's entries are acknowledged as read; an application's own groups still see every
bounce.  Records of sends are kept ``--sent-ttl`` (7 days): a bounce later than that names
no send.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import redis.asyncio as aioredis
import structlog

from workers.codec.build import sent_message_id
from workers.codec.report import REPORTED_MESSAGE_ID, REPORTED_RECIPIENTS
from workers.streams import layout, suppression
from workers.streams.consumer import ensure_group
from workers.streams.layout import Fields, StreamKeys
from workers.streams.suppression import REASON_BOUNCED, Suppression, SuppressionList

log = structlog.get_logger("mailpool.bounces")

GROUP = "mailpool-bounces"
CONSUMER = "housekeeping"
BATCH = 500
PASS_BUDGET = 10.0  # seconds one pass may read one partition's backlog for
MAX_FAILURES = 3  # readings of one entry that failed before it is dropped
EVENT_BOUNCED = "bounced"
_DIAGNOSTIC = re.compile(r"(?:smtp|x-[\w-]+)\s*;\s*([2-5]\d\d)[ -]?(.*)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class _Reply:
    code: int | None
    text: str


@dataclass(frozen=True)
class Bounce:
    message_id: str  # the send's idempotency id
    recipient: str  # as the report names it (Final-Recipient); as sent once matched
    status: str
    reply: _Reply
    report_id: str  # the email.receive entry of the report
    # Original-Recipient's address: the one we sent to when the receiving side expanded it
    # (an alias, a forward) into the Final-Recipient (RFC 3464 section 2.3.1).
    original: str = ""
    diagnostic: str = ""  # the Diagnostic-Code as given (reply is its SMTP reply, if any)

    def names(self) -> tuple[str, ...]:
        """The addresses it may name a recipient of ours by, as the list keys them."""
        return tuple(suppression.normalise(a) for a in (self.recipient, self.original) if a)


def bounces_in(entry_id: str, message: dict[str, Any]) -> list[Bounce]:
    """The failed recipients of a received report that names one of our sends."""
    report = message.get("delivery_report")
    if not isinstance(report, dict):
        return []
    message_id = sent_message_id(str(report.get(REPORTED_MESSAGE_ID, "")))
    if message_id is None:
        return []
    found = []
    for recipient in report.get(REPORTED_RECIPIENTS, []):
        if not isinstance(recipient, dict) or recipient.get("action") != "failed":
            continue
        diagnostic = str(recipient.get("diagnostic_code", ""))
        match = _DIAGNOSTIC.match(diagnostic)
        reply = _Reply(int(match.group(1)), match.group(2).strip()) if match else _Reply(None, "")
        status = str(recipient.get("status", ""))
        found.append(Bounce(message_id, str(recipient.get("address", "")), status, reply,
                            entry_id, str(recipient.get("original_address", "")),
                            diagnostic))  # fmt: skip
    return found


def bounce_event(bounce: Bounce, now: float) -> Fields:
    fields: Fields = {
        layout.EVENT: EVENT_BOUNCED,
        layout.EVENT_ID: bounce.message_id,
        layout.RECIPIENTS: layout.recipients_text([bounce.recipient]),
        layout.STATUS: bounce.status,
        layout.SMTP_CODE: "" if bounce.reply.code is None else bounce.reply.code,
        layout.SMTP_TEXT: bounce.reply.text[: layout.MAX_ERROR_TEXT],
        layout.REPORT_ID: bounce.report_id,
        layout.TIME: repr(round(now, 3)),
    }
    return fields


class BounceReader:
    """The bounce reports received since the last pass: ``copies`` is (client, keys) per
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
        self._failures: dict[str, int] = {}  # entry id -> failed readings (in this process)

    async def read_once(self, partition: int, budget: float = PASS_BUDGET) -> int:
        """Read this partition's entries until caught up (or ``budget`` seconds): first the
        group's own pending ones (a pass that failed midway), then new ones.  The bounces
        recorded.  The group holds back trimming of ``email.receive`` while it lags."""
        redis, keys = self.copies[partition]
        await ensure_group(redis, keys.receive, GROUP, start=layout.NEW_ONLY)
        deadline = time.monotonic() + budget
        recorded = 0
        for start in (layout.FROM_START, layout.UNDELIVERED):
            while time.monotonic() < deadline:
                batch = await self._read(redis, keys.receive, start)
                for entry_id, fields in batch:
                    recorded += await self._handle(redis, keys.receive, entry_id, fields)
                if len(batch) < BATCH:
                    break
        return recorded

    @staticmethod
    async def _read(
        redis: aioredis.Redis, stream: str, start: str
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        reply: Any = await redis.xreadgroup(GROUP, CONSUMER, {stream: start}, count=BATCH)
        rows = []
        for _, entries in reply or []:
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                rows.append((entry_id, fields or {}))  # {}: trimmed while pending
        return rows

    async def _handle(
        self, redis: aioredis.Redis, stream: str, entry_id: str, fields: dict[bytes, bytes]
    ) -> int:
        """Record one entry's bounces and acknowledge it; an entry whose recording keeps
        failing is dropped after MAX_FAILURES passes (logged), so it never blocks the
        stream's trimming for good."""
        try:
            recorded = await self._record(entry_id, fields)
        except (aioredis.RedisError, OSError) as exc:
            failures = self._failures.get(entry_id, 0) + 1
            self._failures[entry_id] = failures
            if failures < MAX_FAILURES:
                raise  # stays pending: the next pass reads it first
            log.error("bounce_dropped", report=entry_id, error=str(exc), failures=failures)
            recorded = 0
        self._failures.pop(entry_id, None)
        await redis.xack(stream, GROUP, entry_id)
        return recorded

    async def _record(self, entry_id: str, fields: dict[bytes, bytes]) -> int:
        data = fields.get(layout.DATA_KEY)
        if data is None or b"delivery_report" not in data:  # most mail: no unpacking
            return 0
        try:
            message = msgpack.unpackb(data, raw=False)
        except Exception:  # an entry no consumer can read is not a bounce of ours
            return 0
        if not isinstance(message, dict) or message.get("from") is not None:
            return 0  # reports come from the null sender (RFC 3464 section 2)
        recorded = 0
        # message id -> partition, recipients reached (as the list keys them -> as sent)
        accepted: dict[str, tuple[int, dict[str, str]]] = {}
        for bounce in bounces_in(entry_id, message):
            if bounce.message_id not in accepted:
                accepted[bounce.message_id] = await self._sent_record(bounce.message_id)
            number, reached = accepted[bounce.message_id]
            sent_to = next((reached[n] for n in bounce.names() if n in reached), None)
            if sent_to is not None:
                matched = replace(bounce, recipient=sent_to)
                recorded += await self._record_bounce(matched, number, shared=len(reached) > 1)
        return recorded

    async def _sent_record(self, message_id: str) -> tuple[int, dict[str, str]]:
        """The partition holding the send's idempotency record and the recipients in it
        (keyed as the suppression list keys addresses: case and IDN forms match).  A send
        with an ``id`` is in the partition its id maps to; one without (the id is its entry
        id) may be in any, so each is asked."""
        count = len(self.copies)
        if layout.is_entry_id(message_id):
            candidates = list(range(count))
        else:
            candidates = [layout.partition_of(message_id, count)]
        for number in candidates:
            redis, keys = self.copies[number]
            sent = await redis.hkeys(keys.sent(message_id))
            if sent:
                return number, {suppression.normalise(_text(k)): _text(k) for k in sent}
        return candidates[0], {}

    async def _record_bounce(self, bounce: Bounce, number: int, *, shared: bool) -> bool:
        """The event (and the suppression), once per send and recipient: a report received
        again (a resend, a second copy) records nothing.  Marked after the event, so a
        failure in between makes a second event, never none.

        ``shared``: the send reached other recipients too.  Each of them holds its
        Message-ID and could forge a report naming this one, so it suppresses nobody."""
        redis, keys = self.copies[number]
        bounced = keys.bounced(bounce.message_id)
        if await redis.hexists(bounced, bounce.recipient):
            log.info("bounce_repeated", id=bounce.message_id, recipient=bounce.recipient,
                     report=bounce.report_id)  # fmt: skip
            return False
        now = time.time()
        event: Any = bounce_event(bounce, now)
        await redis.xadd(keys.events, event, maxlen=self.events_maxlen, approximate=True)
        log.info("bounced", id=bounce.message_id, recipient=bounce.recipient,
                 status=bounce.status, report=bounce.report_id)  # fmt: skip
        if (
            self.suppress_ttl > 0
            and not shared
            and suppression.report_refuses_the_address(
                bounce.status, bounce.reply, bounce.diagnostic
            )
        ):
            await self._suppression.add([Suppression(
                address=suppression.normalise(bounce.recipient), until=now + self.suppress_ttl,
                reason=REASON_BOUNCED, since=now, code=bounce.reply.code,
                text=bounce.reply.text[:200], message_id=bounce.message_id,
            )])  # fmt: skip
        await self._mark(redis, keys, bounce)
        return True

    @staticmethod
    async def _mark(redis: aioredis.Redis, keys: StreamKeys, bounce: Bounce) -> None:
        """Remember the bounce as long as the send's record lives (a later report matches
        no send anyway)."""
        bounced = keys.bounced(bounce.message_id)
        await redis.hset(bounced, bounce.recipient, bounce.report_id)
        ends = int(await redis.pexpiretime(keys.sent(bounce.message_id)))
        if ends > 0:
            await redis.pexpireat(bounced, ends)
        else:  # the record has no end (or went meanwhile): as long as records last by default
            await redis.expire(bounced, layout.DEFAULT_SENT_TTL)


async def forget_group(redis: aioredis.Redis, stream: str) -> None:
    """With bounce reading off, the group is removed: a group left behind would hold back
    the stream's trimming for good."""
    try:
        destroyed = await redis.xgroup_destroy(stream, GROUP)
    except aioredis.ResponseError:  # no such stream
        return
    if destroyed:
        log.info("group_removed", stream=stream, group=GROUP)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
