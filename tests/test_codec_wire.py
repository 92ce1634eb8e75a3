"""msgpack wire format: lossless str/bin round trip and hostile input giving clean WireErrors."""

from __future__ import annotations

import struct
import time

import msgpack
import pytest

from workers.codec import DEFAULT_LIMITS, CodecError, WireError, WireLimits, pack, unpack

MESSAGE = {
    "from": "alice@example.com",
    "to": ["bob@example.org"],
    "headers": {"subject": "Grüße"},
    "content": {"content-type": "text/plain", "body": b"\x00\xffbinary"},
    "version": 1,
    "max_age": 3600.5,
}


def test_pack_unpack_round_trip_keeps_str_and_bin_apart() -> None:
    data = pack(MESSAGE)
    assert unpack(data) == MESSAGE
    # str is msgpack str (0xa0-0xbf, 0xd9-0xdb), bytes is msgpack bin (0xc4-0xc6)
    assert b"\xc4\x08\x00\xffbinary" in data
    assert "Grüße".encode() in data
    assert isinstance(unpack(data)["content"]["body"], bytes)


def test_pack_refuses_what_msgpack_cannot_carry() -> None:
    with pytest.raises(WireError, match="cannot encode as msgpack"):
        pack({"x": object()})


def test_default_limits_are_documented_values() -> None:
    assert DEFAULT_LIMITS.max_bytes == 50 * 1024 * 1024
    assert DEFAULT_LIMITS.max_depth == 64


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty entry"),
        (b"\x81\xa4from", "truncated"),
        (pack(MESSAGE)[:-3], "truncated"),
        (b"\x93\x01\x02\x03", "top level must be a msgpack map, got array"),
        (b"\xa3abc", "top level must be a msgpack map, got str"),
        (b"\xc0", "top level must be a msgpack map, got nil"),
        (pack(MESSAGE) + b"\xc0", "1 bytes of trailing data"),
        (b"\x81\x01\xa1x", "int is not allowed for map key"),
        (b"\x81\xa1k\x81\xc4\x01k\xc0", "map key must be a str, got bin"),
        (b"\x81\xa1k\xd4\x05\x00", "ext types are not allowed"),
        (b"\x81\xa1k\xc7\x03\x01abc", "ext types are not allowed"),
        (b"\x81\xa1k\xa2\xff\xfe", "not valid UTF-8"),
        (b"\x81\xa1k\xc1", "reserved or unknown type code"),
    ],
)
def test_malformed_input_gives_a_clear_wire_error(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        unpack(data)
    assert reason in str(caught.value)
    assert isinstance(caught.value, CodecError) and isinstance(caught.value, ValueError)


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(WireError, match="expected bytes, got str"):
        unpack("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "limits", "reason"),
    [
        # declared lengths far beyond the data: refused without allocating them
        (b"\xdb" + struct.pack(">I", 0xFFFFFFFF), DEFAULT_LIMITS, "truncated"),
        (b"\xc6" + struct.pack(">I", 0xFFFFFFFF), DEFAULT_LIMITS, "truncated"),
        (b"\xdd" + struct.pack(">I", 0xFFFFFFFF), DEFAULT_LIMITS, "exceeds max_array_len"),
        (b"\xdf" + struct.pack(">I", 0xFFFFFFFF), DEFAULT_LIMITS, "exceeds max_map_len"),
        (b"\xa5hello", WireLimits(max_str_len=4), "exceeds max_str_len"),
        (b"\xc4\x05hello", WireLimits(max_bin_len=4), "exceeds max_bin_len"),
        (b"\x93\x01\x02\x03", WireLimits(max_array_len=2), "exceeds max_array_len"),
    ],
)
def test_declared_lengths_over_a_limit_are_refused(
    header: bytes, limits: WireLimits, reason: str
) -> None:
    data = b"\x81\xa1k" + header
    started = time.perf_counter()
    with pytest.raises(WireError, match=reason):
        unpack(data, limits)
    assert time.perf_counter() - started < 1.0


def test_total_size_limit_is_checked_before_decoding() -> None:
    data = pack({"body": b"x" * 2000})
    with pytest.raises(WireError, match=f"entry of {len(data)} bytes exceeds the limit of 1000"):
        unpack(data, WireLimits(max_bytes=1000))
    assert unpack(data, WireLimits(max_bytes=len(data)))["body"] == b"x" * 2000


def nested(depth: int) -> bytes:
    """A map holding arrays nested ``depth`` levels deep (the map is level 1)."""
    return b"\x81\xa1k" + b"\x91" * (depth - 1) + b"\xc0"


def test_depth_limit_counts_maps_and_arrays() -> None:
    limits = WireLimits(max_depth=10)
    assert unpack(nested(10), limits)["k"] is not None
    with pytest.raises(WireError, match="nesting deeper than 10 levels"):
        unpack(nested(11), limits)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_pathological_nesting_is_a_clean_error_not_a_crash(depth: int) -> None:
    for data in (nested(depth), b"\x91" * depth + b"\xc0", b"\x81\xa1k" * depth + b"\xc0"):
        with pytest.raises(WireError, match="nesting deeper than"):
            unpack(data)


def test_depth_walk_is_iterative_and_checks_nested_keys() -> None:
    wide = {"k": [{"a": [1, 2, {"b": "c"}]}] * 1000}
    assert unpack(pack(wide)) == wide
    # a bin key hidden deep inside an array is still found
    deep_bin_key = msgpack.packb({"k": [[{b"bin": 1}]]}, use_bin_type=True)
    with pytest.raises(WireError, match="map key must be a str"):
        unpack(deep_bin_key)
