"""The Redis layout: every key mailpool uses and every field of every entry it writes or reads.

This module is the only place that spells a key or a field name.  The outside contract
(``contract.md``, ``schema/*.schema.json``) fixes the streams' default names and the fields
of the entries others read (send, receive, dead letter, event); the rest is mailpool's own
(the fields a retry or replay adds to a send entry, the keys under the internal prefix).
Nothing here does I/O: the encoders return the field map an ``XADD``/``HSET`` writes, the
decoders take the ``dict[bytes, bytes]`` a client without ``decode_responses`` reads.

Keys (``StreamKeys``; stream names and the prefix are configurable):

* ``email.receive``, ``email.send``, ``email.send.dead``, ``email.send.events``: streams;
* ``<prefix>retry``: the retry schedule, a sorted set of send-entry ids scored by due time;
* ``<prefix>retry:<entry id>``: a scheduled retry's payload, the hash of its retry entry;
* ``<prefix>sent:<message id>``: the idempotency record, recipient -> time first accepted.

Entries (values are octet strings; numbers are decimal text, floats ``repr``):

* send and receive entries from producers and ingest: ``data`` only;
* a retry entry (:func:`retry_entry`) and a replay entry (:func:`replay_entry`) add to the
  send stream's ``data`` the bookkeeping fields :class:`SendEntry` reads back;
* dead letters (:func:`dead_letter`, read by :class:`DeadLetter`) and events
  (:func:`event`): the fields of the schemas.

Stream ids ``<ms>-<seq>`` are compared and stepped only by the helpers at the end.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# --- keys ----------------------------------------------------------------------------------

DEFAULT_RECEIVE = "email.receive"
DEFAULT_SEND = "email.send"
DEFAULT_DEAD = "email.send.dead"
DEFAULT_EVENTS = "email.send.events"
DEFAULT_PREFIX = "mailpool:"
# How long a send's idempotency record (``sent:<id>``) is kept by default: --sent-ttl.
DEFAULT_SENT_TTL = 604_800  # seconds, 7 days


@dataclass(frozen=True)
class StreamKeys:
    """The names of every key mailpool uses; the internal ones are derived from ``prefix``."""

    receive: str = DEFAULT_RECEIVE
    send: str = DEFAULT_SEND
    dead: str = DEFAULT_DEAD
    events: str = DEFAULT_EVENTS
    prefix: str = DEFAULT_PREFIX
    # Derived once: the settlement builds two of these per message.
    retry_schedule: str = field(init=False)  # sorted set: send entry id -> due time
    retry_payload_prefix: str = field(init=False)  # + entry id: hash of its retry entry
    sent_prefix: str = field(init=False)  # + message id: hash recipient -> accepted at
    bounced_prefix: str = field(init=False)  # + message id: hash recipient -> report entry
    suppressed: str = field(init=False)  # sorted set: address -> suppressed until
    suppressed_why: str = field(init=False)  # hash: address -> JSON, what suppressed it

    def __post_init__(self) -> None:
        object.__setattr__(self, "retry_schedule", self.prefix + "retry")
        object.__setattr__(self, "retry_payload_prefix", self.prefix + "retry:")
        object.__setattr__(self, "sent_prefix", self.prefix + "sent:")
        object.__setattr__(self, "bounced_prefix", self.prefix + "bounced:")
        object.__setattr__(self, "suppressed", self.prefix + "suppressed")
        object.__setattr__(self, "suppressed_why", self.prefix + "suppressed:why")

    def retry_payload(self, entry_id: str) -> str:
        return self.retry_payload_prefix + entry_id

    def sent(self, message_id: str) -> str:
        return self.sent_prefix + message_id

    def bounced(self, message_id: str) -> str:
        """The bounces recorded for a send (one per recipient), kept as long as its record."""
        return self.bounced_prefix + message_id


# --- partitions ----------------------------------------------------------------------------
# Partitioned (on a Redis Cluster, or more than one partition): partition p's keys carry the
# hash tag "{p}", after each stream name and after the prefix, so every key one Redis
# function touches lies in one cluster slot.  Not partitioned: the contract's names as they
# are.  schema/README.md tells producers the same rule.

TAG_CHARACTERS = "{}"


def partition_tag(partition: int) -> str:
    return f"{{{partition}}}"


def partition_keys(keys: StreamKeys, partition: int) -> StreamKeys:
    """The keys of one partition of a partitioned deployment."""
    tag = partition_tag(partition)
    return StreamKeys(
        receive=keys.receive + tag,
        send=keys.send + tag,
        dead=keys.dead + tag,
        events=keys.events + tag,
        prefix=keys.prefix + tag,
    )


def partitions(keys: StreamKeys, count: int, *, tagged: bool) -> tuple[StreamKeys, ...]:
    """Every partition's keys: ``keys`` itself when not ``tagged`` and ``count`` is 1."""
    if count == 1 and not tagged:
        return (keys,)
    return tuple(partition_keys(keys, p) for p in range(count))


