"""STARTTLS with a certificate generated here, the implicit-TLS listener, AUTH PLAIN/LOGIN only
after TLS, --require-tls, --auth-required, and nothing answered to commands pipelined
behind STARTTLS (RFC 3207 section 4.2), however many."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import redis.asyncio as aioredis

from tests.harness import wait_until
from tests.ingest_util import SMTPConn, client_tls, entries, ingest, message


def _smtplib_send(
    port: int, cert: Path, user: str | None, password: str | None
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        client.starttls(context=client_tls(cert))
        client.ehlo()
        if user is not None and password is not None:
            client.login(user, password)
        return client.sendmail("alice@example.org", ["bob@example.com"], message("over tls"))


async def test_starttls_then_auth_plain_with_smtplib(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    async with ingest(
        redis_url, tls_cert=str(cert), tls_key=str(key), auth_users="carol:s3cret"
    ) as server:
        refused = await asyncio.to_thread(_smtplib_send, server.port, cert, "carol", "s3cret")
        assert refused == {}
        with pytest.raises(smtplib.SMTPAuthenticationError):
            await asyncio.to_thread(_smtplib_send, server.port, cert, "carol", "wrong")
    [(_, msg)] = await entries(redis)
    assert " with ESMTPSA id " in msg["header_list"][0][1]


async def test_auth_only_after_tls_and_login_mechanism(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    users = tmp_path / "users"
    users.write_text("# comment\ndave:pa:ss\n")
    async with ingest(
        redis_url, tls_cert=str(cert), tls_key=str(key), auth_file=str(users), auth_required=True
    ) as server:
        conn = await SMTPConn.open(server.port)
        extensions = await conn.ehlo()
        assert "STARTTLS" in extensions
        assert not any(e.startswith("AUTH") for e in extensions)
        assert (await conn.cmd("AUTH PLAIN AGRhdmUAcGE6c3M="))[0] == 538
        assert (await conn.cmd("MAIL FROM:<a@example.org>"))[0] == 530  # --auth-required
        await conn.starttls(client_tls(cert))
        extensions = await conn.ehlo()
        assert "AUTH LOGIN PLAIN" in extensions
        assert "STARTTLS" not in extensions
        assert (await conn.cmd("AUTH LOGIN"))[0] == 334
        assert (await conn.cmd("ZGF2ZQ=="))[0] == 334  # "dave"
        assert (await conn.cmd("cGE6c3M="))[0] == 235  # "pa:ss"
        code, _ = await conn.transaction(message("authenticated"))
        assert code == 250
        await conn.close()
    assert len(await entries(redis)) == 1


async def test_starttls_inside_tls_is_refused_and_the_session_goes_on(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path]
) -> None:
    """RFC 3207 section 4.2: no STARTTLS once TLS is on (aiosmtpd 1.4.6 answered 220 and
    began a handshake inside the TLS session, which ended it)."""
    cert, key = certificate
    async with ingest(redis_url, tls_cert=str(cert), tls_key=str(key)) as server:
        conn = await SMTPConn.open_session(server.port)
        await conn.starttls(client_tls(cert))
        await conn.ehlo()
        code, text = await conn.cmd("STARTTLS")
        stored = await conn.transaction(message("still encrypted"))
        await conn.close()
    assert (code, text.split()[0]) == (503, "5.5.1")
    assert stored[0] == 250
    assert len(await entries(redis)) == 1


async def test_auth_without_credentials_configured_is_not_enabled(
    redis_url: str, certificate: tuple[Path, Path]
) -> None:
    """No credentials, no AUTH: 503 5.5.1, before TLS as after, not 538 "encryption
    required" as if STARTTLS would help."""
    cert, key = certificate
    async with ingest(redis_url, tls_cert=str(cert), tls_key=str(key)) as server:
        conn = await SMTPConn.open_session(server.port)
        before = await conn.cmd("AUTH PLAIN AGNhcm9sAHMzY3JldA==")
        await conn.starttls(client_tls(cert))
        assert not any(e.startswith("AUTH") for e in await conn.ehlo())
        after = await conn.cmd("AUTH PLAIN AGNhcm9sAHMzY3JldA==")
        await conn.close()
    assert [(c, t.split()[0]) for c, t in (before, after)] == [(503, "5.5.1")] * 2


