"""RFC 2920 section 3.1 across transactions: on a connection to a relay that offers
PIPELINING, the next send's MAIL, RCPTs and DATA go out with the final dot of the one ahead
of it, and read their replies after its reply to the dot.

What must hold: each send's outcome is its own; a send written behind a transaction that
then loses the connection (a 421 or a hang-up after the dot) was not sent and goes out on
another connection, neither deferred nor sent twice; a send given up while it waits for its
turn does not cost the one ahead its reply; a relay that refuses commands after the end of
DATA gets each message once, unchained.  Peers: a scripted relay that holds its reply to
each dot until the next group is there (or a second has passed), Postfix's smtpd with
smtpd_forbid_unauth_pipelining, and Haraka, which refuses them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.delivery_util import (
    REAL_RELAY,
    enqueue,
    events,
    make_config,
    run_until_settled,
    send_message,
    stream_fields,
)
from tests.postfix_util import private_postfix
from tests.scripted_relay import serving
from tests.sinks import PostfixSink
from workers.codec.build import build_message
from workers.config import DeliveryConfig
from workers.relay import SEND_TIMED_OUT, SendResult
from workers.relay.pool import SmtpPool

HOLD = 0.5  # seconds the peer holds a dot's reply while it waits for the next group
# One connection, two lanes: every send but the first is written behind another's dot.
ONE_CONNECTION = {
    "concurrency": 1, "smtp_timeout": 2.0, "smtp_data_timeout": 3.0, "claim_after": 12.0,
}  # fmt: skip


def _sender_of(mail_line: bytes) -> str:
    return mail_line.split(b"<", 1)[1].split(b">", 1)[0].decode()


@dataclass
class DotHoldingPeer:
    """Offers PIPELINING; after each message it waits up to ``hold`` seconds for the next
    command before it answers the dot, and records whether one came first (``chained``).
    By sender: ``dot_replies`` (None: hang up), ``dot_delays`` (a pause before that
    reply), ``silent`` (its dot, or with ``(connection, sender)`` its group, is never
    answered: the peer waits for the client to go).  MAIL from one of ``refuse_senders``
    gets 550, and the rest of its group 503."""

    dot_replies: dict[str, bytes | None] = field(default_factory=dict)
    hold: float = HOLD
    dot_delays: dict[str, float] = field(default_factory=dict)
    silent: set[str | tuple[int, str]] = field(default_factory=set)
    refuse_senders: set[str] = field(default_factory=set)
    chained: list[bool] = field(default_factory=list)  # per message: next group before reply
    messages: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, MAIL line)
    groups: list[tuple[int, str]] = field(default_factory=list)  # (connection, sender)
    refused: list[tuple[int, bytes]] = field(default_factory=list)  # groups refused at MAIL
    connections: int = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        writer.write(b"220 peer.test ESMTP\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            await reader.readline()  # EHLO
            writer.write(b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            line: bytes | None = None
            while True:
                line = line or await asyncio.wait_for(reader.readline(), 10)
                if not line.startswith(b"MAIL"):  # RSET (or QUIT, answered alike)
                    writer.write(b"250 2.0.0 ok\r\n")
                    line = None
                    continue
                group = [line]
                while not group[-1].startswith(b"DATA"):
                    group.append(await asyncio.wait_for(reader.readline(), 10))
                line, sender = None, _sender_of(group[0])
                self.groups.append((number, sender))
                if (number, sender) in self.silent:
                    await reader.read()  # until the client goes
                    return
                if sender in self.refuse_senders:
                    self.refused.append((number, group[0].rstrip()))
                    refusal = b"550 5.7.1 sender refused\r\n"
                    writer.write(refusal + b"503 5.5.1 no MAIL\r\n" * (len(group) - 1))
                    continue
                writer.write(b"250 ok\r\n" * (len(group) - 1) + b"354 go\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                self.messages.append((number, group[0].rstrip()))
                with contextlib.suppress(TimeoutError):
                    line = await asyncio.wait_for(reader.readline(), self.hold)
                self.chained.append(bool(line))
                if sender in self.silent:
                    await reader.read()
                    return
                await asyncio.sleep(self.dot_delays.get(sender, 0.0))
                reply = self.dot_replies.get(sender, b"250 2.0.0 queued")
                if reply is None:
                    return  # hang up: the client's next group is lost with the connection
                writer.write(reply + b"\r\n")
                if reply.startswith(b"421"):
                    return
        writer.close()

    def running(self) -> contextlib.AbstractAsyncContextManager[str]:
        return serving(self.session)


async def _enqueue_from(redis: aioredis.Redis, senders: list[str]) -> None:
    for sender in senders:
        await enqueue(redis, send_message(["ann@example.com"], sender=sender, message_id=sender))


async def test_each_next_envelope_goes_out_before_the_reply_to_the_dot(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Five sends over one connection: the second to fifth groups each reach the relay
    before it answers the dot ahead of them; each message goes once, in one transaction,
    and counts once in the SMTP metrics (from its start: not while it waits)."""
    peer = DotHoldingPeer()
    senders = [f"s{n}@example.com" for n in range(5)]
    timed = REGISTRY.get_sample_value("mailpool_delivery_smtp_seconds_count") or 0.0
    async with peer.running() as relay:
        await _enqueue_from(redis, senders)
        await run_until_settled(redis, make_config(redis_url, relay, **ONE_CONNECTION))
    assert REGISTRY.get_sample_value("mailpool_delivery_smtp_seconds_count") == timed + 5
    assert REGISTRY.get_sample_value("mailpool_delivery_in_flight") == 0
    assert sorted(_sender_of(mail) for _, mail in peer.messages) == senders
    assert peer.connections == 1
    assert peer.chained == [True, True, True, True, False]  # nothing follows the last
    assert [e["event"] for e in await events(redis)] == ["delivered"] * 5


