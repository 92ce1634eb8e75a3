"""What a delivery worker holds: one :class:`HeldEntry` per entry read and not yet let go.

An entry's way through a worker, one :class:`HeldEntry` method per step:

=================  ==========================================  ==============
step               from                                        to
=================  ==========================================  ==============
``mark_prepared``  READ                                        PREPARED
``queue``          PREPARED                                    QUEUED
``wait_for_id``    QUEUED                                      WAITING_FOR_ID
``start_sending``  QUEUED, WAITING_FOR_ID                      SENDING
``settle``         READ, PREPARED, WAITING_FOR_ID, SENDING     SETTLING
``settled``        SETTLING                                    SETTLED
``hand_back``      PREPARED, QUEUED, WAITING_FOR_ID, SENDING   HANDED_BACK
=================  ==========================================  ==============

A step the table does not list raises :class:`InvariantBroken`: a bug in the worker,
never a condition to handle.  :meth:`HeldEntries.check` is the one place the worker's
invariants are checked (see :class:`workers.delivery.worker.DeliveryWorker`).  Entries
handed back after the stop from a state before SENDING never started an SMTP transaction:
:attr:`HeldEntries.unstarted_at_stop` lists them for the worker to release to the others.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable

from workers.delivery.attempt import Job, Prepared
from workers.streams import outcomes as oc
from workers.streams.consumer import StreamEntry


class InvariantBroken(RuntimeError):
    """A step or a state the delivery worker's invariants forbid: a bug, never ignored."""


class State(enum.Enum):
    READ = "read"  # taken from a read, not yet decoded
    PREPARED = "prepared"  # decoded and built; its recipients are being looked up
    QUEUED = "queued"  # recipients left to send: waits for a lane
    WAITING_FOR_ID = "waiting for its id"  # another entry here holds its message id
    SENDING = "sending"  # in an SMTP transaction, holding its message id
    SETTLING = "settling"  # its outcome is with the settler
    SETTLED = "settled"  # Redis applied the outcome: the entry is acknowledged
    HANDED_BACK = "handed back"  # let go without an outcome: it stays pending in the group

    # Members are singletons: identity hashing is correct, and in C; Enum's own __hash__
    # (hash of the name, in Python) was a third of the state bookkeeping's cost.
    __hash__ = object.__hash__


_NEXT: dict[State, frozenset[State]] = {
    State.READ: frozenset({State.PREPARED, State.SETTLING}),
    State.PREPARED: frozenset({State.QUEUED, State.SETTLING, State.HANDED_BACK}),
    State.QUEUED: frozenset({State.WAITING_FOR_ID, State.SENDING, State.HANDED_BACK}),
    State.WAITING_FOR_ID: frozenset({State.SENDING, State.SETTLING, State.HANDED_BACK}),
    State.SENDING: frozenset({State.SETTLING, State.HANDED_BACK}),
    State.SETTLING: frozenset({State.SETTLED}),
    State.SETTLED: frozenset(),
    State.HANDED_BACK: frozenset(),
}
# Entries between their preparation and their outcome: the window of 2 x --concurrency.
_IN_PROGRESS = frozenset({State.PREPARED, State.QUEUED, State.WAITING_FOR_ID, State.SENDING})
# Entries with neither an outcome nor a hand-back: none may be left when the worker stops.
_UNDECIDED = _IN_PROGRESS | {State.READ}


