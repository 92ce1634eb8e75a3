"""``schema/examples/go`` (redigo + vmihailenco/msgpack v5) built with Debian's Go and Debian's
packaged Go libraries (GOPATH mode: no module proxy is needed or reachable) and run against
real parts: its send is delivered intact by the Python delivery worker, and its listener prints
what `mailpool listen` prints for a message the real ingest server received over SMTP.
Skipped when Go or the libraries are missing (Debian: ``apt-get install golang-go
golang-github-gomodule-redigo-dev golang-github-vmihailenco-msgpack.v5-dev``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Awaitable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.examples_util import (
    EXAMPLES_DIR,
    Run,
    ScriptRun,
    expected_json,
    ingest_one_message,
    listener_takes_its_own_pending_first_and_skips_garbage,
    pending,
    producer_defaults_reach_the_pool_of_make_run,
    producer_send_is_delivered_intact,
    run_script,
)
from tests.sinks import RecordingSink

GO = shutil.which("go")
GOFMT = shutil.which("gofmt")
DEBIAN_GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put sources
GO_LIBRARIES = {
    "golang-github-gomodule-redigo-dev": "github.com/gomodule/redigo/redis",
    "golang-github-vmihailenco-msgpack.v5-dev": "github.com/vmihailenco/msgpack/v5",
}


def _go_missing() -> str | None:
    packages = " ".join(["golang-go", *GO_LIBRARIES])
    if GO is None:
        return f"go is not installed (Debian: apt-get install {packages})"
    if any(not (DEBIAN_GOPATH / "src" / path).is_dir() for path in GO_LIBRARIES.values()):
        return f"Debian's Go libraries are missing (apt-get install {packages})"
    return None


SKIP_REASON = _go_missing()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


@pytest.fixture(scope="module")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example, formatted, vetted and built once; the binary lands outside the source."""
    assert GO is not None
    binary = tmp_path_factory.mktemp("go-example") / "mailpool-example"
    source = EXAMPLES_DIR / "go"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(DEBIAN_GOPATH), "GOFLAGS": "",
           "GOPROXY": "off", "CGO_ENABLED": "0"}  # fmt: skip
    if GOFMT is not None:
        unformatted = subprocess.run(
            [GOFMT, "-l", "."], cwd=source, capture_output=True, text=True, check=True, timeout=60
        ).stdout
        assert unformatted == "", f"gofmt would change: {unformatted}"
    for command in ([GO, "vet", "."], [GO, "build", "-o", str(binary), "."]):
        result = subprocess.run(
            command, cwd=source, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return binary


def go(binary: Path, mode: str) -> Run:
    def run(cwd: Path, **env: str) -> Awaitable[ScriptRun]:
        return run_script(binary, mode, cwd=cwd, **env)

    return run


async def test_go_producer_send_is_delivered_intact(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, go_example: Path, tmp_path: Path
) -> None:
    produce = go(go_example, "produce")
    await producer_send_is_delivered_intact(produce, redis, redis_url, sink, tmp_path)


async def test_go_producer_defaults_reach_the_pool_of_make_run(
    redis: aioredis.Redis, redis_url: str, go_example: Path, tmp_path: Path
) -> None:
    produce = go(go_example, "produce")
    await producer_defaults_reach_the_pool_of_make_run(produce, redis, redis_url, tmp_path)


async def test_go_listener_prints_what_mailpool_listen_prints(
    redis: aioredis.Redis, redis_url: str, go_example: Path, tmp_path: Path
) -> None:
    """The same JSON as `mailpool listen` (text bodies as text, the rest base64), and the
    printed message is acknowledged."""
    await ingest_one_message(redis_url)
    [(entry_id, fields)] = await redis.xrange("email.receive")
    listened = await go(go_example, "listen")(
        tmp_path, REDIS_URL=redis_url, GROUP="billing", START="0", COUNT="1"
    )
    assert listened.returncode == 0, listened.stderr[-2000:]
    assert json.loads(listened.stdout) == expected_json(entry_id.decode(), fields[b"data"])
    assert await pending(redis, "billing") == 0


async def test_go_listener_takes_its_own_pending_first_and_skips_garbage(
    redis: aioredis.Redis, redis_url: str, go_example: Path, tmp_path: Path
) -> None:
    listen = go(go_example, "listen")
    await listener_takes_its_own_pending_first_and_skips_garbage(listen, redis, redis_url, tmp_path)