@pytest.mark.parametrize(
    "first_dot", [b"421 4.3.2 closing", None], ids=["421-after-the-dot", "hang-up"]
)
async def test_a_send_behind_a_lost_connection_goes_out_on_another(
    redis: aioredis.Redis, redis_url: str, first_dot: bytes | None
) -> None:
    """The relay closes after the first message's dot, with the second send's group already
    written behind it: the first is decided by that (deferred; dead with --max-attempts 1),
    the second was not sent, so it goes out on a new connection at once, delivered once and
    never deferred."""
    peer = DotHoldingPeer(dot_replies={"s0@example.com": first_dot})
    async with peer.running() as relay:
        await _enqueue_from(redis, ["s0@example.com", "s1@example.com"])
        config = make_config(redis_url, relay, max_attempts=1, **ONE_CONNECTION)
        await run_until_settled(redis, config)
    assert peer.chained[0] is True  # the second group was out when the connection went
    sent = [(connection, _sender_of(mail)) for connection, mail in peer.messages]
    assert sent == [(1, "s0@example.com"), (2, "s1@example.com")]
    outcome = {e["id"]: e["event"] for e in await events(redis)}
    assert outcome == {"s0@example.com": "failed", "s1@example.com": "delivered"}


async def test_a_refused_message_leaves_the_one_behind_it_to_its_own_replies(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """554 to the first dot ends that transaction only: the next one, already written,
    goes on over the same connection."""
    peer = DotHoldingPeer(dot_replies={"s0@example.com": b"554 5.7.1 content refused"})
    async with peer.running() as relay:
        await _enqueue_from(redis, ["s0@example.com", "s1@example.com", "s2@example.com"])
        await run_until_settled(redis, make_config(redis_url, relay, **ONE_CONNECTION))
    assert peer.connections == 1 and peer.chained[:2] == [True, True]
    outcome = {e["id"]: e["event"] for e in await events(redis)}
    assert outcome == {
        "s0@example.com": "failed", "s1@example.com": "delivered", "s2@example.com": "delivered",
    }  # fmt: skip


async def test_a_sender_refused_behind_a_dot_is_decided_by_its_own_transaction(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """The relay refuses the second send's sender.  Written behind the first dot, that
    refusal could be of where the group went (Haraka's 503), so the send goes out again,
    unchained, on the same connection, and the same refusal there decides it (dead, once);
    the pool chains no more, and the third send is delivered."""
    peer = DotHoldingPeer(refuse_senders={"s1@example.com"})
    async with peer.running() as relay:
        await _enqueue_from(redis, ["s0@example.com", "s1@example.com", "s2@example.com"])
        await run_until_settled(redis, make_config(redis_url, relay, **ONE_CONNECTION))
    assert [(n, _sender_of(mail)) for n, mail in peer.refused] == [(1, "s1@example.com")] * 2
    assert peer.connections == 1 and peer.chained[0] is True
    outcome = {e["id"]: e["event"] for e in await events(redis)}
    assert outcome == {
        "s0@example.com": "delivered", "s1@example.com": "failed", "s2@example.com": "delivered",
    }  # fmt: skip
    dead = await stream_fields(redis, "email.send.dead")
    assert [d["smtp_code"] for d in dead] == ["550"]


def _pool(relay: str, smtp_timeout: float, data_timeout: float) -> SmtpPool:
    """A pool of one connection to ``relay``, as a worker with --concurrency 1 has."""
    config = DeliveryConfig(relay=relay, smtp_timeout=smtp_timeout, smtp_data_timeout=data_timeout)
    config.validate()
    return SmtpPool(config.relay_settings(), size=1, messages_per_connection=10, idle_close=30)


def _sending(
    pool: SmtpPool, sender: str, begin: Callable[[], bool] = lambda: True
) -> asyncio.Task[SendResult | None]:
    number = int(sender[1:].split("@", maxsplit=1)[0])
    built = build_message(send_message(["a@example.com"], sender=sender),
                          default_id=f"{number + 1}-0", hostname="mailpool.test")  # fmt: skip
    return asyncio.create_task(pool.send(built, ["a@example.com"], begin))


async def _one_behind_another(
    pool: SmtpPool, begin: Callable[[], bool] = lambda: True
) -> tuple[asyncio.Task[SendResult | None], asyncio.Task[SendResult | None]]:
    """s0 leads; s1 (with ``begin``) comes once s0's group is out, to go behind its dot."""
    leading = _sending(pool, "s0@example.com")
    await asyncio.sleep(0.05)
    return leading, _sending(pool, "s1@example.com", begin)


async def test_a_follower_given_up_before_its_turn_leaves_the_one_ahead_its_reply() -> None:
    """A send cancelled (the stop's drain ran out) while it waits behind a transaction whose
    dot the relay has not answered yet: that transaction still gets its 250 (dropping the
    connection would lose a reply to a message the relay accepted, and it would be sent
    again), and only then is the connection dropped, the cancelled send's group with it."""
    slow = DotHoldingPeer(dot_delays={"s0@example.com": 1.5})  # its dot's reply 1.5 s late
    async with slow.running() as relay:
        pool = _pool(relay, 5.0, 5.0)
        try:
            leading, following = await _one_behind_another(pool)
            await asyncio.sleep(0.5)  # both groups out, the first dot's reply held
            following.cancel()
            result = await leading
            with pytest.raises(asyncio.CancelledError):
                await following
        finally:
            await pool.aclose()
    assert result is not None and result.accepted == ["a@example.com"]
    assert [_sender_of(mail) for _, mail in slow.messages] == ["s0@example.com"]
    assert slow.chained == [True]


async def test_a_follower_behind_a_failed_connection_goes_first_on_the_next() -> None:
    """The dot ahead of a follower is never answered: after --smtp-data-timeout that send
    is deferred and the connection dropped, and the follower, whose group went with it,
    opens the next connection in its slot, ahead of a send that was already waiting for
    one (waiting behind that one too could outlast --claim-after: another worker would
    claim the entry and send it again)."""
    peer = DotHoldingPeer(silent={"s0@example.com"})
    async with peer.running() as relay:
        pool = _pool(relay, 2.0, HOLD + 0.5)
        try:
            leading, following = await _one_behind_another(pool)
            await asyncio.sleep(0.05)
            waiting = _sending(pool, "s2@example.com")
            results = await asyncio.wait_for(asyncio.gather(leading, following, waiting), 20)
        finally:
            await pool.aclose()
    assert [list(r.deferred) if r else None for r in results] == [["a@example.com"], [], []]
    assert peer.chained[0] is True  # s1's group came with s0's dot
    assert peer.groups == [(1, "s0@example.com"), (2, "s1@example.com"), (2, "s2@example.com")]


async def test_a_follower_whose_own_replies_run_out_of_time_is_deferred_once() -> None:
    """The relay never answers the follower's group: after its turn, its --smtp-timeout
    runs out, and that is its own outcome (deferred, the connection dropped), not a
    refusal of where the group went: it is not sent again, and chaining stays on."""
    peer = DotHoldingPeer(
        hold=0.0, dot_delays={"s0@example.com": 0.3}, silent={(1, "s1@example.com")}
    )
    async with peer.running() as relay:
        pool = _pool(relay, 0.5, 2.0)
        try:
            leading, following = await _one_behind_another(pool)
            first, second = await asyncio.wait_for(asyncio.gather(leading, following), 20)
        finally:
            await pool.aclose()
    assert first is not None and first.accepted == ["a@example.com"]
    assert second is not None and second.deferred["a@example.com"].text == SEND_TIMED_OUT
    assert peer.groups == [(1, "s0@example.com"), (1, "s1@example.com")]
    assert pool.chaining


async def test_a_follower_sends_nothing_after_the_stop() -> None:
    """The follower's group went out before the stop; the connection then ends (421 to the
    dot ahead).  Sent again it would be a transaction after the stop: its ``begin`` is asked
    again, says no, and nothing of the message reaches the relay (None: not sent)."""
    peer = DotHoldingPeer(
        hold=0.0, dot_delays={"s0@example.com": 1.0},
        dot_replies={"s0@example.com": b"421 4.3.2 closing"},
    )  # fmt: skip
    stopped = asyncio.Event()
    async with peer.running() as relay:
        pool = _pool(relay, 5.0, 5.0)
        try:
            leading, following = await _one_behind_another(pool, lambda: not stopped.is_set())
            await asyncio.sleep(0.5)  # its group is out behind the dot
            stopped.set()
            first, second = await asyncio.wait_for(asyncio.gather(leading, following), 20)
        finally:
            await pool.aclose()
    assert first is not None and list(first.deferred) == ["a@example.com"]
    assert second is None
    assert [_sender_of(mail) for _, mail in peer.messages] == ["s0@example.com"]


async def test_postfix_with_forbid_unauth_pipelining_takes_chained_transactions(
    redis: aioredis.Redis, redis_url: str, make_postfix_sink: Callable[..., PostfixSink]
) -> None:
    """Postfix smtpd (smtpd_forbid_unauth_pipelining = yes) over one connection: every
    group after the first goes out with a dot; it finds nothing improper and relays all."""
    sink = make_postfix_sink()
    with private_postfix(sink.port, smtpd_forbid_unauth_pipelining="yes") as postfix:
        await _enqueue_from(redis, [f"s{n}@example.com" for n in range(5)])
        await run_until_settled(
            redis,
            make_config(
                redis_url, f"smtp://127.0.0.1:{postfix.port}", **(ONE_CONNECTION | REAL_RELAY)
            ),
        )
        dumps = await asyncio.to_thread(sink.wait_for_dumps, 5, 20.0)
        log = postfix.log
    assert "improper command pipelining" not in log, log
    assert len(dumps) == 5
    # One connection carried all five (the other one is the harness's check of the port).
    assert log.count(" connect from ") - log.count("lost connection after CONNECT") == 1, log
    assert [e["event"] for e in await events(redis)] == ["delivered"] * 5


async def test_haraka_refusing_chained_transactions_still_gets_each_message_once(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Haraka (npm, bench/haraka; its plugin accepts and discards) answers 503 to every
    command pipelined after the end of DATA (its defence against SMTP smuggling): the group
    refused there is sent again unchained, and the pool chains no more, so Haraka refuses
    once, queues each of the five messages once, and none is failed."""
    from bench.ingest import start_haraka

    haraka = start_haraka(tmp_path)
    try:
        await _enqueue_from(redis, [f"s{n}@example.com" for n in range(5)])
        relay = f"smtp://127.0.0.1:{haraka.port}"
        config = make_config(redis_url, relay, **(ONE_CONNECTION | REAL_RELAY))
        await run_until_settled(redis, config)
    finally:
        haraka.stop()
    log = (tmp_path / "haraka-info.log").read_text(errors="replace")
    assert log.count("command pipelined after end of DATA - refused") == 1, log[-3000:]
    assert log.count('msg="Message Queued') == 5, log[-3000:]
    assert [e["event"] for e in await events(redis)] == ["delivered"] * 5
