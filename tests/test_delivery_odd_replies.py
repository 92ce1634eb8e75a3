"""Replies a relay may give that are SMTP but out of the ordinary: octets in the text that are
not UTF-8 (a Latin-1 "ç" of a localised MTA), and a positive reply other than 250.  Each
message still goes to the relay once, and its outcome is recorded as the reply said (found
by an adversarial review: the first crashed the settler, and both sent messages again)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    run_until_settled,
    send_message,
    stream_fields,
)
from tests.scripted_relay import ScriptedRelay
from workers.relay import Reply

LATIN_1_DOT = b"250 2.0.0 Ok: queued, message re\xe7u"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_latin_1_in_the_reply_to_the_dot_is_recorded_escaped(
    redis: aioredis.Redis, redis_url: str, pipelining: bool
) -> None:
    """The text came back from aiosmtplib and our reply reader with a lone surrogate, which
    no UTF-8 encoder takes: packing the settlement raised, the settler stopped the worker
    with nothing recorded, and the next worker sent the three messages again."""
    relay = ScriptedRelay(replies={b".": LATIN_1_DOT}, pipelining=pipelining)
    for n in range(3):
        await enqueue(redis, send_message(message_id=f"latin-{n}"))
    async with relay.running() as url:
        await run_until_settled(redis, make_config(redis_url, url, concurrency=1))
    assert relay.messages == 3
    rows = await events(redis)
    assert [(e["event"], e["smtp_code"]) for e in rows] == [("delivered", "250")] * 3
    assert {e["smtp_text"] for e in rows} == {"2.0.0 Ok: queued, message re\\xe7u"}


async def test_latin_1_in_a_refusal_reaches_the_dead_letter(
    redis: aioredis.Redis, redis_url: str
) -> None:
    relay = ScriptedRelay(replies={b"RCPT": b"550 5.1.1 destinataire inconnu \xe0 ce jour"})
    await enqueue(redis, send_message(message_id="latin-refused"))
    async with relay.running() as url:
        await run_until_settled(redis, make_config(redis_url, url, suppress_ttl=0))
    [letter] = await stream_fields(redis, "email.send.dead")
    assert (letter["reason"], letter["smtp_code"]) == ("rejected", "550")
    assert letter["smtp_text"] == "5.1.1 destinataire inconnu \\xe0 ce jour"
    assert relay.messages == 0


@pytest.mark.parametrize("pipelining", [True, False])
async def test_any_positive_reply_to_the_dot_means_the_relay_took_it(
    redis: aioredis.Redis, redis_url: str, pipelining: bool
) -> None:
    """RFC 5321 section 4.2.1: 2yz is done.  A 251 to the dot was read as a refusal: the
    message was deferred, sent again on each attempt, and dead-lettered as expired."""
    relay = ScriptedRelay(replies={b".": b"251 2.0.0 queued as ABC"}, pipelining=pipelining)
    await enqueue(redis, send_message(message_id="two-five-one"))
    async with relay.running() as url:
        await run_until_settled(redis, make_config(redis_url, url, max_attempts=3))
    assert relay.messages == 1
    assert [(e["event"], e["smtp_code"]) for e in await events(redis)] == [("delivered", "251")]


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("message re\udce7u", "message re\\xe7u"),  # a relay's octet, as surrogateescape has it
        ("odd \ud800 half", "odd \\ud800 half"),  # no decoder's: escaped as the code point
        ("Grüße", "Grüße"),  # UTF-8 stays as it is
    ],
)
def test_reply_text_is_always_valid_utf8(text: str, stored: str) -> None:
    assert Reply(250, text).text == stored
    assert Reply(250, text).text.encode("utf-8")
