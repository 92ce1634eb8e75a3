"""The Redis layout module (workers/streams/layout.py) against a real redis-server.

Entries written by its encoders (through the same Redis functions and commands the roles
use) read back to the same values with its decoders, the fields on the wire are the
contract's, dead-letter replay keeps ``data`` byte for byte, the stream-id helpers agree
with Redis's own order, and no other module of the package spells a field or key itself.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import redis.asyncio as aioredis

from workers.deadletters import DeadConfig, Partition, replay_dead
from workers.streams import layout
from workers.streams.consumer import GroupConsumer
from workers.streams.layout import MessageRef, SendEntry, StreamKeys
from workers.streams.outcomes import Outcomes, Retry, Settlement
from workers.streams.snapshot import collect_status

KEYS = StreamKeys()
NOT_UTF8 = b"\x93\xa4data\xff\x00\r\n"  # any octets: data is never decoded on the way


async def read_send_entry(redis: aioredis.Redis, consumer: str) -> tuple[str, SendEntry]:
    reader = GroupConsumer(redis, KEYS.send, "delivery", consumer, claim_after=60)
    (entry,) = await reader.read_new()
    assert entry.fields is not None
    return entry.id, SendEntry.decode(entry.fields)


async def test_a_retry_entry_settled_promoted_and_read_decodes_to_what_was_written(
    redis: aioredis.Redis,
) -> None:
    await redis.xgroup_create(KEYS.send, "delivery", id="0", mkstream=True)
    first_id = await redis.xadd(KEYS.send, layout.data_entry(NOT_UTF8))
    entry_id, producer_entry = await read_send_entry(redis, "w1")
    assert entry_id == first_id.decode()
    assert producer_entry == SendEntry(NOT_UTF8)  # a producer's entry: data alone
    retry = layout.retry_entry(
        data=NOT_UTF8, message_id="order-1", source_id=entry_id, attempts=2,
        first_attempt=1700000000.125, recipients=["ann@example.org", "bö@example.org"],
    )  # fmt: skip
    outcomes = Outcomes(redis, KEYS, group="delivery", sent_ttl=60, events_maxlen=100)
    try:
        retried = Retry(due=1.0, fields=retry)
        settled = Settlement(entry_id=entry_id, message_id="order-1", retry=retried)
        assert await outcomes.settle([settled], now=time.time()) == [True]
        payload = await redis.hgetall(KEYS.retry_payload(entry_id))
        assert await outcomes.promote_due(time.time()) == 1
    finally:
        await outcomes.aclose()
    _, promoted = await read_send_entry(redis, "w2")
    assert promoted == SendEntry(
        data=NOT_UTF8, message_id="order-1", source_id=entry_id, attempts=2,
        first_attempt=1700000000.125, recipients=["ann@example.org", "bö@example.org"],
    )  # fmt: skip
    # The payload hash holds the retry entry as written, field for field and in order.
    assert list(payload) == [b"data", b"message_id", b"source_id", b"attempts",
                             b"first_attempt", b"recipients"]  # fmt: skip
    assert payload[b"first_attempt"] == b"1700000000.125"


async def dead_letter_of(redis: aioredis.Redis, *, reason: str, recipients: list[str]) -> str:
    ref = MessageRef(message_id="order-7", source_id="1700000000000-3", data=NOT_UTF8)
    fields = layout.dead_letter(
        ref, reason=reason, error="550 no", recipients=recipients, attempts=3,
        first_attempt=1.5, last_attempt=2.5,
    )  # fmt: skip
    return (await redis.xadd(KEYS.dead, fields)).decode()


async def test_a_replayed_dead_letter_keeps_data_byte_for_byte(redis: aioredis.Redis) -> None:
    dead_id = await dead_letter_of(redis, reason="rejected", recipients=["cy@example.org"])
    config = DeadConfig(_action="replay", _ids=[dead_id])
    assert await replay_dead([Partition(0, redis, KEYS, qualified=False)], config) == 0
    assert await redis.xlen(KEYS.dead) == 0
    ((_, fields),) = await redis.xrange(KEYS.send)
    assert fields[b"data"] == NOT_UTF8
    assert SendEntry.decode(fields) == SendEntry(
        data=NOT_UTF8, message_id="order-7", source_id="1700000000000-3",
        recipients=["cy@example.org"], replay_of=dead_id,
    )  # fmt: skip
    assert list(fields) == [b"data", b"message_id", b"source_id", b"replay_of", b"recipients"]


async def test_a_dead_letter_reads_back_typed_and_keeps_what_it_does_not_know(
    redis: aioredis.Redis,
) -> None:
    class Reply:
        code: int | None = 550
        text = "5.1.1 no such user"

    ref = MessageRef(message_id="order-8", source_id="1700000000000-4", data=NOT_UTF8)
    fields = layout.dead_letter(
        ref, reason="rejected", error="550 no", recipients=["cy@example.org"], attempts=3,
        first_attempt=1.5, last_attempt=2.5, reply=Reply(),
    )  # fmt: skip
    fields["ticket"] = "OPS-42"  # a field some other tool added
    dead_id = (await redis.xadd(KEYS.dead, fields)).decode()
    ((_, stored),) = await redis.xrange(KEYS.dead)
    letter = layout.DeadLetter.decode(dead_id, stored)
    assert letter == layout.DeadLetter(
        id=dead_id, data=NOT_UTF8, reason="rejected", error="550 no",
        recipients=["cy@example.org"], attempts=3, first_attempt=1.5, last_attempt=2.5,
        source_id="1700000000000-4", message_id="order-8", smtp_code=550,
        smtp_text="5.1.1 no such user", extra={"ticket": "OPS-42"},
        order=tuple(name for name in fields if name != "data"),
    )  # fmt: skip
    assert letter.shown()["ticket"] == "OPS-42"
    # A value that does not read as the schema's type is kept as its text, not dropped.
    unreadable = layout.DeadLetter.decode(dead_id, {b"attempts": b"many", b"smtp_code": b"5x"})
    assert (unreadable.attempts, unreadable.extra) == (
        None,
        {"attempts": "many", "smtp_code": "5x"},
    )
    assert unreadable.shown() == {"attempts": "many", "smtp_code": "5x"}


async def test_a_dead_letter_without_recipients_replays_to_all_and_invalid_stays(
    redis: aioredis.Redis,
) -> None:
    unknown = await dead_letter_of(redis, reason="poison", recipients=[])
    invalid = await dead_letter_of(redis, reason="invalid", recipients=["x@example.org"])
    config = DeadConfig(_action="replay", _ids=[unknown, invalid])
    assert await replay_dead([Partition(0, redis, KEYS, qualified=False)], config) == 0
    ((_, fields),) = await redis.xrange(KEYS.send)
    assert b"recipients" not in fields  # unknown: the message's own recipients
    assert [entry_id for entry_id, _ in await redis.xrange(KEYS.dead)] == [invalid.encode()]


def test_dead_letter_and_event_fields_are_the_contracts() -> None:
    class Reply:
        code: int | None = 451
        text = "4.7.1 try later"

    ref = MessageRef("m", "1-0", b"x")
    dead = layout.dead_letter(
        ref, reason="expired", error="e" * 3000, recipients=["a@example.org"], attempts=5,
        first_attempt=1.0, last_attempt=2.0, reply=Reply(),
    )  # fmt: skip
    assert list(dead) == [
        "data", "reason", "error", "recipients", "attempts", "first_attempt", "last_attempt",
        "source_id", "message_id", "smtp_code", "smtp_text",
    ]  # fmt: skip
    assert len(str(dead["error"])) == 2000
    deferred = layout.event("deferred", ref, ["a@example.org"], Reply(), 3.0, next_attempt=9.5)
    assert deferred == {
        "event": "deferred", "id": "m", "source_id": "1-0", "recipients": '["a@example.org"]',
        "smtp_code": 451, "smtp_text": "4.7.1 try later", "next_attempt": "9.5", "time": "3.0",
    }  # fmt: skip
    Reply.code = None  # no server reply: the text says what happened instead
    failed = layout.event("failed", ref, [], Reply(), 3.0)
    assert (failed["smtp_code"], failed["smtp_text"], failed["error"]) == ("", "", Reply.text)


async def test_the_stream_id_helpers_follow_redis_order(redis: aioredis.Redis) -> None:
    ids = ["5-0", "5-1", f"5-{layout.MAX_SEQ}", "6-0"]
    for entry_id in ids:
        await redis.xadd("ids", {"n": entry_id}, id=entry_id)
    for before, after in [ids[0:2], ids[2:4]]:  # neighbours: no id can lie between them
        assert layout.id_after(before) == after
        assert layout.id_before(after) == before
        # XRANGE from just before an id starts at it; an exclusive bound skips it
        (first, *_) = await redis.xrange("ids", min=layout.exclusive(layout.id_before(after)))
        assert first[0].decode() == after
    assert layout.id_before("0-0") == "0-0"
    assert layout.id_time("1700000000123-4") == 1700000000.123
    assert layout.id_at(1700000000.1234) == "1700000000123-0"
    assert await redis.xtrim("ids", minid=layout.id_after("6-0")) == 4


async def test_the_status_snapshot_json_has_the_contract_shape(redis: aioredis.Redis) -> None:
    await redis.xadd(KEYS.send, layout.data_entry(b"m"))
    await redis.xgroup_create(KEYS.send, "delivery", id="0")
    status = (await collect_status(redis, KEYS)).as_json()
    assert json.loads(json.dumps(status)) == {
        "streams": {KEYS.send: {"length": 1, "groups": {"delivery": {
            "consumers": 0, "pending": 0, "lag": 1, "oldest_pending_seconds": None,
            "last_delivered_id": "0-0",
        }}}},
        "dead_letters": 0, "retries_waiting": 0, "next_retry_at": None,
    }  # fmt: skip


def test_keys_are_derived_from_the_prefix() -> None:
    keys = StreamKeys(prefix="app1:")
    assert (keys.retry_schedule, keys.retry_payload("1-0"), keys.sent("m")) == (
        "app1:retry", "app1:retry:1-0", "app1:sent:m",
    )  # fmt: skip


# -- no field or key spelled outside the layout ---------------------------------------------

WORKERS = Path(__file__).resolve().parent.parent / "workers"
LAYOUT = WORKERS / "streams" / "layout.py"
# Names that only mean a Redis field or key of ours wherever they appear as a literal.
SPELLED_BY_LAYOUT = {
    layout.MESSAGE_ID, layout.SOURCE_ID, layout.ATTEMPTS, layout.FIRST_ATTEMPT,
    layout.LAST_ATTEMPT, layout.RECIPIENTS, layout.REPLAY_OF, layout.SMTP_CODE,
    layout.SMTP_TEXT, layout.NEXT_ATTEMPT, layout.DEFAULT_PREFIX, layout.DEFAULT_RECEIVE,
    layout.DEFAULT_SEND, layout.DEFAULT_DEAD, layout.DEFAULT_EVENTS, layout.DATA,
}  # fmt: skip
# Stream ids with a special meaning to Redis (start positions, cursors): named by the layout.
STREAM_IDS = {layout.MIN_ID, layout.FROM_START, layout.NEW_ONLY, layout.UNDELIVERED}
# Where one of those words means something else; each says what.
OTHER_MEANINGS = {
    ("streams/consumer.py", "message_id"): "redis-py's name for an XPENDING row's entry id",
    ("listen.py", "data"): "the key of a listen JSON line (documented output format)",
    ("ingest/handler.py", "message_id"): "the codec's keyword for the Message-ID it adds",
    ("config.py", "0"): "a false boolean in an environment variable",
    ("streams/sentinel.py", "0"): "the database number a Sentinel URL without one means",
    ("streams/outcomes.py", "0"): "the due time of a settlement section that is not a retry",
    ("relay/__init__.py", ">"): "the end of the path in MAIL FROM:<...> and RCPT TO:<...>",
    ("ingest/handler.py", ">"): "the end of the address in the Received header's for <...>",
    ("delivery/held.py", ">"): "the end of a held entry's repr <HeldEntry ...>",
    ("ingest/server.py", ">"): "the end of the path in MAIL FROM:<...> and RCPT TO:<...>",
    ("streams/suppression.py", "message_id"): "a key of a suppression's JSON reason",
}


def spelled_literals(path: Path) -> set[str]:
    """str and bytes constants of a module that are neither docstrings nor ``__slots__``."""
    tree = ast.parse(path.read_text(), str(path))
    slots = {
        id(constant)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
        for constant in ast.walk(node.value)
    }
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings | slots:
            if isinstance(node.value, bytes):
                found.add(node.value.decode("latin-1"))
            elif isinstance(node.value, str):
                found.add(node.value)
    return found


def test_no_module_but_the_layout_spells_a_field_key_or_stream_id() -> None:
    spelled = []
    for path in sorted(WORKERS.rglob("*.py")):
        where = path.relative_to(WORKERS).as_posix()
        if path == LAYOUT or where.startswith("codec/"):  # the codec's keys are the spec's
            continue
        for literal in sorted(spelled_literals(path) & (SPELLED_BY_LAYOUT | STREAM_IDS)):
            if (where, literal) not in OTHER_MEANINGS:
                spelled.append(f"{where}: {literal!r}")
    assert spelled == []
