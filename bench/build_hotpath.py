"""Delivery hot path benchmark: ``build_message(unpack(data))`` per message shape.

    python bench/build_hotpath.py            # best of 5 rounds of 2000 calls per shape
    python bench/build_hotpath.py --quick    # best of 3 rounds of 300 calls

Prints µs per call for each shape, and next to it a floor measured in the same run: a plain
``msgpack.unpackb(data)`` plus one ``bytes.join`` of the built size (what any decode + build
must pay at least).  The ratio ours/floor is comparable across machines and runs.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.codec.build import build_message
from workers.codec.wire import pack, unpack
from workers.producer import make_send_message

FILLER = ("The quick brown fox jumps over the lazy dog. " * 2 + "\n") * 19  # ~2 KB, as delivery


def shapes() -> dict[str, bytes]:
    """Packed send messages: the delivery benchmark's typical one and the other common shapes."""
    common: dict[str, Any] = {"from_": "bench@example.com", "to": ["rcpt1@example.net"]}
    messages = {
        "text 2KB": make_send_message(**common, subject="bench t message 1", text=FILLER),
        "alternative": make_send_message(
            **common, subject="alt", text=FILLER, html=f"<p>{FILLER}</p>"
        ),
        "non-ascii": make_send_message(
            **common,
            subject="Grüße aus Köln – Bestätigung Ihrer Bestellung",
            text=FILLER,
            headers={
                "From": "Jürgen Müller <bench@example.com>",
                "To": "Zoë Ångström <rcpt1@example.net>",
            },
        ),
    }
    attached = make_send_message(**common, subject="report", text=FILLER)
    attached["content"] = {
        "content-type": "multipart/mixed",
        "parts": [
            attached["content"],
            {
                "content-type": "application/pdf",
                "filename": "report.pdf",
                "body": bytes(range(256)) * 64,
            },
        ],
    }
    messages["attachment 16KB"] = attached
    return {label: pack(message) for label, message in messages.items()}


def best_us(call: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    number, repeat = (300, 3) if args.quick else (2000, 5)
    print(f"{'shape':<16} {'ours µs':>9} {'floor µs':>9} {'ours/floor':>10}")
    for label, data in shapes().items():

        def ours(data: bytes = data) -> object:
            return build_message(unpack(data), default_id="1-0", hostname="bench.invalid")

        size = len(build_message(unpack(data), default_id="1-0", now=0.0).data)
        pieces = [b"x" * (size // 8)] * 8

        def floor(data: bytes = data, pieces: list[bytes] = pieces) -> object:
            msgpack.unpackb(data)
            return b"".join(pieces)

        mine, base = best_us(ours, number, repeat), best_us(floor, number, repeat)
        print(f"{label:<16} {mine:>9.1f} {base:>9.1f} {mine / base:>10.1f}")


if __name__ == "__main__":
    main()
