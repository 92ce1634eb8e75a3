"""A pipelined SMTP transaction (RFC 2920) over an aiosmtplib connection.

aiosmtplib reads one reply per command it sent and drops what arrives while it expects
none, so it cannot pipeline.  For a relay that offers PIPELINING, the transaction takes the
connection's transport for its duration (:class:`~workers.relay.aiosmtplib_fence.OwnReplies`)
and reads replies itself, in order, with :class:`ReplyChannel`: MAIL, every RCPT and DATA go
out in one write (DATA last, as RFC 2920 section 3.1 allows), their replies are read
one after another, and each recipient's own reply decides its outcome as before.  Then the
message and the final dot, and the reply to it.  Two round trips per message instead of
three plus one per recipient.

On a pooled connection the next transaction's group may go out with the final dot (RFC 2920
section 3.1: the message's transfer may be the first "command" of a group), so its replies
come back with the reply to the dot: one round trip per message.  The transactions of such a
run share one :class:`Chain`: one channel, read by one transaction at a time, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiosmtplib

from workers.relay.aiosmtplib_fence import OwnReplies

# RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets; aiosmtplib allows 8192.
MAX_REPLY_LINE = 8192
MAX_REPLY = 32768  # a whole multi-line reply, as aiosmtplib bounds it
UNREADABLE = -1  # the code aiosmtplib gives a reply it cannot read (aiosmtplib_fence)


class ReplyChannel(asyncio.Protocol):
    """The connection's protocol while a pipelined transaction has it: collects what the
    relay sends and hands out one complete reply at a time, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost: BaseException | None = None  # why the connection ended, once it has
        # The transaction's time limit (expire_at): once it has passed, the error every
        # wait raises.  One timer handle instead of an asyncio.timeout block per phase,
        # which cost 7 us each per message (current_task, cancellation bookkeeping).
        self._timer: asyncio.TimerHandle | None = None
        self.expired: BaseException | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        self._arrived.set()

    def eof_received(self) -> bool:
        self._end(aiosmtplib.SMTPServerDisconnected("Connection closed by the relay"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or aiosmtplib.SMTPServerDisconnected("Connection lost"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _end(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        self._arrived.set()
        self._writable.set()

    # -- for the transaction --------------------------------------------------------------

    def expire_at(self, when: float, error: Callable[[], BaseException]) -> None:
        """From ``when`` (the loop's clock) on, a wait for a reply or for the transport
        raises ``error()``; replies already arrived are still handed out, so the
        transaction checks :attr:`expired` before it writes the message.  Replaces the
        limit set before; :meth:`stop_timer` ends it."""
        self.stop_timer()
        self._timer = asyncio.get_running_loop().call_at(when, self._look_once_more, error)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look_once_more(self, error: Callable[[], BaseException]) -> None:
        """The time is up once the loop has looked at the sockets after it: a process
        stopped (SIGSTOP, a starved VM) past the deadline resumes in a loop turn that runs
        due timers without polling (the selector's wait, interrupted past its timeout,
        returns no events), so a reply already in the socket would count as never sent,
        and the message be sent again.  A timer, not call_soon: the turn that runs it
        polls first."""
        self._timer = asyncio.get_running_loop().call_later(0, self._expire, error)

    def _expire(self, error: Callable[[], BaseException]) -> None:
        self._timer = None
        self.expired = error()
        self._arrived.set()
        self._writable.set()

    async def drained(self) -> None:
        """Return once the transport takes more (asyncio's flow control)."""
        await self._writable.wait()
        if self.lost is not None:
            raise aiosmtplib.SMTPServerDisconnected(str(self.lost))
        if self.expired is not None:
            raise self.expired

    async def reply(self) -> aiosmtplib.SMTPResponse:
        """The next complete reply (a multi-line one joined with newlines, as aiosmtplib
        gives it); SMTPResponseException with code -1 for a reply that is not SMTP."""
        while True:
            found = self._take_reply()
            if found is not None:
                return found
            if self.lost is not None:
                raise aiosmtplib.SMTPServerDisconnected(str(self.lost))
            if self.expired is not None:
                raise self.expired
            self._arrived.clear()
            await self._arrived.wait()

    def _take_reply(self) -> aiosmtplib.SMTPResponse | None:
        lines: list[str] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start:end]).rstrip(b"\r")
            start = end + 1
            code, separator = line[:3], line[3:4]
            readable = code.isdigit() and separator in (b"", b" ", b"-")
            if len(line) > MAX_REPLY_LINE or not readable:
                del self._buffer[:start]
                said = f"Malformed SMTP response: {line[:80]!r}"
                if len(line) > MAX_REPLY_LINE:  # as aiosmtplib says it
                    said = f"Response too long: {line[:80]!r}"
                raise aiosmtplib.SMTPResponseException(UNREADABLE, said)
            lines.append(line[4:].decode("utf-8", "surrogateescape"))
            if separator != b"-":
                del self._buffer[:start]
                return aiosmtplib.SMTPResponse(int(code), "\n".join(lines))
        if len(self._buffer) - start > MAX_REPLY_LINE or start > MAX_REPLY:
            raise aiosmtplib.SMTPResponseException(UNREADABLE, "Response too long")
        return None


class Chain:
    """Pipelined transactions one after another on one connection: the channel they share,
    the connection's protocol from the first one's group to the last one's reply to its dot.

    The pool hands the turn to read replies from each transaction to the one whose group
    went out behind it; only the transaction whose turn it is reads or sets the time limit.
    :meth:`end` gives aiosmtplib its protocol back (and tells it of a connection lost).
    """

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.channel = ReplyChannel()
        self._own = OwnReplies(smtp, self.channel)  # SMTPServerDisconnected: closed already
        self.transport = self._own.__enter__()
        self._ended = False

    @property
    def broken(self) -> bool:
        """The connection ended, or a wait on it ran out of time: nothing more may follow."""
        channel = self.channel
        return (
            channel.lost is not None or channel.expired is not None or (self.transport.is_closing())
        )

    def end(self) -> None:
        """Once; a second call does nothing."""
        if self._ended:
            return
        self._ended = True
        self.channel.stop_timer()
        self._own.__exit__(None, None, None)
