"""The state of each entry a delivery worker holds: one step at a time, in the order the
worker's invariants allow, and every other step refused loudly (a bug, never ignored)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.delivery_util import make_config, pack, send_message
from workers.delivery.attempt import Prepared, prepare
from workers.delivery.held import HeldEntries, HeldEntry, InvariantBroken, State
from workers.streams.consumer import StreamEntry
from workers.streams.outcomes import Settlement
from workers.streams.retry import RetryPolicy

CONFIG = make_config("redis://127.0.0.1:1", "smtp://127.0.0.1:2525", concurrency=2)
POLICY = RetryPolicy(1.0, 10.0, 3, 3600.0)


def stream_entry(entry_id: str, message_id: str, to: str = "ann@example.com") -> StreamEntry:
    data = pack(send_message([to], message_id=message_id))
    return StreamEntry(entry_id, {b"data": data}, 1)


def prepared(entry: StreamEntry) -> Prepared:
    built = prepare(entry, CONFIG, POLICY)
    assert isinstance(built, Prepared)
    return built


def taken(held: HeldEntries, entry_id: str, message_id: str = "m") -> HeldEntry:
    entry = stream_entry(entry_id, message_id)
    taken = held.take(entry)
    assert taken is not None
    return taken


def queued(held: HeldEntries, entry_id: str, message_id: str = "m") -> HeldEntry:
    entry = taken(held, entry_id, message_id)
    entry.mark_prepared(prepared(entry.entry))
    entry.queue(list(entry.prepared.recipients))
    return entry


def settled_by_redis(entry: HeldEntry) -> None:
    entry.settled(Settlement(entry_id=entry.entry_id, message_id=entry.message_id))


def not_stopped() -> bool:
    return False


def test_a_sent_entry_goes_through_every_state_and_leaves_the_hand() -> None:
    held = HeldEntries(concurrency=2, stopped=not_stopped)
    entry = queued(held, "1-0")
    assert (entry.state, entry.holds_id, held.in_progress) == (State.QUEUED, True, 1)
    entry.start_sending(entry.recipients)
    entry.settle()
    # it keeps its message id until its record is written
    assert (entry.state, entry.holds_id, held.in_progress) == (State.SETTLING, True, 0)
    settled_by_redis(entry)
    assert entry.state == State.SETTLED
    assert "1-0" not in held and held.id_holder("m") is None


def test_an_entry_in_hand_is_not_taken_twice() -> None:
    held = HeldEntries(concurrency=2, stopped=not_stopped)
    queued(held, "1-0")
    assert held.take(stream_entry("1-0", "m")) is None


def _prepare(entry: HeldEntry) -> None:
    entry.mark_prepared(prepared(entry.entry))


def _queue(entry: HeldEntry) -> None:
    entry.queue(["ann@example.com"])


def _send(entry: HeldEntry) -> None:
    entry.start_sending(["ann@example.com"])


def _settle(entry: HeldEntry) -> None:
    entry.settle()


def _settled(entry: HeldEntry) -> None:
    settled_by_redis(entry)


def _hand_back(entry: HeldEntry) -> None:
    entry.hand_back()


def _settled_with_another_entrys_outcome(entry: HeldEntry) -> None:
    entry.settled(Settlement(entry_id="9-9", message_id="m"))


Step = Callable[[HeldEntry], None]
OUT_OF_ORDER: list[tuple[list[Step], Step]] = [
    ([], _queue),  # read, not built
    ([], _hand_back),  # nothing to hand back before it was built: it is settled instead
    ([_prepare], _send),  # recipients not looked up
    ([_prepare, _queue], _settle),  # queued: its lane decides, after its turn
    ([_prepare, _queue, _send], _settled),  # never given to the settler
    ([_prepare, _queue, _send, _settle], _hand_back),  # its outcome is on its way
    ([_prepare, _queue, _send, _settle], _settled_with_another_entrys_outcome),
    ([_prepare, _queue, _send, _settle, _settled], _settled),
    ([_prepare, _queue, _hand_back], _send),
]


@pytest.mark.parametrize(("legal", "illegal"), OUT_OF_ORDER)
def test_a_step_out_of_order_is_refused_and_changes_nothing(
    legal: list[Step], illegal: Step
) -> None:
    held = HeldEntries(concurrency=2, stopped=not_stopped)
    entry = taken(held, "1-0")
    for step in legal:
        step(entry)
    state, in_progress, holder = entry.state, held.in_progress, held.id_holder("m")
    with pytest.raises(InvariantBroken):
        illegal(entry)
    assert (entry.state, held.in_progress, held.id_holder("m")) == (state, in_progress, holder)


def test_nothing_is_sent_after_the_stop() -> None:
    stop = asyncio.Event()
    held = HeldEntries(concurrency=2, stopped=stop.is_set)
    entry = queued(held, "1-0")
    stop.set()
    with pytest.raises(InvariantBroken, match="after the stop"):
        entry.start_sending(entry.recipients)
    entry.hand_back()  # what the worker does instead
    assert "1-0" not in held and held.id_holder("m") is None


def test_at_most_twice_the_concurrency_is_in_progress() -> None:
    held = HeldEntries(concurrency=1, stopped=not_stopped)
    first, second = queued(held, "1-0", "a"), queued(held, "2-0", "b")
    assert held.room() == 0
    third = taken(held, "3-0", "c")
    with pytest.raises(InvariantBroken, match="in progress"):
        third.mark_prepared(prepared(third.entry))
    first.hand_back()
    third.mark_prepared(prepared(third.entry))  # room again
    assert held.in_progress == 2
    assert second.state is State.QUEUED


async def test_one_entry_at_a_time_holds_a_message_id() -> None:
    """The second entry with an id waits for the first one's record, not its reply."""
    held = HeldEntries(concurrency=2, stopped=not_stopped)
    first, second = queued(held, "1-0"), queued(held, "2-0")
    assert first.holds_id and not second.holds_id
    with pytest.raises(InvariantBroken, match="'m' is"):
        second.start_sending(second.recipients)  # without its turn
    first.start_sending(first.recipients)
    turn = asyncio.create_task(second.wait_for_id())
    first.settle()
    await asyncio.sleep(0.01)
    assert (turn.done(), second.state) == (False, State.WAITING_FOR_ID)
    settled_by_redis(first)
    await asyncio.wait_for(turn, 1)
    assert held.id_holder("m") is second
    second.start_sending(second.recipients)


