"""SMTP timeouts of the delivery relay client (RFC 5321 section 4.5.3.2) and the
``--claim-after`` derived from them.

Every reply before the final dot waits at most ``--smtp-timeout`` (300 s), and all of them
together too; the reply to the final dot waits ``--smtp-data-timeout`` (600 s): a relay that
scans the message for minutes is waited for instead of being sent it again.  One send so
lasts at most the sum, and an entry is held at most twice that (it may wait for one send of
its lane first), which ``--claim-after`` must exceed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from tests.delivery_util import send_message
from tests.harness import ROOT, wait_until
from tests.scripted_relay import ScriptedRelay
from workers.codec.build import build_message
from workers.config import DeliveryConfig
from workers.relay import SEND_TIMED_OUT, SendResult
from workers.relay.pool import SmtpPool

RECIPIENTS = [f"r{n}@example.com" for n in range(4)]
# Each budget holds for a relay that takes the transaction command by command and for one
# that offers PIPELINING (MAIL, RCPTs and DATA in one write; workers.relay.pipelining).
BOTH_PATHS = pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])


@contextlib.contextmanager
def relay_in_a_thread(relay: ScriptedRelay) -> Iterator[str]:
    """``relay`` served by an event loop of its own thread; yields its URL."""
    urls: list[str] = []
    stop = threading.Event()

    async def serve() -> None:
        async with relay.running() as url:
            urls.append(url)
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        while not urls:
            time.sleep(0.01)
        yield urls[0]
    finally:
        stop.set()
        thread.join(10)


def test_defaults_are_rfc_5321s_and_claim_after_is_derived_from_them() -> None:
    config = DeliveryConfig(relay="maildir:/tmp/mailpool-timeouts")
    config.validate()
    assert (config.smtp_timeout, config.smtp_data_timeout) == (300.0, 600.0)
    assert config.longest_hold() == 1800.0
    assert config.claim_after == 1860.0  # 2 x (300 + 600) + 60


def test_a_claim_after_within_the_longest_hold_stops_the_start() -> None:
    args = ["--relay", "maildir:/tmp/mailpool-timeouts", "--smtp-data-timeout", "100"]
    done = subprocess.run(
        [sys.executable, "-m", "workers", "deliver", *args, "--claim-after", "800"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "mailpool deliver: --claim-after 800 must exceed 2 x (--smtp-timeout 300 + "
        "--smtp-data-timeout 100) = 800 s, the longest a live worker holds an entry "
        "(or give 0: derived from them)\n"
    )


async def _timed_send(
    relay: ScriptedRelay, smtp_timeout: float, data_timeout: float, to: Sequence[str]
) -> tuple[SendResult, float]:
    """One send through the pool to ``relay``; the result and how long it took."""
    built = build_message(send_message(list(to)), default_id="1-0", hostname="mailpool.test")
    async with relay.running() as url:
        config = DeliveryConfig(
            relay=url, smtp_timeout=smtp_timeout, smtp_data_timeout=data_timeout
        )
        config.validate()
        pool = SmtpPool(config.relay_settings(), size=1, messages_per_connection=10, idle_close=30)
        started = time.monotonic()
        try:
            result = await pool.send(built, list(to))
            return result, time.monotonic() - started
        finally:
            await pool.aclose()


@BOTH_PATHS
async def test_the_reply_to_the_final_dot_is_waited_for_past_the_command_timeout(
    pipelining: bool,
) -> None:
    """A content-scanning relay answering the dot after 1.2 s: --smtp-timeout 0.5 does not
    apply there, --smtp-data-timeout 3 does; one copy, delivered."""
    relay = ScriptedRelay(delays={b".": 1.2}, pipelining=pipelining)
    result, took = await _timed_send(relay, 0.5, 3.0, RECIPIENTS[:1])
    assert result.accepted == RECIPIENTS[:1] and not result.deferred
    assert relay.messages == 1 and 1.2 <= took < 3.0


@BOTH_PATHS
async def test_a_relay_answering_the_dot_too_late_is_a_deferral_after_the_data_timeout(
    pipelining: bool,
) -> None:
    relay = ScriptedRelay(delays={b".": 3.0}, pipelining=pipelining)
    result, took = await _timed_send(relay, 2.0, 0.5, RECIPIENTS[:1])
    assert list(result.deferred) == RECIPIENTS[:1] and not result.accepted
    assert "Timeout" in result.deferred[RECIPIENTS[0]].text
    assert 0.5 <= took < 1.5  # the dot's own timeout, not --smtp-timeout


@BOTH_PATHS
async def test_everything_before_the_dot_shares_one_smtp_timeout(pipelining: bool) -> None:
    """Each RCPT answered in 0.3 s, under --smtp-timeout 0.5, but four of them take 1.2 s:
    the send is cut at 0.5 s, so a send never outlasts --smtp-timeout + --smtp-data-timeout
    (what --claim-after is derived from), however many recipients."""
    relay = ScriptedRelay(delays={b"RCPT": 0.3}, pipelining=pipelining)
    result, took = await _timed_send(relay, 0.5, 5.0, RECIPIENTS)
    assert sorted(result.deferred) == sorted(RECIPIENTS) and relay.messages == 0
    assert {reply.text for reply in result.deferred.values()} == {SEND_TIMED_OUT}
    assert 0.5 <= took < 1.2  # without the shared budget: 1.2 s, then delivered


@BOTH_PATHS
async def test_a_slow_but_timely_relay_is_sent_to_within_both_budgets(pipelining: bool) -> None:
    relay = ScriptedRelay(delays={b"MAIL": 0.2, b"RCPT": 0.1, b".": 0.8}, pipelining=pipelining)
    result, took = await _timed_send(relay, 1.0, 1.0, RECIPIENTS[:2])
    assert result.accepted == RECIPIENTS[:2] and relay.messages == 1
    assert 1.2 <= took < 2.0


@BOTH_PATHS
@pytest.mark.parametrize("stage", [b"MAIL", b"DATA"])
async def test_a_refusal_before_the_dot_keeps_its_reply_and_time_bound(
    stage: bytes, pipelining: bool
) -> None:
    relay = ScriptedRelay(
        replies={stage: b"451 4.3.0 try later"}, delays={b"RSET": 5.0}, pipelining=pipelining
    )
    result, took = await _timed_send(relay, 0.5, 5.0, RECIPIENTS[:1])
    assert result.deferred[RECIPIENTS[0]].code == 451  # the RSET that timed out loses nothing
    assert took < 2.0 and relay.messages == 0  # not the RSET's 5 s


async def test_replies_in_the_socket_by_the_deadline_are_read_before_it_counts() -> None:
    """The worker's loop is busy past --smtp-timeout while the relay's replies to the
    pipelined group wait in the socket: they came in time, and are read before the
    deadline counts (the loop looks once more), so the send goes on, once.  (Before, it
    was deferred without the message being written: a needless retry.)"""
    relay = ScriptedRelay(pipelining=True)
    with relay_in_a_thread(relay) as url:  # it answers while the worker's loop is blocked
        async with _second_send(url, 0.5, 2.0) as sending:
            asyncio.get_running_loop().call_soon(time.sleep, 0.7)  # the group is out by then
            result = await sending
            await asyncio.sleep(0.5)
    assert result.accepted == RECIPIENTS[:1] and not result.deferred
    assert relay.messages == 2


@contextlib.asynccontextmanager
async def _second_send(
    url: str, smtp_timeout: float, data_timeout: float
) -> AsyncIterator[asyncio.Task[SendResult]]:
    """A pool of one connection to ``url`` that sent one message: the second send of it,
    begun (and the pool closed after the block)."""
    to = RECIPIENTS[:1]
    built = build_message(send_message(to), default_id="1-0", hostname="mailpool.test")
    config = DeliveryConfig(relay=url, smtp_timeout=smtp_timeout, smtp_data_timeout=data_timeout)
    config.validate()
    pool = SmtpPool(config.relay_settings(), size=1, messages_per_connection=10, idle_close=30)
    try:
        assert (await pool.send(built, to)).accepted == to  # a pooled connection
        yield asyncio.create_task(pool.send(built, to))
    finally:
        await pool.aclose()


async def test_the_pool_closes_at_once_while_the_idle_reaper_waits_for_a_quit() -> None:
    """The idle reaper has sent QUIT to a connection idle past --idle-close and waits for
    the reply (a relay slow to answer it) when the worker stops: closing the pool cancels
    the reaper, and that cancellation must end it (swallowed, the reaper went on and the
    stop waited on it for ever)."""
    relay = ScriptedRelay(delays={b"QUIT": 5.0})
    to = RECIPIENTS[:1]
    built = build_message(send_message(to), default_id="1-0", hostname="mailpool.test")
    async with relay.running() as url:
        config = DeliveryConfig(relay=url, idle_close=0.2)
        config.validate()
        pool = SmtpPool(config.relay_settings(), size=1, messages_per_connection=10, idle_close=0.2)
        assert (await pool.send(built, to)).accepted == to
        await wait_until(lambda: b"QUIT" in relay.stages, "the reaper's QUIT", timeout=5)
        started = time.monotonic()
        await asyncio.wait_for(pool.aclose(), 5)
        assert time.monotonic() - started < 1.0


RELAY_PROCESS = """
import asyncio, sys
from tests.scripted_relay import ScriptedRelay
async def main():
    relay = ScriptedRelay(delays={b".": 0.5}, pipelining=sys.argv[1] == "1")
    async with relay.running() as url:
        print(url, flush=True)
        while True:
            await asyncio.sleep(0.2)
            print(relay.messages, flush=True)