def partition_of(message_id: str, count: int) -> int:
    """The partition of a message with an ``id``: CRC-32 (zlib/IEEE) of its UTF-8 bytes
    modulo the partition count, so a same-id send meets its duplicate guard."""
    return zlib.crc32(message_id.encode()) % count


# --- fields --------------------------------------------------------------------------------

DATA = "data"  # every send and receive entry: the msgpack message (contract.md)
DATA_KEY = DATA.encode()  # as read back
MESSAGE_ID = "message_id"  # the idempotency id (message "id", else the source entry id)
SOURCE_ID = "source_id"  # the producer's entry id in the send stream
ATTEMPTS = "attempts"  # SMTP attempts made so far
FIRST_ATTEMPT = "first_attempt"  # epoch seconds
LAST_ATTEMPT = "last_attempt"  # epoch seconds (dead letters)
RECIPIENTS = "recipients"  # JSON array text
REPLAY_OF = "replay_of"  # the dead-letter entry id a replay came from
REASON = "reason"  # dead letters: invalid | rejected | expired | poison | suppressed
ERROR = "error"
SMTP_CODE = "smtp_code"
SMTP_TEXT = "smtp_text"
EVENT = "event"  # events: delivered | deferred | failed | suppressed
EVENT_DELIVERED = "delivered"  # the event of recipients a relay accepted
EVENT_ID = "id"  # events: the message id
NEXT_ATTEMPT = "next_attempt"
STATUS = "status"  # bounced events: the report's Status (RFC 3463)
REPORT_ID = "report_id"  # bounced events: the email.receive entry of the report
DSN = "dsn"  # delivered events: "not_offered" when the message's DSN request went nowhere
DSN_NOT_OFFERED = "not_offered"
# delivered events: "1" when an earlier entry with the same message id sent it to these
# recipients, and this entry sent nothing (its outcome all the same)
ALREADY_SENT = "already_sent"
TIME = "time"

REASON_INVALID = "invalid"
# Recipients not attempted (workers.streams.suppression): the dead letter's reason and the
# event's kind.
SUPPRESSED = "suppressed"
MAX_ERROR_TEXT = 2000

# What an encoder returns: XADD/HSET field -> value (floats already written as text).
Fields = dict[str, str | bytes | int | float]
# What a client without decode_responses reads back.
RawFields = Mapping[bytes, bytes]


def sent_mark(now: str, entry_id: str) -> str:
    """The value of an idempotency record's recipient: when the relay accepted it (epoch
    seconds as text) and the entry whose send it was.  Records written before the entry
    was named hold the time alone."""
    return f"{now} {entry_id}"


def sent_by(mark: bytes, entry_id: str) -> bool:
    """Whether a record's value (:func:`sent_mark`) names ``entry_id``."""
    return bool(entry_id) and mark.endswith(b" " + entry_id.encode())


def recipients_text(recipients: Sequence[str]) -> str:
    """Recipient lists in entries are JSON arrays (readable from any language)."""
    return _json_text(list(recipients))


# json.dumps(..., ensure_ascii=False) builds a new encoder per call (3 us, in every event of
# every delivered message); one encoder with the same settings writes the same text.
_json_text = json.JSONEncoder(ensure_ascii=False).encode


