"""The ingest memory budget on real sessions: a SIZE= that does not fit is refused at MAIL
FROM with 452 4.3.1, a message that outgrows the budget while it arrives is drained and
refused with 452 4.3.1 after the final dot, and whatever a transaction held is given back
when it ends (reply, RSET, a dropped connection), so the next sender gets in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from tests.ingest_util import SMTPConn, entries, ingest, message, wait_until
from workers.ingest import IngestServer

MiB = 1 << 20
BUDGET = 3 * MiB  # with --max-size 2 MiB: room for one message of the largest size


async def _mail(port: int, size: int | None = None) -> tuple[SMTPConn, int, str]:
    conn = await SMTPConn.open(port)
    await conn.ehlo()
    code, text = await conn.cmd("MAIL FROM:<a@example.org>" + (f" SIZE={size}" if size else ""))
    return conn, code, text


def _budget_used(
    server: IngestServer, at_least: int, at_most: int
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return at_least <= server.budget.used <= at_most

    return check


async def test_a_declared_size_that_does_not_fit_is_refused_at_mail(redis_url: str) -> None:
    async with ingest(redis_url, max_size=2 * MiB, memory_budget=BUDGET) as server:
        first, code, _ = await _mail(server.port, 2 * MiB)
        assert code == 250
        second, code, text = await _mail(server.port, 2 * MiB)
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        # A transaction that ends gives its reservation back: RSET...
        assert (await first.cmd("RSET"))[0] == 250
        assert (await second.cmd("MAIL FROM:<a@example.org> SIZE=2097152"))[0] == 250
        # ... or a connection that goes away.
        await second.close()
        await wait_until(_budget_used(server, 0, 0))
        assert (await first.cmd("MAIL FROM:<a@example.org> SIZE=2097152"))[0] == 250
        assert (await first.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert (await first.cmd("DATA"))[0] == 354
        await first.send(message("declared", "x" * 70) + b".\r\n")
        assert (await first.reply())[0] == 250
        assert server.budget.used == 0  # the reply ended the transaction
        await first.close()


async def test_a_message_that_outgrows_the_budget_is_refused_after_the_dot(
    redis_url: str, redis: aioredis.Redis
) -> None:
    line = "y" * 78 + "\r\n"
    big = message("big", line * (MiB // len(line)))
    async with ingest(redis_url, max_size=BUDGET, memory_budget=BUDGET) as server:
        holder, code, _ = await _mail(server.port, 2 * MiB + MiB // 2)  # leaves 0.5 MiB
        assert code == 250
        sender, code, _ = await _mail(server.port)  # no SIZE: reserved as DATA comes
        assert (await sender.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert (await sender.cmd("DATA"))[0] == 354
        await sender.send(big + b".\r\n")
        code, text = await sender.reply()
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        assert server.budget.used == 2 * MiB + MiB // 2  # the refused message's share is back
        # Same session, the budget free again: the message goes through.
        assert (await holder.cmd("QUIT"))[0] == 221
        await wait_until(_budget_used(server, 0, 0))
        assert (await sender.transaction(big))[0] == 250
        await holder.close()
        await sender.close()
    assert [m["headers"]["subject"] for _, m in await entries(redis)] == ["big"]


async def test_a_sender_that_hangs_up_in_data_gives_its_share_back(redis_url: str) -> None:
    async with ingest(redis_url, max_size=2 * MiB, memory_budget=BUDGET) as server:
        conn, _, _ = await _mail(server.port)
        assert (await conn.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert (await conn.cmd("DATA"))[0] == 354
        await conn.send(b"Subject: cut off\r\n\r\n" + (b"z" * 78 + b"\r\n") * 10_000)
        await wait_until(_budget_used(server, 700_000, BUDGET))
        await conn.close()
        await wait_until(_budget_used(server, 0, 0))