asyncio.run(main())
"""


@BOTH_PATHS
async def test_a_reply_to_the_dot_received_while_the_worker_was_stopped_counts(
    pipelining: bool,
) -> None:
    """The worker's process is stopped (SIGSTOP, a starved VM) from just after its final
    dot to past --smtp-data-timeout; the relay's 250 arrives meanwhile.  At SIGCONT the
    loop's wait, interrupted past its timeout, returns no events and the timer runs first:
    the send counted as unanswered and was deferred, and its retry sent the message twice.
    It is accepted: the time is up once the loop has looked at the socket (a relay without
    PIPELINING too: aiosmtplib's timeout dropped the reply)."""
    relay = subprocess.Popen([sys.executable, "-c", RELAY_PROCESS, str(int(pipelining))],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert relay.stdout is not None
    try:
        async with _second_send(relay.stdout.readline().strip(), 1.0, 1.0) as sending:
            await asyncio.sleep(0.25)  # the dot is out; its reply comes at 0.5 s
            stopper = f"kill -STOP {os.getpid()}; sleep 2; kill -CONT {os.getpid()}"
            subprocess.Popen(["sh", "-c", stopper])
            result = await sending
    finally:
        relay.kill()
        counts = relay.communicate()[0].split()
    assert result.accepted == RECIPIENTS[:1] and not result.deferred, result
    assert counts[-1] == "2"  # each send's message once