async def test_require_tls_and_aiosmtplib_starttls(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    async with ingest(redis_url, tls_cert=str(cert), tls_key=str(key), require_tls=True) as server:
        conn = await SMTPConn.open_session(server.port)
        code, text = await conn.cmd("MAIL FROM:<a@example.org>")
        assert (code, text.split()[0]) == (530, "5.7.0")
        await conn.close()
        await aiosmtplib.send(
            message("tls required"),
            sender="alice@example.org",
            recipients=["bob@example.com"],
            hostname="127.0.0.1",
            port=server.port,
            start_tls=True,
            tls_context=client_tls(cert),
        )
    [(_, msg)] = await entries(redis)
    assert " with ESMTPS id " in msg["header_list"][0][1]


async def test_implicit_tls_listener(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    async with ingest(
        redis_url,
        tls_cert=str(cert),
        tls_key=str(key),
        tls_listen="127.0.0.1:0",
        auth_users="erin:pw",
    ) as server:
        assert server.tls_port
        conn = await SMTPConn.open(server.tls_port, ssl_context=client_tls(cert))
        extensions = await conn.ehlo()
        assert "STARTTLS" not in extensions
        # RFC 3207 section 4.2, as after a STARTTLS: TLS is on, so no other is started.
        starttls = await conn.cmd("STARTTLS")
        listed = (await conn.cmd("HELP"))[1].split()
        assert "AUTH" in listed and "STARTTLS" not in listed, listed
        assert "AUTH LOGIN PLAIN" in extensions  # the connection is already encrypted
        assert (await conn.cmd("AUTH PLAIN AGVyaW4AcHc="))[0] == 235
        code, _ = await conn.transaction(message("implicit"))
        assert code == 250
        await conn.close()
    assert (starttls[0], starttls[1].split()[0]) == (503, "5.5.1"), starttls
    [(_, msg)] = await entries(redis)
    assert " with ESMTPSA id " in msg["header_list"][0][1]


async def test_commands_pipelined_behind_starttls_are_discarded(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path]
) -> None:
    """The STARTTLS command injection (CVE-2011-0411 class): plaintext sent after STARTTLS in
    the same packet must not be executed inside the TLS session."""
    cert, key = certificate
    async with ingest(redis_url, tls_cert=str(cert), tls_key=str(key)) as server:
        conn = await SMTPConn.open_session(server.port)
        await conn.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<x@example.com>\r\n")
        code, _ = await conn.reply()
        assert code == 220
        await conn.writer.start_tls(client_tls(cert), server_hostname="localhost")
        # The first reply inside TLS answers our NOOP, not the injected MAIL.
        code, text = await conn.cmd("NOOP")
        assert (code, text) == (250, "2.0.0 OK")
        await conn.ehlo()
        # No transaction was started by the injected commands.
        assert (await conn.cmd("RCPT TO:<x@example.com>"))[0] == 503
        await conn.close()
    assert await entries(redis) == []


@pytest.mark.parametrize("kilobytes", [40, 400])
async def test_a_flood_pipelined_behind_starttls_ends_the_session_at_once(
    redis_url: str, redis: aioredis.Redis, certificate: tuple[Path, Path], kilobytes: int
) -> None:
    """More plaintext behind STARTTLS than a session's reader holds before it pauses its
    transport (32 KiB).  The server drops what it holds and reads on: the handshake either
    completes (all of the plaintext had been read, and none of it is answered) or fails on
    the plaintext that follows, and the session ends.  Either way at once: before, the
    paused transport kept the client's TLS hello from the handshake until the command
    timeout (30 s here)."""
    cert, key = certificate
    async with ingest(
        redis_url, tls_cert=str(cert), tls_key=str(key), command_timeout=30.0
    ) as server:
        conn = await SMTPConn.open_session(server.port)
        noop = b"NOOP " + b"x" * 500 + b"\r\n"
        conn.writer.write(b"STARTTLS\r\n" + noop * (2 * kilobytes))
        assert (await conn.reply())[0] == 220
        handshake = conn.writer.start_tls(client_tls(cert), server_hostname="localhost")
        try:
            await asyncio.wait_for(handshake, 5)
        except (ssl.SSLError, ConnectionError):  # the server ended the session, as it says:
            await wait_until(lambda: not server.registry.sessions, "the session ended", timeout=5)
        else:
            # The first reply inside TLS answers this NOOP, not a plaintext one.
            assert await conn.cmd("NOOP") == (250, "2.0.0 OK")
        await conn.close()
    assert await entries(redis) == []
