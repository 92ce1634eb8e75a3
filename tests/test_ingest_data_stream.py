"""The DATA reader unstuffs and checks the message as it arrives, segment by segment: for
any octets cut into any chunks it gives what reading the whole section at once gives
(content, size, refusal, the octets left over for the command loop), and it fills and
gives back a memory reservation."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_ingest_data import _reader_with
from workers.ingest.data import END_OF_DATA, LINE_LIMIT, DataRefusal, read_data, unstuff
from workers.ingest.memory import MemoryBudget

# Octets that make line ends, transparency dots and end-of-data look-alikes likely.
_pieces = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"x" * 40, b"\x00"])
_octets = st.lists(_pieces, max_size=200).map(b"".join)


def _whole(data: bytes, size_limit: int | None) -> tuple[bytes, int, DataRefusal | None, bytes]:
    """Reference: the DATA section read at once (the reader this module replaced)."""
    stream = b"\r\n" + data
    end = stream.find(END_OF_DATA)
    stuffed = stream[2 : end + 2]
    leftover = stream[end + len(END_OF_DATA) :]
    if size_limit and len(stuffed) > size_limit:
        return b"", len(stuffed), DataRefusal.TOO_BIG, leftover
    if stuffed and max(map(len, stuffed.split(b"\r\n"))) + 2 > LINE_LIMIT:
        return b"", len(stuffed), DataRefusal.LINE_TOO_LONG, leftover
    return unstuff(stuffed), len(stuffed), None, leftover


async def _read_in_chunks(
    data: bytes, cuts: list[int], size_limit: int | None
) -> tuple[bytes, int, DataRefusal | None, bytes]:
    reader = asyncio.StreamReader()

    async def feed() -> None:
        position = 0
        for cut in sorted(cuts):
            reader.feed_data(data[position:cut])
            position = cut
            await asyncio.sleep(0)
        reader.feed_data(data[position:])
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    got = await read_data(reader, size_limit)
    await feeder
    assert got is not None
    leftover = await reader.read()
    return got.content, got.size, got.refusal, leftover


@settings(max_examples=300, deadline=None)
@given(
    body=_octets,
    long_line=st.integers(min_value=0, max_value=1100),
    tail=_octets,
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
    size_limit=st.sampled_from([None, 0, 50, 500, 2000]),
)
def test_chunked_reading_agrees_with_reading_at_once(
    body: bytes, long_line: int, tail: bytes, cuts: list[int], size_limit: int | None
) -> None:
    data = body + b"y" * long_line + tail + END_OF_DATA + b"NOOP\r\n"
    cuts = [cut for cut in cuts if cut <= len(data)]
    got = asyncio.run(_read_in_chunks(data, cuts, size_limit))
    assert got == _whole(data, size_limit)


async def test_a_message_the_budget_cannot_hold_is_drained_and_gives_its_share_back() -> None:
    budget = MemoryBudget(1000)
    other = budget.reservation()
    assert other.fill(600)
    reservation = budget.reservation()
    message = b"z" * 78 + b"\r\n"
    got = await read_data(_reader_with(message * 10 + b".\r\nQUIT\r\n"), None, reservation)
    assert got is not None and got.refusal is DataRefusal.NO_MEMORY and got.size == 800
    assert budget.used == 600  # what the refused message had taken is back
    other.release()
    got = await read_data(_reader_with(message * 10 + b".\r\n"), None, reservation)
    assert got is not None and got.refusal is None and got.content == message * 10
    assert budget.used == 800  # held until the transaction ends
    reservation.release()
    reservation.release()  # twice is harmless
    assert budget.used == 0


async def test_a_peer_that_hangs_up_gives_its_share_back() -> None:
    budget = MemoryBudget(10_000)
    reservation = budget.reservation()
    assert await read_data(_reader_with(b"x" * 300 + b"\r\n"), None, reservation) is None
    assert budget.used == 0


def test_every_line_is_measured_at_the_limit_wherever_it_lies() -> None:
    """Up to four lines each of one octet, half the limit, the longest allowed, one more
    than that, or two more (a window of lines passed at once, a line starting or ending
    one at its edge), read at once and cut at a few places: the refusal of reading the
    section whole, for every combination."""
    longest = LINE_LIMIT - 2
    lengths = [1, longest // 2, longest, longest + 1, longest + 2]
    for count in range(1, 5):
        for chosen in itertools.product(lengths, repeat=count):
            data = b"".join(b"y" * n + b"\r\n" for n in chosen) + b".\r\n"
            for cuts in ([], [len(data) // 2], [1000, 2000, 3000]):
                got = asyncio.run(_read_in_chunks(data, cuts, None))
                assert got[2] == _whole(data, None)[2], (chosen, cuts)
