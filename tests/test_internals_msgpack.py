"""What the wire codec relies on of msgpack beyond its documented API, checked against the
installed release: workers/codec/msgpack_fence.py.

Each test fails loudly, naming that file, when the installed msgpack is outside the range
the fence was checked against, decodes with the pure-Python fallback, or no longer behaves
as the fence says: the C unpacker's stack depth and the wording of an ext refusal, both
with ``unpackb`` and with ``Unpacker`` (wire.py decodes with each).
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest

from tests.internals_util import check_release
from workers.codec import msgpack_fence

FENCE = "workers/codec/msgpack_fence.py"


def _with_unpacker(data: bytes, **options: int) -> object:
    unpacker = msgpack.Unpacker(**options)
    unpacker.feed(data)
    return unpacker.unpack()


def _with_unpackb(data: bytes, **options: int) -> object:
    return msgpack.unpackb(data, **options)


DECODERS: list[Callable[..., object]] = [_with_unpackb, _with_unpacker]


def test_msgpack_decodes_with_its_c_unpacker() -> None:
    """The stack limit is the C unpacker's; the pure-Python fallback (a msgpack without a
    wheel for this Python) has none."""
    check_release("msgpack", msgpack_fence.CHECKED_RELEASES, FENCE)
    assert msgpack.Unpacker.__module__ == "msgpack._cmsgpack", (
        f"{FENCE}: msgpack's C extension is missing"
    )


def _nested_arrays(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]], ``depth`` arrays


@pytest.mark.parametrize("decode", DECODERS)
def test_the_c_unpacker_stack_holds_1024_levels(decode: Callable[..., object]) -> None:
    stack = msgpack_fence.UNPACKER_STACK
    assert decode(_nested_arrays(stack)) is not None, f"revisit {FENCE}: UNPACKER_STACK"
    with pytest.raises(msgpack.StackError):
        decode(_nested_arrays(stack + 1))
        pytest.fail(f"revisit {FENCE}: {stack + 1} levels decode: UNPACKER_STACK is wrong")


@pytest.mark.parametrize("decode", DECODERS)
def test_an_ext_refused_by_max_ext_len_is_recognised(decode: Callable[..., object]) -> None:
    ext = msgpack.packb(msgpack.ExtType(1, b"abcd"))
    with pytest.raises(ValueError) as refused:
        decode(ext, max_ext_len=0)
    assert msgpack_fence.is_ext_refusal(refused.value), (
        f"revisit {FENCE} is_ext_refusal: msgpack now says {refused.value!r}"
    )
    with pytest.raises(ValueError) as too_long:  # another limit is not taken for an ext
        decode(msgpack.packb("abcd"), max_str_len=2)
    assert not msgpack_fence.is_ext_refusal(too_long.value), f"{FENCE}: is_ext_refusal"
