"""The container image, built from deploy/Dockerfile and run the way production runs it.

scripts/build-image.sh builds it with Debian's podman, runc and a base made by mmdebstrap
(no Docker here).  Ingest, two delivery workers and housekeeping then run as containers on
the host network against a redis-server of the test's own, on loopback ports: mail goes in
over SMTP and out to a recording relay, each container passes the image's HEALTHCHECK, and
SIGTERM (``podman stop``) ends each one with exit status 0.  One delivery container is
stopped with sends in hand: the other claims what it released at once, so every message is
delivered once and nothing stays pending.  Skipped only when podman cannot run here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import enqueue, send_message, settled
from tests.dns_util import DnsServer, running_dns, txt
from tests.harness import ROOT, RedisServer, free_port, wait_for_port, wait_until
from tests.ingest_util import entries, message, send_one
from tests.sinks import RecordingSink

BUILD = ROOT / "scripts" / "build-image.sh"
TAG = "localhost/mailpool:test"
TOOLS = ("podman", "runc", "mmdebstrap")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
# What these VMs need (see deploy/README.md): runc, and limits podman does not set itself.
RUN_OPTIONS = [
    "--network=host", "--runtime", "runc",
    "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
]  # fmt: skip
# Short SMTP timeouts so that --claim-after (which must exceed 2 x their sum) is seconds.
DELIVERY_OPTIONS = [
    "--concurrency", "1", "--smtp-timeout", "1", "--smtp-data-timeout", "2",
    "--claim-after", "7", "--shutdown-grace", "10",
]  # fmt: skip
SENDS = 20
STOP_SECONDS = "20"  # podman stop: SIGTERM, then SIGKILL after this many seconds

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"podman cannot run here: {', '.join(MISSING)} not installed "
    "(MAILPOOL_SETUP_DEV=1 scripts/setup.sh installs them)",
)


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


async def podman_async(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """podman from a test's event loop (the sink and Redis clients keep running meanwhile)."""
    return await asyncio.to_thread(podman, *args, timeout=timeout)


def build_image(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUILD), *args], capture_output=True, text=True, timeout=900, check=False, cwd=ROOT
    )


@pytest.fixture(scope="module")
def image() -> str:
    done = build_image("--tag", TAG)
    assert done.returncode == 0, done.stderr[-3000:]
    return TAG