def recipients_from_text(text: bytes | str | None) -> list[str] | None:
    """A recipients field read back; None when absent, ValueError when not an array of text."""
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise ValueError("recipients must be a JSON array of strings")
    return value


def _text(fields: RawFields, name: str) -> str | None:
    value = fields.get(name.encode())
    return None if value is None else value.decode()


# --- send and receive entries --------------------------------------------------------------


def data_entry(data: bytes) -> Fields:
    """A producer's send entry or ingest's receive entry: the packed message alone."""
    return {DATA: data}


def entry_data(fields: RawFields | None) -> bytes | None:
    """The ``data`` field of an entry read back (None: missing, or the entry was trimmed)."""
    return None if fields is None else fields.get(DATA_KEY)


@dataclass(slots=True)
class SendEntry:
    """A send-stream entry read back: a producer's (``data`` only), a retry or a replay."""

    data: bytes
    message_id: str | None = None  # carried by retries and replays
    source_id: str | None = None  # None: the entry is the producer's own (its id is the source)
    attempts: int = 0
    first_attempt: float | None = None
    recipients: list[str] | None = None  # retries and replays: who is still to be sent to
    replay_of: str | None = None

    @classmethod
    def decode(cls, fields: RawFields) -> SendEntry:
        """The entry's fields; ValueError when a bookkeeping field does not parse."""
        data = fields.get(DATA_KEY, b"")
        if len(fields) == 1 and data:  # a producer's entry: nothing else to read
            return cls(data)
        first = _text(fields, FIRST_ATTEMPT)
        return cls(
            data=data,
            message_id=_text(fields, MESSAGE_ID),
            source_id=_text(fields, SOURCE_ID),
            attempts=int(_text(fields, ATTEMPTS) or 0),
            first_attempt=float(first) if first else None,
            recipients=recipients_from_text(fields.get(RECIPIENTS.encode())),
            replay_of=_text(fields, REPLAY_OF),
        )


def retry_entry(
    *,
    data: bytes,
    message_id: str,
    source_id: str,
    attempts: int,
    first_attempt: float,
    recipients: Sequence[str],
    replay_of: str | None = None,
) -> Fields:
    """The send entry a deferred message comes back as (kept in its retry payload hash);
    a replay's retry stays a replay (it still goes to suppressed recipients)."""
    fields: Fields = {
        DATA: data,
        MESSAGE_ID: message_id,
        SOURCE_ID: source_id,
        ATTEMPTS: attempts,
        FIRST_ATTEMPT: repr(first_attempt),
        RECIPIENTS: recipients_text(recipients),
    }
    if replay_of is not None:
        fields[REPLAY_OF] = replay_of
    return fields


def replay_entry(
    *, data: bytes, message_id: str, source_id: str, replay_of: str, recipients: Sequence[str]
) -> Fields:
    """The send entry a replayed dead letter becomes; attempts start again from zero.

    No recipients (unknown, e.g. poison before decoding): all of the message's.
    """
    fields: Fields = {
        DATA: data,
        MESSAGE_ID: message_id,
        SOURCE_ID: source_id,
        REPLAY_OF: replay_of,
    }
    if recipients:
        fields[RECIPIENTS] = recipients_text(recipients)
    return fields


# --- dead letters and events ---------------------------------------------------------------


class SmtpReply(Protocol):
    """An SMTP reply as the transports report it (code None: no reply, e.g. a timeout)."""

    @property
    def code(self) -> int | None: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class MessageRef:
    """What dead letters and events say about the message they concern."""

    message_id: str
    source_id: str
    data: bytes


def dead_letter(
    ref: MessageRef,
    *,
    reason: str,
    error: str,
    recipients: Sequence[str],
    attempts: int,
    first_attempt: float,
    last_attempt: float,
    reply: SmtpReply | None = None,
) -> Fields:
    """Dead-letter entry fields (contract.md): ``data`` untouched plus why it is dead."""
    fields: Fields = {
        DATA: ref.data,
        REASON: reason,
        ERROR: error[:MAX_ERROR_TEXT],
        RECIPIENTS: recipients_text(recipients),
        ATTEMPTS: attempts,
        FIRST_ATTEMPT: repr(first_attempt),
        LAST_ATTEMPT: repr(last_attempt),
        SOURCE_ID: ref.source_id,
        MESSAGE_ID: ref.message_id,
    }
    code = _server_code(reply)
    if reply is not None and code is not None:  # only where a server answered
        fields[SMTP_CODE] = code
        fields[SMTP_TEXT] = reply.text
    return fields