async def test_an_entry_settled_without_a_send_gives_its_id_back_at_once() -> None:
    held = HeldEntries(concurrency=2, stopped=not_stopped)
    first, second = queued(held, "1-0"), queued(held, "2-0")
    turn = asyncio.create_task(second.wait_for_id())
    await asyncio.sleep(0)
    first.hand_back()
    await asyncio.wait_for(turn, 1)
    assert second.holds_id
    second.settle()  # nothing left to send after its turn
    assert held.id_holder("m") is None


async def test_an_id_let_go_goes_to_the_entry_waiting_for_it_not_to_a_newcomer() -> None:
    """The id passes to the waiter before its lane resumes: an entry with that id prepared
    in between waits in line.  (It used to take the id: the waiter waited for ever, and with
    --concurrency 1 the only lane with it while the newcomer sat behind it in the queue.)"""
    held = HeldEntries(concurrency=1, stopped=not_stopped)
    sending, waiting = queued(held, "1-0"), queued(held, "2-0")
    sending.start_sending(sending.recipients)
    sending.settle()
    turn = asyncio.create_task(waiting.wait_for_id())
    await asyncio.sleep(0)
    settled_by_redis(sending)
    newcomer = queued(held, "3-0")  # the same loop turn: the waiter has not resumed yet
    assert held.id_holder("m") is waiting and not newcomer.holds_id
    await asyncio.wait_for(turn, 1)
    waiting.start_sending(waiting.recipients)
    newcomers_turn = asyncio.create_task(newcomer.wait_for_id())
    waiting.settle()
    settled_by_redis(waiting)
    await asyncio.wait_for(newcomers_turn, 1)
    assert held.id_holder("m") is newcomer


async def test_entries_take_an_id_in_the_order_they_waited_and_a_cancelled_wait_is_skipped() -> (
    None
):
    held = HeldEntries(concurrency=4, stopped=not_stopped)
    holder = queued(held, "1-0")
    first, cancelled, last = queued(held, "2-0"), queued(held, "3-0"), queued(held, "4-0")
    turns = {e: asyncio.create_task(e.wait_for_id()) for e in (first, cancelled, last)}
    await asyncio.sleep(0)
    turns[cancelled].cancel()  # the stop: its lane hands it back
    holder.hand_back()
    assert held.id_holder("m") is first
    cancelled.hand_back()  # still in line, so it never held the id: nothing passes on
    assert held.id_holder("m") is first and not turns[last].done()
    first.settle()  # nothing left to send
    assert held.id_holder("m") is last
    await asyncio.wait_for(turns[last], 1)
    last.hand_back()
    assert held.id_holder("m") is None and turns[cancelled].cancelled()


def test_at_the_stop_every_entry_is_settled_settling_or_handed_back() -> None:
    held = HeldEntries(concurrency=2, stopped=not_stopped)
    sent, waiting = queued(held, "1-0", "a"), queued(held, "2-0", "b")
    sent.start_sending(sent.recipients)
    sent.settle()
    with pytest.raises(InvariantBroken, match="2-0"):
        held.check_drained()
    waiting.hand_back()
    held.check_drained()  # settling is allowed: the settler may still be flushing it
