"""Redis's CPU per message on a Redis Cluster with N partitions against a standalone
redis-server with one partition, for ingest and for delivery (bench/redis_cost.py says how a
round runs and what is counted).

The issue's target: with N partitions on a cluster the per-message Redis cost stays within
10% of the standalone figure.  The cluster is tests/cluster_util.py's (3 primaries, 3
replicas, AOF everysec, started here unless ``--cluster-url`` names a running one); the
standalone server writes its AOF every second too.  Cluster CPU is summed over the
primaries; the replicas' is printed beside it.

Rounds alternate (standalone then cluster, then the other way round), and the figures are
medians: one round varies by half on a busy machine.  Each deployment's idle CPU (cron,
cluster bus pings; measured before the rounds) is printed, and the per-message figures are
given both raw and with it taken out.  Then, summed over the rounds, where the CPU went:
socket reads and writes per message and the costliest commands (INFO commandstats).

    python bench/cluster.py                 # 2 KB, 6 partitions, 5 rounds of 3000/2000 msgs
    python bench/cluster.py --quick         # 3 rounds of 1000 messages
    python bench/cluster.py --cluster-url redis+cluster://127.0.0.1:7000 --partitions 6
    python bench/cluster.py --split     # + one server split into 6 partitions: the split's cost
    python bench/cluster.py --sessions 50 --concurrency 60   # heavier load, bigger batches

What was found (2-core VM): a cluster with 1 partition costs what a standalone server with a
replica does.  With 6 partitions, ingest and delivery first cost 2-3x at 10 sessions /
concurrency 10, most of it the split itself: each partition batched alone (socket reads per
message 0.21 -> 0.8 for ingest, 0.36 -> 1.3 for delivery, also on one server split in 6).
Ingest then wrote a batch per partition in turn, and delivery read every partition in turn
into one window: at 50 sessions / concurrency 60 the split costs nothing measurable and the
cluster ~1.1x a standalone server with a replica (README, Capacity planning).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delivery import SmtpSink  # noqa: E402
from bench.ingest import Server  # noqa: E402
from bench.redis_cost import (  # noqa: E402
    Counters,
    Deployment,
    Round,
    built_size,
    cluster_deployment,
    command_profile,
    delivery_round,
    ingest_round,
    median,
    own_cluster,
    sized_messages,
    smtp_sink,
    standalone,
    start_ingest,
)
from workers.logs import configure_logging  # noqa: E402

SIZE = 2048
ROLES = ("ingest", "delivery")


@dataclass
class Side:
    """One deployment's ingest worker, idle CPU and rounds per role."""

    deployment: Deployment
    ingest: Server
    idle: float = 0.0  # CPU-s per second with no traffic
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {r: [] for r in ROLES})
    replica_cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))

    def us(self, role: str, *, net: bool) -> list[float]:
        idle = self.idle if net else 0.0
        return [r.redis_us_per_message(idle) for r in self.rounds[role]]

    def spent(self, role: str) -> tuple[Counters, int]:
        total = Counters()
        for r in self.rounds[role]:
            total = total + r.redis
        return total, sum(r.messages for r in self.rounds[role])


@contextmanager
def sides(args: argparse.Namespace, workdir: Path) -> Iterator[list[Side]]:
    with ExitStack() as stack:
        found_deployments = [stack.enter_context(standalone(workdir))]
        if args.replica:
            found_deployments.append(stack.enter_context(standalone(workdir, replica=True)))
        if args.split:
            split = standalone(workdir, replica=args.replica, partition_count=args.partitions)
            found_deployments.append(stack.enter_context(split))
        if args.cluster_url:
            cluster = cluster_deployment(args.cluster_url, args.partitions)
        else:
            started = own_cluster(workdir, args.partitions, replicas=args.replica)
            cluster = stack.enter_context(started)
        found: list[Side] = []
        for deployment in (*found_deployments, cluster):
            server = start_ingest(deployment, workdir / f"ingest-{len(found)}.log")
            stack.callback(server.stop)
            found.append(Side(deployment, server))
        yield found


async def run(args: argparse.Namespace, workdir: Path) -> list[Side]:
    with sides(args, workdir) as found, smtp_sink(workdir) as sink:
        size = built_size(sized_messages(1, SIZE, "size"))
        print(
            f"{SIZE} octet messages (delivery: {size} built), ingest {args.ingest_messages} and "
            f"delivery {args.delivery_messages} per round, {args.rounds} alternating rounds; "
            f"{args.sessions} SMTP sessions, delivery --concurrency {args.concurrency}",
            flush=True,
        )
        for side in found:  # warm-up (connections, function library, first use of memory)
            ingest_round(side.deployment, side.ingest, SIZE, args.warmup)
            await delivery_round(side.deployment, sink, sized_messages(args.warmup, SIZE, "warm"))
            side.idle = side.deployment.idle_cpu_per_second(args.idle_seconds)
            print(f"  {side.deployment.name}: idle {side.idle * 1e3:.2f} ms CPU/s", flush=True)
        for number in range(args.rounds):
            order = found if number % 2 == 0 else found[::-1]
            for side in order:
                await measure(side, sink, args, number)
        return found