class HeldEntry:
    """One entry in hand: its state, and what the steps so far found out about it."""

    __slots__ = (
        "_held", "_prepared", "entry", "read_at", "recipients", "sent_before", "state",
        "suppressed",
    )  # fmt: skip

    def __init__(self, entry: StreamEntry, held: HeldEntries) -> None:
        self.entry = entry
        self.read_at = time.monotonic()  # when it came into hand
        self.state = State.READ
        self.recipients: list[str] = []  # to send to: set when queued, narrowed after a wait
        # Recipients not attempted (on the suppression list): until when; settled with it.
        self.suppressed: dict[str, float] = {}
        # Recipients an earlier entry with this message id sent it to: settled with it.
        self.sent_before: list[str] = []
        self._prepared: Prepared | None = None
        self._held = held

    def __repr__(self) -> str:
        return f"<HeldEntry {self.entry.id} {self.state.value}>"

    @property
    def entry_id(self) -> str:
        return self.entry.id

    @property
    def prepared(self) -> Prepared:
        if self._prepared is None:
            raise InvariantBroken(f"entry {self.entry.id} is {self.state.value}, not prepared")
        return self._prepared

    @property
    def job(self) -> Job:
        return self.prepared.job

    @property
    def message_id(self) -> str:
        return self.prepared.ref.message_id

    @property
    def holds_id(self) -> bool:
        """No other entry here may send this message id until this one lets it go."""
        return self._held.id_holder(self.message_id) is self

    @property
    def was_prepared(self) -> bool:
        return self._prepared is not None

    @property
    def undecided(self) -> bool:
        """Neither settling, settled nor handed back."""
        return self.state in _UNDECIDED

    # --- steps ---------------------------------------------------------------------------
    def mark_prepared(self, prepared: Prepared) -> None:
        """Built: takes its message id when no other entry here holds it."""
        self._prepared = prepared
        self._move(State.PREPARED)

    def queue(self, recipients: list[str]) -> None:
        """Recipients left after the idempotency check: to a lane."""
        self.recipients = recipients
        self._move(State.QUEUED)

    async def wait_for_id(self) -> None:
        """Take the message id, or wait in line until the entries before it let it go."""
        self._move(State.WAITING_FOR_ID)
        await self._held.take_id(self)

    def start_sending(self, recipients: list[str]) -> None:
        self.recipients = recipients
        self._move(State.SENDING)

    def settle(self) -> None:
        """Its outcome goes to the settler.  An entry that was sent keeps its message id
        until the outcome is applied (a second entry with that id re-checks against its
        record); one settled without a send gives it back now."""
        self._move(State.SETTLING)

    def settled(self, settlement: oc.Settlement) -> None:
        """Redis applied ``settlement`` (the settler's callback)."""
        if settlement.entry_id != self.entry.id:
            raise InvariantBroken(f"entry {self.entry.id} got {settlement.entry_id}'s outcome")
        self._move(State.SETTLED)

    def hand_back(self) -> None:
        """Let go without an outcome: the entry stays pending in the group and comes back
        to this consumer (a look at its own pending list) or to another (a claim)."""
        self._move(State.HANDED_BACK)

    def _move(self, to: State) -> None:
        was = self.state
        if to not in _NEXT[was]:
            raise InvariantBroken(f"entry {self.entry.id}: {was.value} -> {to.value}")
        self._held.check(self, to)
        self.state = to
        self._held.moved(self, was)


