"""A one-shot command's write is sent once: `mailpool send` (and `dead`) never re-send a
command whose reply was lost, since Redis may have run it (an XADD without an ``id`` would
then be enqueued, and sent, twice).  A lost reply is one line and exit 1; the operator
looks before running it again."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import redis_stalled
from tests.harness import RedisServer
from workers.streams.connection import (
    ONE_SHOT_SOCKET_TIMEOUT,
    RedisUnavailable,
    one_shot_client,
)


async def test_a_write_whose_reply_was_lost_is_not_sent_again(
    redis_server: RedisServer, redis_url: str, redis: aioredis.Redis
) -> None:
    assert redis_server.process is not None
    loop = asyncio.get_running_loop()
    with pytest.raises(RedisUnavailable, match="cannot use Redis"):
        async with one_shot_client(redis_url) as client:
            with redis_stalled(redis_server):
                # Redis comes back after the client gave up on the reply: the XADD sent
                # before then runs now; a retry sent meanwhile would run as well.
                loop.call_later(
                    ONE_SHOT_SOCKET_TIMEOUT + 1.5, redis_server.process.send_signal, signal.SIGCONT
                )
                await client.xadd("email.send", {"data": b"once"})
    await asyncio.sleep(0.5)
    assert await redis.xlen("email.send") == 1
