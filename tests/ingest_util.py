"""Helpers for the ingest tests: the server in-process and as a subprocess, a raw SMTP client,
a generated TLS certificate, and readers of the ``email.receive`` stream."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis

from tests.harness import ROOT, child_env, free_port, wait_for_port
from workers.config import IngestConfig
from workers.ingest import IngestServer, running_ingest

HOSTNAME = "mx.test"
STREAM = "email.receive"


def ingest_config(redis_url: str, **overrides: Any) -> IngestConfig:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "listen": "127.0.0.1:0",
        "hostname": HOSTNAME,
        "command_timeout": 5.0,
        "connection_timeout": 30.0,
        "shutdown_grace": 2.0,
        # Tests reach no DNS but their own: verification is on where a test serves the zones
        # (tests/test_ingest_verify.py).
        "verify": False,
    }
    values.update(overrides)
    config = IngestConfig(**values)
    config.validate()
    return config


@contextlib.asynccontextmanager
async def ingest(redis_url: str, **overrides: Any) -> AsyncIterator[IngestServer]:
    """The ingest server in this test's event loop on a free port."""
    async with running_ingest(ingest_config(redis_url, **overrides)) as server:
        yield server


def message(subject: str = "hello", body: str = "Hello there.", **headers: str) -> bytes:
    fields = {"From": "alice@example.org", "To": "bob@example.com", "Subject": subject}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return (head + "\r\n" + body + "\r\n").encode()


class SMTPConn:
    """A raw SMTP client on asyncio streams: exact bytes out, replies parsed in."""

    # How long a reply may take.  A scenario that holds replies on purpose (a Redis stall)
    # raises it to what real MTAs wait for the reply to the final dot (RFC 5321: 10 min).
    reply_timeout = 10.0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None, greet: bool = True
    ) -> SMTPConn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        conn = cls(reader, writer)
        if greet:
            code, _ = await conn.reply()
            assert code == 220
        return conn

    async def reply(self, timeout: float | None = None) -> tuple[int, str]:
        """One (possibly multi-line) reply: code and the text lines joined by newlines."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout or self.reply_timeout)
            if not raw:
                raise ConnectionError(f"connection closed; got so far: {lines}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    @classmethod
    async def open_session(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None
    ) -> SMTPConn:
        """A connection past the 220 greeting and EHLO, ready for MAIL (closed again when
        the EHLO fails)."""
        conn = await cls.open(port, ssl_context=ssl_context)
        try:
            await conn.ehlo()
        except BaseException:
            await conn.close()
            raise
        return conn

    async def ehlo(self, name: str = "client.test") -> list[str]:
        code, text = await self.cmd(f"EHLO {name}")
        assert code == 250, text
        return text.splitlines()[1:]

    async def starttls(self, context: ssl.SSLContext) -> None:
        code, text = await self.cmd("STARTTLS")
        assert code == 220, text
        await self.writer.start_tls(context, server_hostname="localhost")

    async def transaction(
        self,
        data: bytes,
        *,
        mail_from: str = "alice@example.org",
        to: Sequence[str] = ("bob@example.com",),
    ) -> tuple[int, str]:
        """MAIL, RCPT..., DATA and the dot-stuffed content; returns the final reply."""
        code, text = await self.cmd(f"MAIL FROM:<{mail_from}>")
        if code != 250:
            return code, text
        for rcpt in to:
            code, text = await self.cmd(f"RCPT TO:<{rcpt}>")
            if code != 250:
                return code, text
        code, text = await self.cmd("DATA")
        if code != 354:
            return code, text
        stuffed = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n")
        )
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        await self.send(stuffed + b".\r\n")
        return await self.reply()

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF) within ``timeout``."""
        try:
            while await asyncio.wait_for(self.reader.read(4096), timeout):
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def send_one(port: int, data: bytes | None = None, **kwargs: Any) -> tuple[int, str]:
    conn = await SMTPConn.open(port)
    try:
        await conn.ehlo()
        return await conn.transaction(data if data is not None else message(), **kwargs)
    finally:
        await conn.close()


async def entries(redis: aioredis.Redis, stream: str = STREAM) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of the stream, ``data`` decoded with plain msgpack (the contract)."""
    found = []
    for entry_id, fields in await redis.xrange(stream):
        found.append((entry_id.decode(), msgpack.unpackb(fields[b"data"], raw=False)))
    return found


def make_certificate(
    directory: Path, *, issuer: tuple[Path, Path] | None = None, ca: bool = False
) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 (cert.pem, key.pem): self-signed, or signed
    by ``issuer`` (the cert.pem, key.pem of a certificate made with ``ca=True``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    common_name = "mailpool test CA" if ca else "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_name, signer_key = name, key
    if issuer is not None:
        signer_name = x509.load_pem_x509_certificate(issuer[0].read_bytes()).subject
        signer_key = serialization.load_pem_private_key(issuer[1].read_bytes(), None)  # type: ignore[assignment]
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder()
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    cert = (
        builder.subject_name(name)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(signer_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def client_tls(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly the generated certificate."""
    return ssl.create_default_context(cafile=str(cert))


class IngestProcess:
    """``python -m workers ingest`` as a real child process on a free port."""

    def __init__(self, redis_url: str, *args: str, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.args = [
            sys.executable, "-m", "workers", "ingest", "--redis-url", redis_url,
            "--listen", f"127.0.0.1:{self.port}", "--hostname", HOSTNAME, *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=child_env(), stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, timeout=15)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()
