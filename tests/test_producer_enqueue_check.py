"""The Python producer refuses, at enqueue, a message the delivery worker would only
dead-letter as ``invalid`` a moment later: the same builder checks it first."""

from __future__ import annotations

import re

import pytest
import redis.asyncio as aioredis

from workers.codec.errors import BuildError
from workers.producer import enqueue_send, make_send_message


@pytest.mark.parametrize(
    ("sender", "recipients", "reason"),
    [
        ("not an address", ["b@example.com"], "from: invalid envelope address 'not an address'"),
        ("a@example.com", ["b@example.com", "bob"], "to[1]: envelope address 'bob' has no domain"),
        ("a@example.com", ["b@exa mple.com"], "to[0]: invalid envelope address"),
    ],
)
async def test_undeliverable_envelope_is_refused_and_nothing_is_enqueued(
    redis: aioredis.Redis, sender: str, recipients: list[str], reason: str
) -> None:
    with pytest.raises(BuildError, match=re.escape(reason)):
        await enqueue_send(redis, from_=sender, to=recipients, text="x")
    assert await redis.exists("email.send") == 0


def test_a_header_the_builder_cannot_write_is_refused_when_the_message_is_made() -> None:
    with pytest.raises(
        BuildError, match=re.escape("headers.message-id: non-ASCII text cannot be encoded")
    ):
        make_send_message(
            from_="a@example.com", to="b@example.com", headers={"Message-ID": "<é@x>"}
        )


async def test_a_deliverable_message_is_enqueued(redis: aioredis.Redis) -> None:
    entry_id = await enqueue_send(redis, from_="<>", to=["b@example.com"], text="x")
    assert [e[0].decode() for e in await redis.xrange("email.send")] == [entry_id]
