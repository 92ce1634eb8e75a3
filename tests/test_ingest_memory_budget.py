"""The ingest memory budget on real sessions: a SIZE= the budget has no room for is refused
at MAIL FROM with 452 4.3.1 (and a declared size holds nothing), a message that outgrows
the budget while it arrives is drained and refused with 452 4.3.1 after the final dot, and
whatever a transaction held is given back when it ends (reply, a dropped connection), so
the next sender gets in."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import redis_stalled
from tests.harness import RedisServer, wait_until
from tests.ingest_util import SMTPConn, entries, ingest, ingest_config, message, send_one
from workers.config import ConfigError, cgroup_memory_limit
from workers.ingest import IngestServer

MiB = 1 << 20
BUDGET = 3 * MiB
LINE = b"z" * 78 + b"\r\n"


async def _mail(port: int, size: int | None = None) -> tuple[SMTPConn, int, str]:
    conn = await SMTPConn.open_session(port)
    code, text = await conn.cmd("MAIL FROM:<a@example.org>" + (f" SIZE={size}" if size else ""))
    return conn, code, text


def _budget_used(
    server: IngestServer, at_least: int, at_most: int
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return at_least <= server.budget.used <= at_most

    return check


async def _holding(port: int, octets: int) -> SMTPConn:
    """A session in the middle of DATA, ``octets`` of its message sent (and held)."""
    conn, code, _ = await _mail(port)
    assert code == 250
    assert (await conn.cmd("RCPT TO:<b@example.com>"))[0] == 250
    assert (await conn.cmd("DATA"))[0] == 354
    await conn.send(b"Subject: held\r\n\r\n" + LINE * (octets // len(LINE)))
    return conn


async def test_a_declared_size_with_no_room_is_refused_at_mail(redis_url: str) -> None:
    async with ingest(redis_url, max_size=BUDGET, memory_budget=BUDGET) as server:
        # A declared size is checked, not reserved: idle sessions hold nothing.
        idle = [(await _mail(server.port, BUDGET))[:2] for _ in range(3)]
        assert [code for _, code in idle] == [250] * 3
        assert server.budget.used == 0
        holder = await _holding(server.port, 2 * MiB)
        await wait_until(_budget_used(server, 2 * MiB - 2 * len(LINE), 2 * MiB), timeout=5)
        sender, code, text = await _mail(server.port, MiB + MiB // 2)
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        await holder.send(b".\r\n")
        assert (await holder.reply())[0] == 250
        assert server.budget.used == 0  # the reply ended the transaction
        assert (await sender.cmd(f"MAIL FROM:<a@example.org> SIZE={MiB + MiB // 2}"))[0] == 250
        for conn in [holder, sender] + [conn for conn, _ in idle]:
            await conn.close()


async def test_a_message_that_outgrows_the_budget_is_refused_after_the_dot(
    redis_url: str, redis: aioredis.Redis
) -> None:
    big = message("big", ("y" * 78 + "\r\n") * (MiB // 80))
    async with ingest(redis_url, max_size=BUDGET, memory_budget=BUDGET) as server:
        holder = await _holding(server.port, 2 * MiB + MiB // 2)  # leaves 0.5 MiB
        await wait_until(_budget_used(server, 2 * MiB, BUDGET), timeout=5)
        held = server.budget.used
        sender, code, _ = await _mail(server.port)
        assert (await sender.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert (await sender.cmd("DATA"))[0] == 354
        await sender.send(big + b".\r\n")
        code, text = await sender.reply()
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        assert server.budget.used == held  # the refused message's share is back
        # Same session, the budget free again: the message goes through.
        await holder.close()
        await wait_until(_budget_used(server, 0, 0), timeout=5)
        assert (await sender.transaction(big))[0] == 250
        await sender.close()
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["big"]


async def test_a_sender_that_hangs_up_in_data_gives_its_share_back(redis_url: str) -> None:
    async with ingest(redis_url, max_size=BUDGET, memory_budget=BUDGET) as server:
        conn = await _holding(server.port, 800_000)
        await wait_until(_budget_used(server, 700_000, BUDGET), timeout=5)
        await conn.close()
        await wait_until(_budget_used(server, 0, 0), timeout=5)


def test_derived_caps_and_budget(tmp_path: Path) -> None:
    config = ingest_config("redis://127.0.0.1:1/0", max_connections=1000, memory_limit=1 << 30)
    assert (config.max_connections_per_ip, config.memory_budget) == (100, 256 * MiB)
    small = ingest_config("redis://127.0.0.1:1/0", max_connections=4, memory_limit=64 * MiB)
    # At least 10 per address (never more than the cap), and room for the largest message.
    assert (small.max_connections_per_ip, small.memory_budget) == (4, small.max_size)
    with pytest.raises(ConfigError, match=r"--memory-budget .* below --max-size"):
        ingest_config("redis://127.0.0.1:1/0", memory_budget=MiB)
    v2, v1, unlimited = tmp_path / "memory.max", tmp_path / "limit_in_bytes", tmp_path / "max"
    v2.write_text("536870912\n")
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    unlimited.write_text("max\n")
    missing = str(tmp_path / "absent")
    assert cgroup_memory_limit((missing, str(v2))) == 512 * MiB
    assert cgroup_memory_limit((str(v1),)) is None
    assert cgroup_memory_limit((str(unlimited), str(v2))) is None
    assert cgroup_memory_limit((missing,)) is None


async def test_messages_a_stalled_redis_still_holds_after_their_451_count(
    make_redis: Callable[..., RedisServer],
) -> None:
    """Redis stalls: each message is answered 451 after --store-timeout, but its entry stays
    in the writer until Redis replies.  The budget counts it until then; before, the next
    sessions took the freed shares and the worker held up to twice the budget."""
    redis_server = make_redis()
    big = message("big", ("y" * 78 + "\r\n") * ((MiB + MiB // 5) // 80))  # 1.2 MiB
    async with ingest(
        redis_server.url, max_size=2 * MiB, memory_budget=2 * MiB, store_timeout=1.0
    ) as server:
        assert (await send_one(server.port, message("warm")))[0] == 250  # the writer's link
        with redis_stalled(redis_server):
            replies = []
            for _ in range(2):
                conn = await SMTPConn.open_session(server.port)
                replies.append(await conn.transaction(big))
                await conn.close()
        # The first entry is out to Redis, its reply awaited: 1.2 of the 2 MiB are taken.
        assert [code for code, _ in replies] == [451, 452], replies
        store = server.handler.store
        await wait_until(lambda: store.given_up_octets == 0, "Redis's reply", timeout=10)
        assert (await send_one(server.port, big))[0] == 250  # its share is back


async def test_one_client_leaves_room_for_one_largest_message_of_others(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """A client's sessions together hold at most the budget less one --max-size message:
    one address parking transfers (BDAT without LAST, kept alive with NOOP) made every
    other sender's mail 452 until its --connection-timeout."""
    async with ingest(redis_url, max_size=MiB, memory_budget=3 * MiB) as server:
        holders = [await _holding(server.port, MiB - 4 * len(LINE)) for _ in range(2)]
        await wait_until(_budget_used(server, 2 * MiB - 128 * len(LINE), 2 * MiB), timeout=5)
        same = await SMTPConn.open_session(server.port)
        code, text = await same.transaction(message("same", ("z" * 78 + "\r\n") * 1300))
        assert (code, text.split()[0]) == (452, "4.3.1"), text  # past this client's share
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, local_addr=("127.0.0.2", 0)
        )
        other = SMTPConn(reader, writer)
        assert (await other.reply())[0] == 220
        await other.ehlo()
        assert (await other.transaction(message("other", ("z" * 78 + "\r\n") * 1300)))[0] == 250
        for conn in [*holders, same, other]:
            await conn.close()
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["other"]
