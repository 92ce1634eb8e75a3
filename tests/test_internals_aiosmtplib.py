"""What the relay client uses of aiosmtplib beyond its documented API, checked against the
installed release: workers/relay/aiosmtplib_fence.py.

Each test fails loudly, naming that file, when the installed aiosmtplib is not a release the
fence was checked against or no longer has (or no longer does) what the fence uses; and
what the fence buys over ``SMTP.data`` is pinned: the message's transfer counts against
``--smtp-timeout``, not against the wait for the reply to the dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from tests.internals_util import check_release
from tests.scripted_relay import ScriptedRelay
from workers.codec.build import BuiltMessage
from workers.config import DeliveryConfig
from workers.relay import SEND_TIMED_OUT, aiosmtplib_fence
from workers.relay.pool import SmtpPool

FENCE = "workers/relay/aiosmtplib_fence.py"
# Far more than loopback's socket buffers take in: the sender's transport has to wait.
BIG = 16 * 1024 * 1024


def test_the_installed_aiosmtplib_is_a_release_the_fence_was_checked_against() -> None:
    check_release("aiosmtplib", aiosmtplib_fence.CHECKED_RELEASES, FENCE)


def test_aiosmtplib_still_has_what_the_fence_uses() -> None:
    assert aiosmtplib.SMTP().protocol is None, f"revisit {FENCE}: SMTP.protocol is gone"
    used = ["connection_made", "connection_lost"]  # and .transport: test_own_replies_...
    missing = [name for name in used if not hasattr(SMTPProtocol, name)]
    assert missing == [], f"revisit {FENCE}: SMTPProtocol has no {missing}"


@pytest.mark.parametrize(
    "odd_reply",
    [b"250 2.1.0 " + b"x" * 10_000, b"2S0 not three digits"],
    ids=["line-too-long", "malformed"],
)
async def test_an_unreadable_reply_has_the_fences_code(odd_reply: bytes) -> None:
    """aiosmtplib raises a reply it cannot read with a code of its own, which
    ``response_code`` and ``is_unreadable_reply`` recognise (and no code a relay can send)."""
    exc = await _refusal_of_mail(odd_reply)
    code = aiosmtplib_fence.response_code(exc)
    assert aiosmtplib_fence.is_unreadable_reply(code), (
        f"revisit {FENCE} response_code: aiosmtplib now reports {exc.code!r} {exc.message!r}"
    )
    assert not any(map(aiosmtplib_fence.is_unreadable_reply, range(0, 1000)))


async def test_a_relays_own_500_keeps_its_code() -> None:
    """What tells 5.0.0's made-up 500 from a relay's: a relay's 500, even with that text,
    stays a 500, a plain int."""
    exc = await _refusal_of_mail(b"500 Response too long")
    code = aiosmtplib_fence.response_code(exc)
    assert (type(code), code) == (int, 500), f"revisit {FENCE} response_code: {exc.code!r}"


async def _refusal_of_mail(reply: bytes) -> aiosmtplib.SMTPResponseException:
    """What a real aiosmtplib client raises when a relay answers MAIL with ``reply``."""
    relay = ScriptedRelay(replies={b"MAIL": reply})
    async with relay.running() as url:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=int(url.rpartition(":")[2]))
        await smtp.connect(start_tls=False)
        try:
            await smtp.ehlo()
            await smtp.mail("a@example.org")
        except aiosmtplib.SMTPResponseException as exc:
            return exc
        finally:
            smtp.close()
    raise AssertionError(f"{FENCE}: aiosmtplib took {reply[:20]!r}... for a 250")


@contextlib.asynccontextmanager
async def relay_that_stops_reading_at_data(
    dots: list[int] | None = None, *, pipelining: bool = False
) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A relay that answers each command with 250 and DATA with 354, then reads nothing of
    the message until the event is set; yields its port and that event.  ``dots``: gets a
    1 for each message whose final dot arrived."""
    resume = asyncio.Event()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stalling.test ESMTP\r\n")
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                if line.upper().startswith(b"EHLO") and pipelining:
                    writer.write(b"250-stalling.test\r\n250 PIPELINING\r\n")
                    continue
                if line.upper().startswith(b"DATA"):
                    writer.write(b"354 go ahead\r\n")
                    await resume.wait()
                    if await _read_message(reader) and dots is not None:
                        dots.append(1)
                writer.write(b"250 OK\r\n")
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], resume
        resume.set()  # let a stalled session end


