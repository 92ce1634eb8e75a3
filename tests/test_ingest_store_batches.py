"""ReceiveStream against a real Redis that stops answering (SIGSTOP): batches are capped by
octets, a message's wait grows with the octets ahead of it, and when the wait runs out its
451 says whether the XADD had left (it may be stored) or never did (it never will be)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.delivery_util import redis_stalled
from tests.harness import RedisServer
from workers.streams.connection import connect_for_writes
from workers.streams.receive import SLOWEST_RATE, ReceiveStream, StoreError, _Pending

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


async def test_the_appends_of_the_next_loop_turns_join_the_batch(redis_url: str) -> None:
    """Sessions whose data arrived together reach the end of DATA a loop turn or two apart:
    their messages go out in one batch, not one each (Redis then reads them in half as many
    pieces: bench/redis_floor.py)."""
    client = connect_for_writes(redis_url)
    stream = ReceiveStream(client, "email.receive")
    sizes: list[int] = []
    take = stream._next_batch

    def counted() -> list[_Pending]:
        batch = take()
        sizes.append(len(batch))
        return batch

    async def after(turns: int, data: bytes) -> str:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await stream.append(data)

    try:
        await stream.append(b"warm-up")  # the writer's connection is up
        sizes.clear()
        stream._next_batch = counted  # type: ignore[method-assign]
        await asyncio.gather(after(0, b"a"), after(1, b"b"), after(2, b"c"))
    finally:
        await client.aclose()
    assert [size for size in sizes if size] == [3]  # another writer may find none left