@dataclass
class Containers:
    """Containers of the image started for one test; all removed at its end."""

    image: str
    redis_url: str
    names: list[str] = field(default_factory=list)

    async def start(self, role: str, *args: str) -> str:
        name = f"mailpool-test-{os.getpid()}-{len(self.names)}-{role}"
        http = f"127.0.0.1:{free_port()}"  # host network: never the image's 0.0.0.0:8080
        env = [f"MAILPOOL_REDIS_URL={self.redis_url}", f"MAILPOOL_HTTP={http}"]
        run = await podman_async(
            "run", "--detach", "--name", name, *RUN_OPTIONS,
            *(arg for pair in (("--env", e) for e in env) for arg in pair),
            self.image, role, *args,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        self.names.append(name)
        return name

    async def healthy(self, name: str) -> bool:
        """The image's HEALTHCHECK, run by podman inside the container."""
        return (await podman_async("healthcheck", "run", name)).returncode == 0

    async def stop(self, name: str) -> int:
        """SIGTERM (podman stop), then the container's exit status."""
        stopped = await podman_async("stop", "--time", STOP_SECONDS, name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        state = await podman_async("inspect", "--format", "{{.State.ExitCode}}", name)
        return int(state.stdout.strip())

    def logs(self, name: str) -> str:
        shown = podman("logs", name)  # the container's stderr (the log lines) on stderr
        return shown.stdout + shown.stderr


@pytest.fixture
async def containers(
    image: str, make_redis: Callable[..., RedisServer]
) -> AsyncIterator[Containers]:
    running = Containers(image, make_redis().url)
    try:
        yield running
    finally:
        for name in running.names:
            print(f"--- {name}\n{running.logs(name)}")  # shown when the test failed
            podman("rm", "--force", name)


async def consumers(redis: aioredis.Redis) -> dict[str, int]:
    """Consumer name -> entries pending on it, in the delivery group."""
    rows = await redis.xinfo_consumers("email.send", "delivery")
    return {row["name"].decode(): int(row["pending"]) for row in rows}


# The sender of tests.ingest_util.message, vouched for: the image's ingest verifies through
# this DNS server (its verification libraries are in the image and work).
SENDER_RECORDS = {
    "example.org": [("TXT", txt("v=spf1 ip4:127.0.0.1 -all"))],
    "_dmarc.example.org": [("TXT", txt("v=DMARC1; p=reject"))],
}


@pytest.fixture
def sender_dns(tmp_path: Path) -> Iterator[DnsServer]:
    with running_dns(tmp_path / "dns", ["example.org"], SENDER_RECORDS) as server:
        yield server


@pytest.mark.timeout(900)
async def test_image_runs_the_roles_end_to_end(
    containers: Containers, make_sink: Callable[..., RecordingSink], sender_dns: DnsServer
) -> None:
    sink = make_sink()
    sink.stall_data = 0.3  # sends take a while: each delivery container holds work
    smtp = free_port()
    ingest = await containers.start(
        "ingest", "--listen", f"127.0.0.1:{smtp}", "--dns-server", sender_dns.address
    )
    first = await containers.start("deliver", "--relay", sink.url, *DELIVERY_OPTIONS)
    second = await containers.start("deliver", "--relay", sink.url, *DELIVERY_OPTIONS)
    housekeeping = await containers.start(
        "housekeep", "--housekeep-interval", "1", "--consumer-idle", "3"
    )
    for name in (ingest, first, second, housekeeping):
        await wait_until(lambda n=name: containers.healthy(n), f"{name} healthy", timeout=60)
    redis = aioredis.Redis.from_url(containers.redis_url)
    try:
        # In: SMTP to the ingest container, stored in email.receive.
        await asyncio.to_thread(wait_for_port, smtp)
        assert (await send_one(smtp, message(subject="into the image")))[0] == 250
        [(_, received)] = await entries(redis)
        assert received["headers"]["subject"] == "into the image"
        assert received["auth"]["spf_mailfrom"]["result"] == "pass", received["auth"]
        assert received["auth"]["dmarc"]["result"] == "pass", received["auth"]

        # Out: sends for both delivery containers; each joins the group as its own consumer.
        for i in range(SENDS):
            await enqueue(redis, send_message([f"user{i}@example.com"], subject=f"out {i}"))
        await wait_until(lambda: two_consumers(redis), "both delivery containers reading")
        names = list(await consumers(redis))
        # Same host name (host network) and pid 1 in each container, and still two names.
        assert all(n.startswith(f"{socket.gethostname()}-1-") for n in names), names

        # SIGTERM with sends in hand: what the first released, the second claims at once;
        # what a read the stop cut off handed it, after --claim-after.
        assert await containers.stop(first) == 0
        logs = containers.logs(first)
        stopped = consumer_of(logs)
        in_hand = released(logs) + (await consumers(redis))[stopped]
        assert in_hand > 0, "stopped with nothing in hand"
        await wait_until(lambda: settled(redis), "every send settled", timeout=60)
        counts = sink.recipient_counts()
        assert len(counts) == SENDS and set(counts.values()) == {1}, counts
        # Housekeeping removes the stopped consumer once nothing is pending on it.
        await wait_until(lambda: gone(redis, stopped), "the stopped consumer removed", timeout=30)

        for name in (second, ingest, housekeeping):
            assert await containers.stop(name) == 0, name
        pending = await redis.xpending("email.send", "delivery")
        assert pending["pending"] == 0
    finally:
        await redis.aclose()


async def two_consumers(redis: aioredis.Redis) -> bool:
    return len(await consumers(redis)) == 2


async def gone(redis: aioredis.Redis, consumer: str) -> bool:
    return consumer not in await consumers(redis)


def released(logs: str) -> int:
    """How many entries a delivery container released at its stop, by its log."""
    lines = [json.loads(line) for line in logs.splitlines() if '"entries_released"' in line]
    return sum(int(line["count"]) for line in lines)


def consumer_of(logs: str) -> str:
    """The consumer name a delivery container logged at start and at a clean stop."""
    started = [json.loads(line) for line in logs.splitlines() if '"delivery_st' in line]
    assert [e["event"] for e in started] == ["delivery_started", "delivery_stopped"], logs
    assert started[0]["consumer"] == started[1]["consumer"]
    return str(started[0]["consumer"])


def test_a_failing_build_step_is_named(image: str, tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("ARG PYTHON_IMAGE\nFROM ${PYTHON_IMAGE}\nRUN exit 3\n")
    done = build_image("--tag", "localhost/mailpool:broken-test", "--dockerfile", str(broken))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("build-image: step 'build' failed (exit "), last


def test_a_wrong_option_is_one_line_and_status_2(tmp_path: Path) -> None:
    done = build_image("--dockerfile", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"build-image: no Dockerfile at {tmp_path / 'missing'}"
