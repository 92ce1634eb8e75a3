"""Every received message gets an id of its own (the entry's ``id``, the Received field's
``id``, the log lines'): 32 hex digits, never the same in two ingest processes, forked
ones included, nor after code in the process seeded ``random``."""

from __future__ import annotations

import multiprocessing
import random
import re

from workers.ingest.handler import received_id


def _child_ids(count: int) -> list[str]:
    return [received_id() for _ in range(count)]


def test_ids_are_32_hex_digits_and_all_differ() -> None:
    ids = [received_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_process_does_not_repeat_its_parents_ids() -> None:
    """``random``'s state is copied by fork; the module reseeds it in the child, else both
    would go on with the same ids."""
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(_child_ids, [100, 100])
    ours = _child_ids(100)
    everyone = ours + children[0] + children[1]
    assert len(set(everyone)) == len(everyone)


def test_seeding_random_does_not_make_ids_repeat() -> None:
    """A library or test framework in the process may seed ``random`` (Hypothesis does for
    each example); ids drawn from it then repeated, and any id told what the next would be."""
    random.seed(14)
    first = [received_id() for _ in range(3)]
    random.seed(14)
    again = [received_id() for _ in range(3)]
    assert not set(first) & set(again)
