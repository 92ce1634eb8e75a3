"""What `mailpool send` enqueues is what a relay receives: the send CLI as a subprocess, a
delivery worker, and a recording aiosmtpd relay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from tests.delivery_util import make_config, run_until_settled
from tests.harness import ROOT
from tests.sinks import Received, RecordingSink
from workers.producer import enqueue_send


async def test_cli_send_arrives_at_the_relay_as_intended(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    invoice = tmp_path / "facture été.pdf"
    invoice.write_bytes(b"%PDF-1.4\n" + bytes(range(256)))
    mailpool_send(
        redis_url, "--from", "billing@example.com", "--to", "ann@example.net",
        "--to", "bob@example.org", "--subject", "Votre facture — mars",
        "--text", "Bonjour,\nci-joint.\n", "--html", "<p>Bonjour, ci-joint.</p>",
        "--attach", str(invoice), "--header", "X-Tag: one", "--header", "X-Tag: two",
        "--id", "invoice-2026-03",
    )  # fmt: skip
    (received,) = await delivered(redis, redis_url, sink)
    assert received.mail_from == "billing@example.com"
    assert sorted(received.rcpt_tos) == ["ann@example.net", "bob@example.org"]
    message = received.message
    assert message["subject"] == "Votre facture — mars"
    assert message.get_all("x-tag") == ["one", "two"]
    assert message.get_content_type() == "multipart/mixed"
    alternative, attachment = message.iter_parts()
    text, html = alternative.iter_parts()
    assert text.get_content().replace("\r\n", "\n") == "Bonjour,\nci-joint.\n"
    assert html.get_content_type() == "text/html"
    assert attachment.get_filename() == "facture été.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == invoice.read_bytes()


async def test_helper_send_with_null_sender_and_tuple_attachment(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await enqueue_send(
        redis, from_=None, to="ann@example.net", subject="bounce",
        headers={"From": "MAILER-DAEMON@example.com"},
        attachments=[("report.txt", b"line 1\nline 2\n", "text/plain")],
    )  # fmt: skip
    (received,) = await delivered(redis, redis_url, sink)
    assert received.mail_from == "<>"  # aiosmtpd spells the null sender so
    (attachment,) = received.message.iter_parts()
    assert attachment.get_filename() == "report.txt"
    assert attachment.get_content().replace("\r\n", "\n") == "line 1\nline 2\n"


async def test_cli_text_attachments_and_long_lines_arrive_readable(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    """A UTF-8 .txt gets charset=utf-8, a non-UTF-8 one travels as octets, and a
    995-character text line arrives quoted-printable in lines of <= 78."""
    notes_text = "Grüße aus Köln – Zoë ✉\nzweite Zeile\n"
    notes = tmp_path / "notes.txt"
    notes.write_bytes(notes_text.encode("utf-8"))
    legacy = tmp_path / "legacy.txt"
    legacy.write_bytes(b"caf\xe9 cr\xe8me\nbare LF\r\n")
    long_text = "word " * 198 + "end!\n"  # a 995-character line
    mailpool_send(
        redis_url, "--from", "app@example.com", "--to", "ann@example.net", "--subject", "notes",
        "--text", long_text, "--attach", str(notes), "--attach", str(legacy),
    )  # fmt: skip
    (received,) = await delivered(redis, redis_url, sink)
    text, notes_part, legacy_part = received.message.iter_parts()
    assert text["content-transfer-encoding"] == "quoted-printable"
    encoded = text.get_payload()
    assert isinstance(encoded, str) and max(map(len, encoded.splitlines())) <= 78
    assert text.get_content().replace("\r\n", "\n") == long_text
    assert notes_part.get_filename() == "notes.txt"
    assert notes_part.get_content_type() == "text/plain"
    assert notes_part.get_content_charset() == "utf-8"
    assert notes_part.get_content().replace("\r\n", "\n") == notes_text
    assert legacy_part.get_filename() == "legacy.txt"
    assert legacy_part.get_content_type() == "application/octet-stream"
    assert legacy_part.get_content() == legacy.read_bytes()


def mailpool_send(redis_url: str, *args: str) -> None:
    """``mailpool send`` as a subprocess; it must enqueue (exit 0)."""
    done = subprocess.run(
        [sys.executable, "-m", "workers", "send", "--redis-url", redis_url, *args],
        capture_output=True, text=True, timeout=20, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


async def delivered(redis: aioredis.Redis, redis_url: str, sink: RecordingSink) -> list[Received]:
    """What ``sink`` receives once a delivery worker has settled the stream."""
    await run_until_settled(redis, make_config(redis_url, sink.url))
    return sink.received