async def measure(side: Side, sink: SmtpSink, args: argparse.Namespace, number: int) -> None:
    deployment = side.deployment
    replicas_before = deployment.replica_cpu()
    deployment.flush()
    done = ingest_round(deployment, side.ingest, SIZE, args.ingest_messages, args.sessions)
    side.rounds["ingest"].append(done)
    replicas_mid = deployment.replica_cpu()
    messages = sized_messages(args.delivery_messages, SIZE, f"r{number}")
    sent = await delivery_round(deployment, sink, messages, args.concurrency)
    side.rounds["delivery"].append(sent)
    side.replica_cpu["ingest"] += replicas_mid - replicas_before
    side.replica_cpu["delivery"] += deployment.replica_cpu() - replicas_mid
    print(
        f"  round {number + 1} {deployment.name:<16} ingest {done.redis_us_per_message():6.1f} "
        f"us/msg ({done.messages / done.seconds:5.0f} msg/s)  delivery "
        f"{sent.redis_us_per_message():6.1f} us/msg ({sent.messages / sent.seconds:5.0f} msg/s)",
        flush=True,
    )


def report(found: list[Side]) -> None:
    rounds = len(found[0].rounds["ingest"])
    print(f"\nRedis CPU per message, us, median of {rounds} rounds (net: idle CPU taken out)")
    print(f"{'role':<9} " + " ".join(f"{s.deployment.name:>24}" for s in found))
    for role in ROLES:
        cells = [
            f"{median(s.us(role, net=False)):>11.1f} (net {median(s.us(role, net=True)):5.1f})"
            for s in found
        ]
        print(f"{role:<9} " + " ".join(f"{c:>24}" for c in cells))
    cluster = found[-1]
    for base in found[:-1]:
        print(f"\n{cluster.deployment.name} / {base.deployment.name}:")
        for role in ROLES:
            print(ratio_line(cluster, base, role))
    for role in ROLES:
        print(f"\nwhere the Redis CPU of {role} went (all rounds):")
        for side in found:
            spent, messages = side.spent(role)
            replicas = side.replica_cpu[role] * 1e6 / messages
            note = f", replicas {replicas:.1f} us/msg beside" if side.deployment.replicas else ""
            print(f"  {side.deployment.name} ({messages} msgs{note})")
            print("\n".join(command_profile(spent, messages)))


def ratio_line(side: Side, base: Side, role: str) -> str:
    """RATIO <role>: ratio of medians (net), and the per-round ratios."""
    ours, theirs = side.us(role, net=False), base.us(role, net=False)
    ratio = median(ours) / median(theirs)
    net = median(side.us(role, net=True)) / median(base.us(role, net=True))
    each = " ".join(f"{x / y:.2f}" for x, y in zip(ours, theirs, strict=True))
    name = base.deployment.name.split()[0]
    return f"  RATIO cluster/{name} {role}: {ratio:.3f} (net {net:.3f}); per round {each}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1000 messages")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5, quick 3)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions on the cluster")
    parser.add_argument("--ingest-messages", type=int, help="per round (default 3000)")
    parser.add_argument("--delivery-messages", type=int, help="per round (default 2000)")
    parser.add_argument("--sessions", type=int, default=10, help="smtp-source sessions")
    parser.add_argument("--concurrency", type=int, default=10, help="delivery --concurrency")
    parser.add_argument("--warmup", type=int, default=300, help="messages per warm-up round")
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="idle CPU measured so long")
    parser.add_argument("--cluster-url", help="a running cluster (else one is started)")
    parser.add_argument(
        "--no-replica", dest="replica", action="store_false",
        help="no replicas: leave out the standalone server with a replica, and stop the "
        "replicas of the cluster started here (the primaries go on serving)",
    )  # fmt: skip
    parser.add_argument(
        "--split", action="store_true",
        help="also the standalone server (with its replica) split into --partitions partitions: "
        "what splitting costs without a cluster",
    )  # fmt: skip
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.ingest_messages = args.ingest_messages or (1000 if args.quick else 3000)
    args.delivery_messages = args.delivery_messages or (1000 if args.quick else 2000)
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="mailpool-bench-") as workdir:
        found = asyncio.run(run(args, Path(workdir)))
    report(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
