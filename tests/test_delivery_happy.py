"""Happy path: UTF-8 headers, attachments, several recipients, pooled connections, events."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    run_until_settled,
    send_message,
    with_attachment,
)
from tests.sinks import RecordingSink


async def test_utf8_headers_and_attachment_reach_the_relay(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    message = send_message(
        ["ann@example.com", "bob@example.com"],
        subject="Grüße aus Köln ✉",
        text="Hallo Zoë,\nanbei die Rechnung.\n",
    )
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 8
    with_attachment(message, "Rechnung März.pdf", pdf)
    entry_id = await enqueue(redis, message)
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert len(sink.received) == 1
    got = sink.received[0]
    assert sorted(got.rcpt_tos) == ["ann@example.com", "bob@example.com"]
    assert got.mail_from == "app@example.com"
    parsed = got.message
    assert parsed["subject"] == "Grüße aus Köln ✉"
    attachments = list(parsed.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["Rechnung März.pdf"]
    assert attachments[0].get_content() == pdf
    body = parsed.get_body(("plain",))
    assert body is not None and "Zoë" in body.get_content()
    delivered = [e for e in await events(redis) if e["event"] == "delivered"]
    assert len(delivered) == 1
    assert delivered[0]["source_id"] == entry_id
    assert delivered[0]["id"] == entry_id  # no message id: derived from the entry id
    assert sorted(delivered[0]["recipients"]) == ["ann@example.com", "bob@example.com"]
    assert delivered[0]["smtp_code"] == "250"
    assert await redis.xlen("email.send.dead") == 0


async def test_many_messages_share_few_connections(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    for n in range(60):
        await enqueue(redis, send_message([f"user{n}@example.com"], message_id=f"bulk-{n}"))
    await run_until_settled(redis, make_config(redis_url, sink.url, concurrency=4))
    assert len(sink.received) == 60
    assert 1 <= sink.ehlo_count <= 4  # pooled: at most one connection per slot
    ids = {e["id"] for e in await events(redis) if e["event"] == "delivered"}
    assert ids == {f"bulk-{n}" for n in range(60)}
    sent_keys = await redis.keys("mailpool:sent:bulk-*")
    assert len(sent_keys) == 60
    assert 0 < await redis.ttl("mailpool:sent:bulk-0") <= 604_800


async def test_group_created_from_the_start_of_the_stream(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Sends queued before any worker existed are delivered (group from id 0, not $)."""
    await enqueue(redis, send_message(["early@example.com"]))
    assert await redis.exists("email.send") == 1
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert [r.rcpt_tos for r in sink.received] == [("early@example.com",)]


async def test_messages_per_connection_replaces_connections(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    for n in range(9):
        await enqueue(redis, send_message([f"u{n}@example.com"]))
    config = make_config(redis_url, sink.url, concurrency=1, messages_per_connection=3)
    await run_until_settled(redis, config)
    assert len(sink.received) == 9
    assert sink.ehlo_count == 3


async def test_lines_starting_with_a_dot_arrive_intact(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Dot-stuffing (RFC 5321 4.5.2): a lone "." line in the body does not end DATA early,
    and the relay's de-stuffed copy is the message we built, octet for octet."""
    text = ".\n..two dots\n.leading dot\nlast line\n.\n"
    await enqueue(redis, send_message(text=text, message_id="dots-1"))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    [got] = sink.received
    body = got.data.split(b"\r\n\r\n", 1)[1]
    assert body == b".\r\n..two dots\r\n.leading dot\r\nlast line\r\n.\r\n"


async def test_first_message_on_a_connection_announces_its_size(
    redis: aioredis.Redis, redis_url: str, make_sink: Callable[..., RecordingSink]
) -> None:
    """EHLO happens when the connection opens (also without STARTTLS), so even the first
    MAIL carries SIZE= when the relay offers it."""
    relay = make_sink(size_limit=1_000_000)
    await enqueue(redis, send_message(message_id="size-1"))
    await run_until_settled(redis, make_config(redis_url, relay.url, concurrency=1, starttls="off"))
    [got] = relay.received
    assert [o for o in got.mail_options if o.startswith("SIZE=")] == [f"SIZE={len(got.data)}"]
