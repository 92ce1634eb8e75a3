"""What the aiosmtplib reach-ins of workers/relay/aiosmtplib_fence.py buy, measured.

The delivery worker (``bench/delivery.py``'s worker side: N pre-enqueued 2 KB sends into
``smtp-sink``) runs with its SMTP transaction swapped for one written here, in rounds that
alternate with the code as it is (the order rotates each round, so a drift of the machine's
load falls on all alike).  Printed: each round, then the median over rounds of
variant/current (and variant/copy) for msg/s (wall) and msg per CPU-second of this process.

Variants (all the same transaction, MAIL, RCPT per recipient, DATA, written here with
public names only):

* ``copy``: as the relay does it to a relay without PIPELINING (commands through
  ``SMTP.execute_command``, the message through the fence) less its handling of refusals,
  which smtp-sink never sends: the base the two others are compared with (``current``
  pipelines, and chains transactions across the final dot, so copy/current is below 1);
* ``data``: the message through ``SMTP.data`` instead of the fence (what the fence buys);
* ``commands``: MAIL and RCPT through ``SMTP.mail`` and ``SMTP.rcpt``, which parse every
  address again, instead of ``SMTP.execute_command`` (public API either way).

    python bench/relay_fence.py                       # N=3000, 5 rounds, every variant
    python bench/relay_fence.py -n 5000 --rounds 7 data
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402

import workers.relay  # noqa: E402
from bench.delivery import Result, SmtpSink, make_messages, run_worker, sink_and_redis  # noqa: E402
from tests.harness import RedisServer  # noqa: E402
from workers.codec.build import BuiltMessage  # noqa: E402
from workers.logs import configure_logging  # noqa: E402
from workers.relay import (  # noqa: E402
    SendResult,
    TransactionResult,
    dot_stuffed,
)
from workers.relay.pipelining import Chain  # noqa: E402


async def _mail_and_rcpts(smtp: aiosmtplib.SMTP, message: BuiltMessage, public: bool) -> None:
    size = [b"SIZE=%d" % len(message.data)] if smtp.supports_extension("size") else []
    if public:
        await smtp.mail(message.mail_from, options=[option.decode() for option in size])
        for rcpt in message.recipients:
            await smtp.rcpt(rcpt)
        return
    await smtp.execute_command(b"MAIL", b"FROM:<" + message.mail_from.encode() + b">", *size)
    for rcpt in message.recipients:
        await smtp.execute_command(b"RCPT", b"TO:<" + rcpt.encode() + b">")


Transaction = Callable[
    [aiosmtplib.SMTP, BuiltMessage, Sequence[str], float, float, object],
    Awaitable[TransactionResult],
]


def transaction_variant(*, public_commands: bool, public_data: bool) -> Transaction:
    """A transaction for the benchmark's messages (every recipient accepted)."""

    async def transaction(
        smtp: aiosmtplib.SMTP,
        message: BuiltMessage,
        recipients: Sequence[str],
        deadline: float,
        data_timeout: float,
        link: object = None,  # the pool's: no transaction follows a variant's (no chain)
    ) -> TransactionResult:
        async with asyncio.timeout_at(deadline):
            await _mail_and_rcpts(smtp, message, public_commands)
            if not public_data:  # as the relay client does: our protocol from the 354 on
                await smtp.execute_command(b"DATA")
                chain = Chain(smtp)
                chain.transport.write(dot_stuffed(message.data))
                await chain.channel.drained()
        if public_data:
            reply = await smtp.data(message.data, timeout=data_timeout)
        else:
            chain.channel.expire_at(asyncio.get_running_loop().time() + data_timeout, TimeoutError)
            reply = await chain.channel.reply()
            chain.end()
        if reply.code != 250:
            raise SystemExit(f"the relay refused a benchmark message: {reply}")
        accepted = workers.relay.Reply(reply.code, reply.message)
        result = SendResult(accepted=list(recipients), accepted_reply=accepted)
        return TransactionResult(result, reusable=True)

    return transaction


VARIANTS = {
    "copy": transaction_variant(public_commands=False, public_data=False),
    "data": transaction_variant(public_commands=False, public_data=True),
    "commands": transaction_variant(public_commands=True, public_data=False),
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    original = workers.relay.transaction
    if name != "current":
        workers.relay.transaction = VARIANTS[name]  # type: ignore[assignment]
    try:
        yield
    finally:
        workers.relay.transaction = original


async def one_round(name: str, sink: SmtpSink, server: RedisServer, n: int, tag: str) -> Result:
    with variant(name):
        result = await run_worker(sink, server, make_messages(n, tag), 10)
    print(
        f"  {name:<9} {result.rate:8.0f} msg/s {result.per_cpu_second:8.0f} msg/CPU-s", flush=True
    )
    return result


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    names = ["current", *args.variants]
    with sink_and_redis(workdir) as (sink, server):
        for name in names:  # warm-up, not reported
            await one_round(name, sink, server, min(args.n, 1000), f"warm-{name}")
        rounds: list[dict[str, Result]] = []
        for number in range(args.rounds):
            turn = number % len(names)
            order = names[turn:] + names[:turn]
            rounds.append(
                {
                    name: await one_round(name, sink, server, args.n, f"{name}{number}")
                    for name in order
                }
            )
    for name in args.variants:
        print_median_ratio(rounds, name, "current")
        if name != "copy" and "copy" in names:
            print_median_ratio(rounds, name, "copy")


def print_median_ratio(rounds: list[dict[str, Result]], name: str, base: str) -> None:
    """The median over rounds of name/base (each round's pair ran back to back)."""
    wall = statistics.median(r[name].rate / r[base].rate for r in rounds)
    cpu = statistics.median(r[name].per_cpu_second / r[base].per_cpu_second for r in rounds)
    print(f"median {name}/{base}: {wall:.3f} msg/s, {cpu:.3f} msg/CPU-s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=3000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each variant")
    parser.add_argument("variants", nargs="*", help=f"some of {', '.join(VARIANTS)} (all)")
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    args.variants = args.variants or list(VARIANTS)
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="mailpool-relay-fence-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
