"""Mail received over SMTP by the ingest role reaches every listening application: a real
SMTP client, the ingest server, and two groups read through the listener API."""

from __future__ import annotations

import aiosmtplib
import redis.asyncio as aioredis

from tests.ingest_util import ingest_config
from tests.listen_util import next_message
from workers.ingest import running_ingest
from workers.listen import Listener

MAIL = (
    b"From: Ann <ann@example.net>\r\n"
    b"To: desk@example.com\r\n"
    b"Subject: =?utf-8?b?w6l0w6k=?=\r\n"
    b"\r\n"
    b"Hello desk\r\n"
)


async def test_message_accepted_over_smtp_reaches_each_group(
    redis: aioredis.Redis, redis_url: str
) -> None:
    async with (
        Listener(redis, "crm", "c1", block=0.05) as crm,
        Listener(redis, "archive", "a1", block=0.05) as archive,
        running_ingest(ingest_config(redis_url)) as server,
    ):
        errors, reply = await aiosmtplib.send(
            MAIL, sender="ann@example.net", recipients=["desk@example.com"],
            hostname="127.0.0.1", port=server.port,
        )  # fmt: skip
        assert errors == {}, reply  # every recipient accepted (250 after the XADD)
        got = [await next_message(crm, 10), await next_message(archive, 10)]
    assert got[0].id == got[1].id
    for message in got:
        assert message.message is not None
        assert message.message["from"] == "ann@example.net"
        assert message.message["to"] == ["desk@example.com"]
        assert message.message["headers"]["subject"] == "été"
        assert message.message["content"]["body"] == b"Hello desk\n"
