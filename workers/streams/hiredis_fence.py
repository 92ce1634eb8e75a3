"""hiredis, used directly: packing the settlement commands.

``hiredis.pack_command`` is hiredis-py's documented packer (hiredis >= 2.2.1); redis-py uses
it too, but its ``Connection.pack_commands`` first encodes every argument in Python, and a
settlement carries dozens.  Packing with hiredis directly saves 8% of the delivery worker's
CPU per message (``bench/redis_fence.py --variant packer``: 0.92 and 0.915 msg/CPU-s with
redis-py's packer, two runs of 4 and 6 alternated rounds; hiredis 3.5.0, redis-py 8.2.0).

``tests/test_internals_redis.py`` checks the release range and the packed octets.
"""

from __future__ import annotations

from collections.abc import Sequence

import hiredis

# The releases this module was checked against (tests/test_internals_redis.py).
CHECKED_RELEASES = ">=2.2.1,<4"


def pack_command(arguments: Sequence[str | bytes | int]) -> bytes:
    """One command in the Redis protocol (str as UTF-8, int as decimal text)."""
    # hiredis's stub declares a 1-tuple; it takes a tuple of any length.
    packed: bytes = hiredis.pack_command(tuple(arguments))  # type: ignore[arg-type]
    return packed