def _server_code(reply: SmtpReply | None) -> int | None:
    """The reply's code when a server gave one (2xx-5xx, as the schemas say), else None: a
    local failure (timeout, connection lost, a reply too long to read) has no SMTP code."""
    if reply is None or reply.code is None or not 200 <= reply.code <= 599:
        return None
    return reply.code


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter read back: what ``mailpool dead`` shows and replays.

    The schema's fields are typed as it says (numbers, the recipients array); a value that
    does not read as its type, and every field this version does not know, stays text in
    ``extra`` so that it is still shown (the schema lets others add fields).
    """

    id: str
    data: bytes = b""  # byte for byte the send entry's data (empty when it had none)
    reason: str | None = None
    error: str | None = None
    recipients: list[str] | None = None
    attempts: int | None = None
    first_attempt: float | None = None
    last_attempt: float | None = None
    source_id: str | None = None
    message_id: str | None = None
    smtp_code: int | None = None
    smtp_text: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # name -> text, as stored
    order: tuple[str, ...] = ()  # every field name but data, in stored order (for display)

    @classmethod
    def decode(cls, entry_id: str, fields: RawFields) -> DeadLetter:
        typed: dict[str, Any] = {}
        extra: dict[str, str] = {}
        names: list[str] = []
        for raw_name, raw_value in fields.items():
            if raw_name == DATA_KEY:
                continue
            name, text = raw_name.decode(errors="replace"), raw_value.decode(errors="replace")
            names.append(name)
            read = DEAD_LETTER_READERS.get(name)
            if read is None:
                extra[name] = text
                continue
            try:
                typed[name] = read(text)
            except ValueError:  # json.JSONDecodeError is a ValueError too
                extra[name] = text
        data = fields.get(DATA_KEY, b"")
        return cls(id=entry_id, data=data, extra=extra, order=tuple(names), **typed)

    def shown(self) -> dict[str, object]:
        """Every field but ``data`` in stored order: typed where it reads, else its text."""
        return {
            name: self.extra[name] if name in self.extra else getattr(self, name)
            for name in self.order
        }

    @property
    def replayable(self) -> bool:
        """Invalid entries are not replayed: the same bytes would fail the same way."""
        return self.reason != REASON_INVALID

    def replay_entry(self) -> Fields:
        """The send entry it becomes: original data, same message id, its recipients.

        ValueError when its recipients field is not a JSON array of text.
        """
        if RECIPIENTS in self.extra:  # stored, but not as an array of text
            recipients_from_text(self.extra[RECIPIENTS])  # raises its ValueError
        source_id = self.source_id or self.id
        return replay_entry(
            data=self.data,
            message_id=self.message_id or source_id,
            source_id=source_id,
            replay_of=self.id,
            recipients=self.recipients or [],
        )


def finite(number: float) -> float:
    """``number``; ValueError for NaN or an infinity (a hand-written field: JSON has none)."""
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number")
    return number


# How each field of the dead-letter schema reads; the keys are DeadLetter's attribute names.
DEAD_LETTER_READERS: dict[str, Callable[[str], object]] = {
    REASON: str,
    ERROR: str,
    RECIPIENTS: recipients_from_text,
    ATTEMPTS: int,
    FIRST_ATTEMPT: lambda text: finite(float(text)),
    LAST_ATTEMPT: lambda text: finite(float(text)),
    SOURCE_ID: str,
    MESSAGE_ID: str,
    SMTP_CODE: int,
    SMTP_TEXT: str,
}


def event(
    kind: str,
    ref: MessageRef,
    recipients: Sequence[str],
    reply: SmtpReply | None,
    now: float,
    *,
    next_attempt: float | None = None,
    dsn_not_offered: bool = False,
    already_sent: bool = False,
) -> Fields:
    """An ``email.send.events`` entry: delivered, deferred (with next_attempt) or failed.

    ``smtp_code`` and ``smtp_text`` are the server's reply, both empty when no server
    answered; then ``error`` says what happened instead (timeout, connection refused).
    """
    code = _server_code(reply)
    fields: Fields = {
        EVENT: kind,
        EVENT_ID: ref.message_id,
        SOURCE_ID: ref.source_id,
        RECIPIENTS: recipients_text(recipients),
        SMTP_CODE: "" if code is None else code,
        SMTP_TEXT: "" if reply is None or code is None else reply.text,
    }
    if reply is not None and code is None and reply.text:
        fields[ERROR] = reply.text[:MAX_ERROR_TEXT]
    if next_attempt is not None:
        fields[NEXT_ATTEMPT] = repr(round(next_attempt, 3))
    if dsn_not_offered:
        fields[DSN] = DSN_NOT_OFFERED
    if already_sent:
        fields[ALREADY_SENT] = "1"
    fields[TIME] = repr(round(now, 3))
    return fields


# --- stream ids ----------------------------------------------------------------------------

MAX_SEQ = 2**64 - 1

# The ids with a special meaning to Redis that mailpool passes; nowhere else spells them.
MIN_ID = "0-0"  # the smallest id: XAUTOCLAIM/XPENDING/XRANGE start at the very beginning,
# XAUTOCLAIM's cursor comes back as it when a pass is complete, and it is the position of a
# group that has read nothing
FROM_START = "0"  # XGROUP CREATE: the group reads the stream's whole retained history;
# XREADGROUP: the consumer's own pending entries (those handed to it and not acknowledged)
NEW_ONLY = "$"  # XGROUP CREATE: the group reads only entries added after it was created
UNDELIVERED = ">"  # XREADGROUP: entries never handed to any consumer of the group


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as numbers (a bare ``"<ms>"`` is sequence 0), for comparing ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def is_entry_id(text: str) -> bool:
    """True for a whole stream entry id, ``<ms>-<seq>``, each part a 64-bit number."""
    match = _ENTRY_ID.fullmatch(text)
    return match is not None and all(int(part) < 2**64 for part in match.groups())


def format_id(ms: int, seq: int = 0) -> str:
    return f"{ms}-{seq}"


def id_after(entry_id: str) -> str:
    """The smallest id after ``entry_id`` (an XTRIM MINID that drops it and keeps the next)."""
    ms, seq = parse_id(entry_id)
    return format_id(ms + 1, 0) if seq == MAX_SEQ else format_id(ms, seq + 1)


def id_before(entry_id: str) -> str:
    """The id just before ``entry_id``: XREADGROUP returns ids after the one given."""
    ms, seq = parse_id(entry_id)
    if seq:
        return format_id(ms, seq - 1)
    return format_id(ms - 1, MAX_SEQ) if ms else MIN_ID


def id_at(epoch: float) -> str:
    """The first id Redis can generate at ``epoch`` seconds (a MINID for trimming by age)."""
    return format_id(int(epoch * 1000))


def id_time(entry_id: str) -> float:
    """Epoch seconds at which Redis generated an auto id."""
    return parse_id(entry_id)[0] / 1000


def exclusive(entry_id: str) -> str:
    """An XRANGE bound that leaves ``entry_id`` out."""
    return "(" + entry_id


# --- status snapshot -----------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStatus:
    consumers: int
    pending: int
    lag: int | None  # None: unknown, never a guess (a 0 would say "caught up")
    oldest_pending_seconds: float | None
    last_delivered_id: str | None


@dataclass(frozen=True)
class StreamStatus:
    length: int
    groups: dict[str, GroupStatus]


@dataclass(frozen=True)
class Snapshot:
    """What ``mailpool status`` shows and the stream gauges export."""

    streams: dict[str, StreamStatus]  # the streams that exist, by name
    dead_letters: int
    retries_waiting: int
    next_retry_at: float | None  # epoch seconds

    def as_json(self) -> dict[str, Any]:
        """The contract's JSON shape of ``mailpool status --json``."""
        return asdict(self)
