"""The Python producer helper: message layout, validation, and the round trip through a real
redis-server exactly as another language would read it (plain msgpack)."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import msgpack
import pytest
import redis.asyncio as aioredis

from workers.codec.build import build_message
from workers.codec.errors import CodecError
from workers.codec.validate import decode_send
from workers.producer import Attachment, enqueue_send, guess_content_type, make_send_message


def test_text_only_is_a_single_utf8_part() -> None:
    message = make_send_message(from_="app@example.com", to="ann@example.com", text="héllo")
    assert message["from"] == "app@example.com"
    assert message["to"] == ["ann@example.com"]
    assert message["content"] == {
        "content-type": "text/plain; charset=utf-8",
        "body": "héllo".encode(),
    }
    assert message["headers"] == {"from": "app@example.com", "to": "ann@example.com"}


def test_text_and_html_make_an_alternative_inside_mixed_with_attachments(tmp_path: Path) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4 fake")
    message = make_send_message(
        from_="app@example.com",
        to=["ann@example.com", "bob@example.com"],
        subject="Rapport été",
        text="see attached",
        html="<p>see attached</p>",
        attachments=[pdf, ("data.bin", b"\x00\x01", None), ("notes", b"n", "text/plain")],
    )
    root = message["content"]
    assert root["content-type"] == "multipart/mixed"
    alternative, report, blob, notes = root["parts"]
    assert alternative["content-type"] == "multipart/alternative"
    assert [p["content-type"] for p in alternative["parts"]] == [
        "text/plain; charset=utf-8",
        "text/html; charset=utf-8",
    ]
    assert (report["content-type"], report["filename"], report["body"]) == (
        "application/pdf", "report.pdf", b"%PDF-1.4 fake",
    )  # fmt: skip
    assert (blob["content-type"], blob["filename"]) == ("application/octet-stream", "data.bin")
    assert notes["content-type"] == "text/plain"
    assert message["headers"]["to"] == "ann@example.com, bob@example.com"
    assert message["headers"]["subject"] == "Rapport été"


def test_attachments_only_and_html_only() -> None:
    only_files = make_send_message(
        from_="a@example.com", to="b@example.com", attachments=[Attachment("x.png", b"png")]
    )
    assert only_files["content"]["content-type"] == "multipart/mixed"
    assert [p["content-type"] for p in only_files["content"]["parts"]] == ["image/png"]
    html = make_send_message(from_="a@example.com", to="b@example.com", html="<b>x</b>")
    assert html["content"]["content-type"] == "text/html; charset=utf-8"


def test_content_types_are_guessed_from_file_names() -> None:
    assert guess_content_type("a.pdf") == "application/pdf"
    assert guess_content_type("a.tar.gz") == "application/gzip"
    assert guess_content_type("README") == "application/octet-stream"
    assert guess_content_type("photo.JPG") == "image/jpeg"


def test_given_headers_override_defaults_and_repeats_keep_every_copy() -> None:
    message = make_send_message(
        from_="bounce@example.com",
        to="ann@example.com",
        subject="s",
        headers=[("From", "Shop <shop@example.com>"), ("X-Tag", "a"), ("X-Tag", "b")],
        id="order-42",
    )
    assert message["from"] == "bounce@example.com"  # envelope stays
    assert message["headers"]["from"] == "Shop <shop@example.com>"
    assert message["headers"]["x-tag"] == "a"  # send values hold no line break: the first
    assert message["header_list"] == [
        ["To", "ann@example.com"], ["Subject", "s"], ["From", "Shop <shop@example.com>"],
        ["X-Tag", "a"], ["X-Tag", "b"],
    ]  # fmt: skip
    assert message["id"] == "order-42"


def test_retry_limits_per_message() -> None:
    message = make_send_message(
        from_="a@example.com", to="b@example.com", text="code 123", max_attempts=3, max_age=600
    )
    assert (message["max_attempts"], message["max_age"]) == (3, 600)
    plain = make_send_message(from_="a@example.com", to="b@example.com", text="x")
    assert not {"max_attempts", "max_age", "id", "header_list"} & set(plain)


def test_null_sender() -> None:
    message = make_send_message(from_="<>", to="ann@example.com", text="x")
    assert message["from"] is None
    assert "from" not in message["headers"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"to": []},
        {"to": "ann@example.com", "headers": {"X-Evil": "a\r\nBcc: victim@example.com"}},
        {"to": "ann@example.com", "subject": "line\nbreak"},
    ],
)
def test_invalid_messages_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(CodecError):
        make_send_message(from_="a@example.com", text="x", **kwargs)  # type: ignore[arg-type]


def test_missing_attachment_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        make_send_message(from_="a@x.org", to="b@x.org", attachments=[tmp_path / "nope"])


async def test_round_trip_through_redis(redis: aioredis.Redis, tmp_path: Path) -> None:
    attachment = tmp_path / "plan.txt"
    attachment.write_text("step 1\n")
    arguments = {
        "from_": "app@example.com", "to": ["ann@example.com", "bob@example.com"],
        "subject": "Plan", "text": "hi", "html": "<p>hi</p>", "attachments": [attachment],
        "headers": {"Reply-To": "desk@example.com"}, "id": "plan-1",
    }  # fmt: skip
    entry_id = await enqueue_send(redis, **arguments)  # type: ignore[arg-type]
    ((found_id, fields),) = await redis.xrange("email.send")
    assert found_id.decode() == entry_id
    assert list(fields) == [b"data"]
    assert decode_send(fields[b"data"]) == make_send_message(**arguments)  # type: ignore[arg-type]
    # What a consumer in another language sees: a map with str keys, bodies as bin.
    plain = msgpack.unpackb(fields[b"data"], raw=False)
    assert plain["to"] == ["ann@example.com", "bob@example.com"]
    assert isinstance(plain["content"]["parts"][1]["body"], bytes)
    assert plain["content"]["parts"][1]["filename"] == "plan.txt"


async def test_custom_stream(redis: aioredis.Redis) -> None:
    await enqueue_send(redis, from_="a@x.org", to="b@x.org", text="x", stream="other.send")
    assert await redis.xlen("other.send") == 1
    assert await redis.exists("email.send") == 0


def test_built_by_the_codec_into_the_intended_mime_tree() -> None:
    message = make_send_message(
        from_="app@example.com",
        to="ann@example.com",
        subject="Grüße",
        text="plain",
        html="<p>html</p>",
        attachments=[("résumé.pdf", b"%PDF", None)],
    )
    built = build_message(message, default_id="1-0", hostname="test.invalid")
    parsed = email.message_from_bytes(built.data, policy=email.policy.default)
    assert parsed["subject"] == "Grüße"
    assert parsed.get_content_type() == "multipart/mixed"
    alternative, pdf = parsed.iter_parts()
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    assert pdf.get_filename() == "résumé.pdf"
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_content() == b"%PDF"
    assert built.recipients == ["ann@example.com"]