class Window:
    """The entries in progress (prepared, and neither settling nor handed back) of one
    worker, at most 2 x ``--concurrency``: each starts within one SMTP transaction of its
    read, so ``--claim-after`` never hands a live worker's entry to another."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.in_progress = 0
        self._room = asyncio.Event()  # in_progress fell to --concurrency or below
        self._one_finished = asyncio.Event()  # an entry left progress

    def room(self) -> int:
        """How many more entries the window of 2 x --concurrency has room for."""
        return 2 * self.concurrency - self.in_progress

    def full(self) -> bool:
        return self.in_progress >= 2 * self.concurrency

    async def room_freed(self) -> None:
        """Wait until no more than --concurrency entries are in progress."""
        self._room.clear()
        await self._room.wait()

    def next_finish(self) -> Coroutine[object, object, bool]:
        """Waits for the next entry to leave progress (armed now, not when first awaited:
        ``asyncio.wait_for`` starts it a loop turn later, and a finish in between counts)."""
        self._one_finished.clear()
        return self._one_finished.wait()

    def count(self, change: int) -> None:
        self.in_progress += change
        if change < 0:
            self._one_finished.set()
            if self.in_progress <= self.concurrency:
                self._room.set()


class HeldEntries:
    """The entries a worker holds (by entry id), which of them holds each message id, and
    the bookkeeping of their steps; :meth:`check` guards the worker's invariants."""

    def __init__(
        self, concurrency: int, stopped: Callable[[], bool], window: Window | None = None
    ) -> None:
        # The window may be shared: a worker reading several partitions holds each
        # partition's entries apart (entry ids repeat across streams) in one window.
        self.window = Window(concurrency) if window is None else window
        self._stopped = stopped
        self._entries: dict[str, HeldEntry] = {}
        self._id_holders: dict[str, HeldEntry] = {}  # message id -> the entry sending it
        # message id -> the entries waiting for it, first come first: the holder hands the
        # id to the first one directly, so an entry prepared meanwhile cannot take it.
        self._id_waiters: dict[str, deque[_Turn]] = {}
        # Entry ids settled since the current read was sent: that read's reply may still
        # list them (Redis answered it before the settlement's XACK, on another connection).
        self._settled_since_read: set[str] = set()
        # Let go of after the stop without a send started: nothing brings them back to this
        # consumer, and no relay has seen them (see DeliveryWorker._release_unstarted).
        self.unstarted_at_stop: list[StreamEntry] = []

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def take(self, entry: StreamEntry) -> HeldEntry | None:
        """``entry`` held from now on, or None when it is in hand already: a consumer
        re-reading its own pending entries must not start a second send of one."""
        if entry.id in self._entries:
            return None
        held = self._entries[entry.id] = HeldEntry(entry, self)
        return held

    def holds_all(self, entries: Iterable[StreamEntry]) -> bool:
        return all(entry.id in self._entries for entry in entries)

    def id_holder(self, message_id: str) -> HeldEntry | None:
        return self._id_holders.get(message_id)

    async def take_id(self, entry: HeldEntry) -> None:
        """Take the message id now if nobody holds it, else wait in line for it: each
        holder hands it to the first waiter (:meth:`_give_back_id`)."""
        message_id = entry.message_id
        if message_id not in self._id_holders:
            self._id_holders[message_id] = entry
            return
        turn = _Turn(entry)
        self._id_waiters.setdefault(message_id, deque()).append(turn)
        # Cancelled (the stop) while in line: the turn stays in line, cancelled, and is
        # skipped.  Cancelled once given: the lane hands the entry back, which passes it on.
        await turn.given

    # --- reading -------------------------------------------------------------------------
    def read_started(self) -> None:
        self._settled_since_read.clear()  # settled before this read: it cannot list them

    def not_settled_since_read(self, entries: list[StreamEntry]) -> list[StreamEntry]:
        if not self._settled_since_read:
            return entries
        return [e for e in entries if e.id not in self._settled_since_read]

    def read_at_stop(self, entries: list[StreamEntry]) -> None:
        """A read that returned after the stop: its entries are never taken, nor started."""
        self.unstarted_at_stop.extend(e for e in entries if e.id not in self._entries)

    @property
    def in_progress(self) -> int:
        """Entries in progress in the whole window (every partition's)."""
        return self.window.in_progress

    def room(self) -> int:
        return self.window.room()

    # --- invariants ----------------------------------------------------------------------
    def check(self, entry: HeldEntry, to: State) -> None:
        """The worker's invariants, checked before ``entry`` moves ``to`` its next state."""
        if to is State.PREPARED and self.window.full():
            raise InvariantBroken(f"more than 2 x {self.window.concurrency} entries in progress")
        if to is State.SENDING:
            if self._stopped():
                raise InvariantBroken(f"entry {entry.entry_id}: a send after the stop")
            if not entry.holds_id:
                holder = self._id_holders.get(entry.message_id)
                raise InvariantBroken(f"entry {entry.entry_id}: {entry.message_id!r} is {holder}'s")

    def check_drained(self) -> None:
        """At the stop, after the drain: every entry settled, settling or handed back."""
        undecided = [held for held in self._entries.values() if held.undecided]
        if undecided:
            raise InvariantBroken(f"entries neither settled nor handed back: {undecided[:5]}")

    # --- bookkeeping ---------------------------------------------------------------------
    def moved(self, entry: HeldEntry, was: State) -> None:
        """Bookkeeping after ``entry`` moved on from ``was``: message ids, counts, wake-ups."""
        now = entry.state
        if now is State.PREPARED and entry.message_id not in self._id_holders:
            # No holder means no waiters either: a holder hands its id to the first waiter.
            self._id_holders[entry.message_id] = entry
        elif now is State.SETTLING and was is not State.SENDING:
            self._give_back_id(entry)
        elif now is State.SETTLED:
            self._settled_since_read.add(entry.entry_id)
            self._let_go(entry)
        elif now is State.HANDED_BACK:
            self._let_go(entry)
            if was is not State.SENDING and self._stopped():
                self.unstarted_at_stop.append(entry.entry)
        if (now in _IN_PROGRESS) != (was in _IN_PROGRESS):
            self.window.count(+1 if now in _IN_PROGRESS else -1)

    def _let_go(self, entry: HeldEntry) -> None:
        del self._entries[entry.entry_id]
        self._give_back_id(entry)

    def _give_back_id(self, entry: HeldEntry) -> None:
        if not entry.was_prepared:
            return  # never prepared: it never had a message id
        message_id = entry.message_id
        if self._id_holders.get(message_id) is not entry:
            return
        waiters = self._id_waiters.get(message_id)
        while waiters:
            turn = waiters.popleft()
            if not turn.given.cancelled():
                self._id_holders[message_id] = turn.entry  # before it wakes: nobody cuts in
                turn.given.set_result(None)
                break
        else:
            del self._id_holders[message_id]
        if waiters is not None and not waiters:
            del self._id_waiters[message_id]


class _Turn:
    """An entry in line for a message id; ``given`` is done once the id is its own."""

    __slots__ = ("entry", "given")

    def __init__(self, entry: HeldEntry) -> None:
        self.entry = entry
        self.given: asyncio.Future[None] = asyncio.get_running_loop().create_future()
