"""What the relay client uses of aiosmtplib beyond its documented API, in one place.

Written against aiosmtplib 5.1.3 and checked against 5.0.0 (the floor CI runs the delivery
tests on): ``CHECKED_RELEASES``.  tests/test_internals_aiosmtplib.py fails, naming this
file, on any other release or when a name used here is gone; check what is used below
against that release's ``aiosmtplib/protocol.py`` and ``smtp.py``, then widen the range.

The message's transfer after DATA's 354 goes over the connection's transport with a
protocol of our own (:class:`OwnReplies`, below) instead of through ``SMTP.data``, on both
paths (a relay without PIPELINING gets its commands through ``SMTP.execute_command``, its
message and the reply to its dot through our protocol).  What that buys,
measured with bench/relay_fence.py (the delivery worker, 5000 messages of 2 KB into
smtp-sink, 9 alternated rounds, medians): 13% more messages per CPU-second (``SMTP.data``:
0.88x; 0.87x in an earlier run of 7 rounds).  ``SMTP.data`` rewrites every line end with
one regular expression and dot-stuffs with another (25 us for a 2 KB message; the
builder's CRLF-only output needs one ``bytes.replace``: 2 us).  And it waits for the 354
and for the reply to the final dot with one timeout, where RFC 5321 (section 4.5.3.2)
gives the transfer to the command budget (``--smtp-timeout``) and the reply to the dot a
budget of its own (``--smtp-data-timeout``) that starts when the dot has left.  And our
protocol's time limit looks at the socket once more before it counts
(workers.relay.pipelining.ReplyChannel): aiosmtplib's timeout dropped a reply to the dot
that arrived while the worker's process was stopped past it, and the message went twice.

A pipelined transaction (:mod:`workers.relay.pipelining`) lends the connection's transport
(``SMTPProtocol.transport``) to a protocol of its own for the transaction
(:class:`OwnReplies`): aiosmtplib reads one reply per command and drops replies it does not
expect, so it cannot read a pipelined group's.  What that buys: see bench/delivery.py.

And one behaviour the relay client reads replies by: a reply aiosmtplib could not read is
raised as ``SMTPResponseException`` with a code no relay sent.  5.1.3 gives -1
(``SMTPStatus.invalid_response``) to a line over its 8192-octet limit and to a line that
does not start with three digits; 5.0.0 gives -1 to the second but
``SMTPStatus.unrecognized_command`` (500, an enum member, where a relay's code is a plain
int) with "Response too long" to the first.  :func:`response_code` turns both into
:data:`UNREADABLE_REPLY_CODE` and every code into a plain int, and
:func:`is_unreadable_reply` tells it apart, so that the relay client reports an unreadable
reply as a local failure and never as the relay's (on 5.0.0 a line too long was a permanent
500, and the enum member stopped the settler: hiredis packs no enum), and a relay's own 500
stays a 500 (test_delivery_unreadable_reply,
test_internals_aiosmtplib::test_an_unreadable_reply_has_the_fences_code,
::test_a_relays_own_500_keeps_its_code).
"""

from __future__ import annotations

import asyncio

import aiosmtplib
from aiosmtplib import SMTPStatus
from aiosmtplib.protocol import SMTPProtocol

CHECKED_RELEASES = ">=5.0.0,<=5.1.3"
# aiosmtplib 5.0.0-5.1.3 (protocol.py, data_received and _read_response_from_buffer): the
# code of an SMTPResponseException for a reply it could not read (5.0.0: see response_code).
UNREADABLE_REPLY_CODE = -1
# 5.0.0's code and text for a reply line over 8192 octets (5.1.3 gives -1).
_TOO_LONG_5_0 = (SMTPStatus.unrecognized_command, "Response too long")


def response_code(exc: aiosmtplib.SMTPResponseException) -> int:
    """The code of a reply aiosmtplib raised, a plain int; :data:`UNREADABLE_REPLY_CODE`
    for a reply it could not read, on every release checked."""
    made_up = isinstance(exc.code, SMTPStatus)  # a relay's code is parsed: a plain int
    if made_up and (exc.code, exc.message) == _TOO_LONG_5_0:
        return UNREADABLE_REPLY_CODE
    return int(exc.code)


def is_unreadable_reply(code: int) -> bool:
    """True for the code aiosmtplib gives a reply it could not read: not the relay's."""
    return code == UNREADABLE_REPLY_CODE


def _protocol(smtp: aiosmtplib.SMTP) -> SMTPProtocol:
    protocol = smtp.protocol  # None once the connection is closed
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    return protocol


def abort(smtp: aiosmtplib.SMTP) -> None:
    """Drop the connection at once, with whatever is still unsent (asyncio's
    ``transport.abort``).  ``SMTP.close`` first sends the rest of the transport's buffer:
    after a send given up mid-transfer (its time ran out, a shutdown) that is the rest of
    the message and its final dot, which the relay then accepts while the worker, having
    deferred it, sends it again."""
    transport = smtp.transport  # None once closed
    if isinstance(transport, asyncio.WriteTransport):  # socket and TLS transports are
        transport.abort()
    smtp.close()


class OwnReplies:
    """The connection's transport with ``channel`` as its protocol for the ``with`` block
    (a pipelined transaction reads its replies itself: aiosmtplib drops replies it does not
    expect), aiosmtplib's protocol again after it.  A connection lost meanwhile is reported
    to aiosmtplib's protocol, so the connection reads as closed.

    Uses ``SMTPProtocol.transport`` (the TLS transport after STARTTLS) and asyncio's
    ``BaseTransport.set_protocol``; nothing else of aiosmtplib's is read or changed.  A plain
    ``with`` (nothing here awaits): once per message, an async generator-based context
    manager cost 6 us of it.
    """

    def __init__(self, smtp: aiosmtplib.SMTP, channel: asyncio.Protocol) -> None:
        self._protocol = _protocol(smtp)
        self._channel = channel
        transport = self._protocol.transport
        if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport = transport

    def __enter__(self) -> asyncio.WriteTransport:
        self._transport.set_protocol(self._channel)
        return self._transport

    def __exit__(self, *exc_info: object) -> None:
        self._transport.set_protocol(self._protocol)
        lost = getattr(self._channel, "lost", None)
        if lost is not None or self._transport.is_closing():
            self._protocol.connection_lost(lost if isinstance(lost, Exception) else None)
