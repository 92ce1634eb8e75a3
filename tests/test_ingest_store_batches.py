"""ReceiveStream against a real Redis that stops answering (SIGSTOP): batches are capped by
octets, a message's wait grows with the octets ahead of it, and when the wait runs out its
451 says whether the XADD had left (it may be stored) or never did (it never will be)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.delivery_util import redis_stalled
from tests.harness import RedisServer
from workers.streams.connection import connect_for_writes
from workers.streams.receive import SLOWEST_RATE, ReceiveStream, StoreError

MIB = 1 << 20


async def test_a_batch_is_capped_by_octets_and_queued_messages_are_never_stored(
    make_redis: Callable[..., RedisServer],
) -> None:
    server = make_redis()
    client = connect_for_writes(server.url)
    stream = ReceiveStream(client, "email.receive", store_timeout=1.0, max_in_flight=1)
    try:
        await stream.append(b"warm-up")  # the writer's connection is up before the stall
        with redis_stalled(server):
            # 3 x 5 MiB, under the 256-message cap: one batch would hold them all, the
            # 8 MiB cap lets the first go out alone.
            results = await asyncio.gather(
                *(stream.append(bytes([n]) * (5 * MIB), f"m{n}") for n in range(3)),
                return_exceptions=True,
            )
        for result in results:
            assert isinstance(result, StoreError) and result.reason == "timeout", result
        assert [r.maybe_stored for r in results if isinstance(r, StoreError)] == [
            True,
            False,
            False,
        ]
        # The wait grows with the octets queued ahead: 1 s + 5, 10, 15 MiB at SLOWEST_RATE.
        waits = [f"within {1 + (n + 1) * 5 * MIB / SLOWEST_RATE:.0f} s" for n in range(3)]
        assert [str(r).endswith(w) for r, w in zip(results, waits, strict=True)] == [True] * 3
        # Once Redis resumes, the XADD that had left runs (the logged late store); the
        # queued ones were dropped with their 451.
        deadline = asyncio.get_running_loop().time() + 10
        while await client.xlen("email.receive") < 2:
            assert asyncio.get_running_loop().time() < deadline, "the first XADD never ran"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stored = [fields[b"data"][:1] for _, fields in await client.xrange("email.receive")]
        assert stored == [b"w", b"\x00"]
    finally:
        await client.aclose()
