"""The connection cap (421 4.7.0 beyond --max-connections, and room again once a session ends)
and the start-up refusals of bad configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ingest_util import SMTPConn, ingest, ingest_config, message
from workers.config import ConfigError
from workers.ingest import running_ingest


async def test_421_beyond_the_connection_cap(redis_url: str) -> None:
    async with ingest(redis_url, max_connections=2) as server:
        first = await SMTPConn.open(server.port)
        second = await SMTPConn.open(server.port)
        third = await SMTPConn.open(server.port, greet=False)
        code, text = await third.reply()
        assert (code, text.split()[0]) == (421, "4.7.0")
        assert await third.closed_by_server()
        # The sessions within the cap work normally.
        await second.ehlo()
        assert (await second.transaction(message()))[0] == 250
        assert (await first.cmd("QUIT"))[0] == 221
        assert await first.closed_by_server()
        again = await SMTPConn.open(server.port)  # greeted with 220: room again
        await again.close()
        await second.close()


async def test_port_in_use_is_a_start_up_error(redis_url: str) -> None:
    async with ingest(redis_url) as server:
        config = ingest_config(redis_url, listen=f"127.0.0.1:{server.port}")
        with pytest.raises(ConfigError, match="cannot listen"):
            async with running_ingest(config):
                pass


async def test_unreadable_certificate_is_a_start_up_error(redis_url: str, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    config = ingest_config(redis_url, tls_cert=str(cert), tls_key=str(cert))
    with pytest.raises(ConfigError, match="--tls-cert"):
        async with running_ingest(config):
            pass


def test_bad_auth_line_names_the_line_not_the_secret(redis_url: str, tmp_path: Path) -> None:
    from tests.ingest_util import make_certificate
    from workers.ingest.auth import load_credentials

    users = tmp_path / "users"
    users.write_text("ok:pw\nnopassword-s3cret\n")
    with pytest.raises(ConfigError) as caught:
        load_credentials(str(users), None)
    assert "line 2" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert make_certificate  # (imported lazily: cryptography is only needed for TLS tests)