async def _read_message(reader: asyncio.StreamReader) -> bool:
    """True once the final dot has arrived; False when the connection ended before it."""
    tail = b""
    while not tail.endswith(b"\r\n.\r\n"):
        chunk = await reader.read(1 << 16)
        if not chunk:
            return False
        tail = (tail + chunk)[-5:]
    return True


def _big_message() -> BuiltMessage:
    """A message larger than the socket buffers hold (BIG octets)."""
    return BuiltMessage(
        data=b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (BIG // 1000),
        mail_from="sender@example.com", recipients=["r@example.com"], message_id="<1@test>",
        smtputf8=False, eight_bit=False,
    )  # fmt: skip


def _pool_with_half_a_second(port: int) -> SmtpPool:
    """A pool of one connection to the relay at ``port``: --smtp-timeout 0.5 s, the dot's
    reply 5 s."""
    config = DeliveryConfig(
        relay=f"smtp://127.0.0.1:{port}", starttls="off", smtp_timeout=0.5, smtp_data_timeout=5.0
    )
    config.validate()
    return SmtpPool(config.relay_settings(), size=1, messages_per_connection=1, idle_close=30)


async def test_a_relay_that_stops_reading_the_message_is_cut_at_the_smtp_timeout() -> None:
    """The transfer counts against --smtp-timeout (0.5 s), not against --smtp-data-timeout
    (5 s, which starts when the dot has left): ``SMTP.data`` would wait the 5 s."""
    message = _big_message()
    async with relay_that_stops_reading_at_data() as (port, _):
        pool = _pool_with_half_a_second(port)
        started = time.monotonic()
        result = await pool.send(message, message.recipients)
        took = time.monotonic() - started
        await pool.aclose()
    assert not result.accepted and list(result.deferred) == ["r@example.com"]
    assert result.deferred["r@example.com"].text == SEND_TIMED_OUT
    assert 0.5 <= took < 2.0


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_a_message_cut_at_the_smtp_timeout_never_reaches_the_relay(
    pipelining: bool,
) -> None:
    """The send given up mid-transfer is deferred, so the rest of the message must not go
    out afterwards: the connection is aborted (SMTP.close would send what the transport
    still holds, dot included, once the relay reads again; it would accept the message,
    and the retry would send it twice)."""
    message = _big_message()
    dots: list[int] = []
    async with relay_that_stops_reading_at_data(dots, pipelining=pipelining) as (port, resume):
        pool = _pool_with_half_a_second(port)
        result = await pool.send(message, message.recipients)
        resume.set()  # the relay reads again: what the client still sends, it gets
        await asyncio.sleep(1.5)
        await pool.aclose()
    assert list(result.deferred) == ["r@example.com"]
    assert dots == []


async def test_own_replies_lends_the_transport_and_gives_it_back() -> None:
    """The pipelined transaction's use (OwnReplies): SMTPProtocol.transport is the live
    transport; with another protocol set for a while, aiosmtplib's works on after it."""
    from workers.relay.pipelining import ReplyChannel

    relay = ScriptedRelay()
    async with relay.running() as url:
        port = int(url.rsplit(":", 1)[1])
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        channel = ReplyChannel()
        with aiosmtplib_fence.OwnReplies(smtp, channel) as transport:
            transport.write(b"NOOP\r\nNOOP\r\n")
            assert [(await channel.reply()).code, (await channel.reply()).code] == [250, 250]
        assert (await smtp.noop()).code == 250  # aiosmtplib's protocol reads again
        await smtp.quit()
