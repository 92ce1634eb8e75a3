"""swaks (the Debian package) as the client: plain, pipelined, and STARTTLS + AUTH."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import redis.asyncio as aioredis

from tests.ingest_util import entries, ingest, make_certificate

# swaks --tls needs Perl's Net::SSLeay (libnet-ssleay-perl), which swaks only recommends:
# scripts/setup.sh installs both.
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SWAKS, "--server", "127.0.0.1", "--port", str(port), "--helo", "swaks.test",
         "--from", "alice@example.org", "--to", "bob@example.com", "--timeout", "10", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


async def test_swaks_plain_and_pipelined(redis_url: str, redis: aioredis.Redis) -> None:
    async with ingest(redis_url) as server:
        plain = await asyncio.to_thread(swaks, server.port, "--header", "Subject: from swaks")
        piped = await asyncio.to_thread(
            swaks, server.port, "--pipeline", "--header", "Subject: pipelined"
        )
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "<-  250 2.0.0 OK queued as " in plain.stdout
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert "PIPELINING" in piped.stdout
    subjects = [m["headers"]["subject"] for _, m in await entries(redis)]
    assert subjects == ["from swaks", "pipelined"]


async def test_swaks_starttls_auth(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    async with ingest(
        redis_url, tls_cert=str(cert), tls_key=str(key), auth_users="swaks:pw"
    ) as server:
        good = await asyncio.to_thread(
            swaks, server.port, "--tls", "--auth", "PLAIN", "--auth-user", "swaks",
            "--auth-password", "pw", "--header", "Subject: tls auth",
        )  # fmt: skip
        bad = await asyncio.to_thread(
            swaks, server.port, "--tls", "--auth", "LOGIN", "--auth-user", "swaks",
            "--auth-password", "nope",
        )  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    assert "235 2.7.0 Authentication successful" in good.stdout
    assert bad.returncode != 0
    assert "535 5.7.8" in bad.stdout
    [(_, msg)] = await entries(redis)
    assert msg["headers"]["subject"] == "tls auth"
    assert " with ESMTPSA id " in msg["header_list"][0][1]
