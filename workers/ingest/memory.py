"""The memory budget of one ingest worker, and giving freed memory back to the system.

Every message in flight holds memory from its first octet of DATA until its reply: the
octets received, the parsed form, the packed entry while Redis takes it.  The budget caps
the octets of message data held at once (``--memory-budget``), so that a burst of large
messages or many slow senders costs at most a known share of the worker's memory limit
instead of getting it OOM-killed:

* at ``MAIL FROM`` a size the client declared with ``SIZE=`` (RFC 1870) that the budget
  has no room for right now is refused with ``452 4.3.1``, before any octet is sent.  It
  is not reserved: a session that declares a size and then idles must not hold memory
  it never uses (a dozen such sessions would refuse everyone else's mail);
* during DATA each chunk is reserved as it arrives: when the budget is spent, the rest
  of the message is read and dropped and the reply after the final dot is ``452 4.3.1``
  (RFC 5321 section 4.2.5 allows no reply before it).

What a transaction reserved is given back when it ends, whichever way: its reply was
given, RSET, a new EHLO or STARTTLS, or the connection was lost.

glibc keeps freed memory in its heaps for reuse, and its dynamic mmap threshold moves up
to the size of the largest block freed (32 MiB at most), after which message-sized
buffers are taken from, and fragment, the heaps.  :func:`tune_allocator` fixes the
threshold so that every large buffer is its own mapping, returned on ``free``, and caps
the number of heaps; :class:`HeapTrimmer` returns what the heaps hold free after a large
message.  Both do nothing outside glibc.

The fixed threshold sits just above asyncio's read buffer: every socket read allocates a
fresh 256 KiB buffer and shrinks it to what arrived.  At or under that size each read
was a mapping of its own (``mmap``, ``mremap``, ``munmap`` and a page fault: nine faults
and fifteen system calls per 2 KB message), which cost ingest a fifth of its CPU; the
trim threshold keeps room for it at the top of the heap.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Buffers from this size up get a mapping of their own (unless a heap happens to hold a
# free block that fits), returned on ``free``: a message-sized buffer rarely lands in, or
# pins, a heap.  Just above asyncio's read buffer (256 KiB and the bytes object's header),
# which so comes from the heap and goes back to it without a system call.
MMAP_THRESHOLD = 260 << 10
# Free memory a heap keeps at its top before giving it back: room for the read buffer
# (with glibc's top pad), so that each read does not grow and shrink the heap.
TRIM_THRESHOLD = 512 << 10
# The event loop and the parse threads: two heaps instead of glibc's 8 per core.
ARENA_MAX = 2
# A message at least this large is followed by a trim of the heaps, at most once per
# TRIM_INTERVAL seconds (a trim walks every heap: cheap, but not for every message).
TRIM_FROM = MMAP_THRESHOLD
TRIM_INTERVAL = 1.0

REPLY_NO_MEMORY = "452 4.3.1 Insufficient system storage, try again later"


class MemoryBudget:
    """Octets of message data one worker holds at once, at most ``capacity``.

    ``held_elsewhere`` says how much of it no reservation counts: the store's messages
    whose senders were answered 451 while Redis still holds their XADD unanswered (a
    stalled Redis), kept until it replies.  Sessions taking the freed shares meanwhile
    held up to twice the budget."""

    def __init__(
        self,
        capacity: int,
        held_elsewhere: Callable[[], int] = lambda: 0,
        *,
        client_share: int | None = None,
    ) -> None:
        self.capacity = capacity
        self.used = 0
        self._held_elsewhere = held_elsewhere
        # What the sessions of one client (client_of) may hold together: one client
        # parking transfers (BDAT without LAST, kept alive with NOOP) must not take what
        # every other sender needs.
        self.client_share = capacity if client_share is None else client_share
        self._by_client: dict[str, int] = {}

    def take(self, octets: int, client: str = "") -> bool:
        """Reserve ``octets``; False (and nothing reserved) when they do not fit."""
        if not self.has_room(octets, client):
            return False
        self.used += octets
        if client:
            self._by_client[client] = self._by_client.get(client, 0) + octets
        return True

    def give_back(self, octets: int, client: str = "") -> None:
        self.used -= octets
        if client and octets:
            left = self._by_client[client] - octets
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]

    def has_room(self, octets: int, client: str = "") -> bool:
        if client and self._by_client.get(client, 0) + octets > self.client_share:
            return False
        return self.used + self._held_elsewhere() + octets <= self.capacity

    def reservation(self, client: str = "") -> Reservation:
        return Reservation(self, client)


class Reservation:
    """What one mail transaction holds of the budget, grown as DATA arrives;
    :meth:`release` gives all of it back and may be called again."""

    __slots__ = ("_budget", "_client", "held")

    def __init__(self, budget: MemoryBudget, client: str = "") -> None:
        self._budget = budget
        self._client = client
        self.held = 0  # octets taken from the budget

    def fill(self, octets: int) -> bool:
        """Hold ``octets`` more of DATA; False (and nothing more held) when they do not fit."""
        if not self._budget.take(octets, self._client):
            return False
        self.held += octets
        return True

    def release(self) -> None:
        self._budget.give_back(self.held, self._client)
        self.held = 0


def declared_size(mail_options: list[str]) -> int:
    """The ``SIZE=`` of MAIL FROM's parameters (aiosmtpd checked it is digits), else 0."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def _glibc() -> ctypes.CDLL | None:
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # raises on C libraries other than glibc
        return ctypes.CDLL(None)
    except (ValueError, OSError, AttributeError):
        return None


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds and cap its heaps (before threads start);
    False when this is not glibc.  ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
    and ``MALLOC_ARENA_MAX`` given in the environment are left as they are."""
    if _LIBC is None:
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX)
    return True


class HeapTrimmer:
    """``malloc_trim(0)`` after large messages: at most once per ``interval`` seconds, and
    always once after the last message of a burst."""

    def __init__(self, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self._last = 0.0
        self._scheduled: asyncio.TimerHandle | None = None

    def after_message(self, octets: int) -> None:
        if _LIBC is None or octets < TRIM_FROM or self._scheduled is not None:
            return
        loop = asyncio.get_running_loop()
        wait = max(0.0, self._last + self.interval - loop.time())
        self._scheduled = loop.call_later(wait, self._trim)

    def _trim(self) -> None:
        self._scheduled = None
        self._last = asyncio.get_running_loop().time()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)

    def cancel(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
