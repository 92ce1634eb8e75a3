"""Enqueue sends: the Python producer helper and ``mailpool send``.

A producer in any language does the same three things this module does: build the spec
message as a map, pack it with msgpack (text as str, bodies as bin) and ``XADD email.send *
data <msgpack>``.  Nothing here talks to the delivery workers directly.

::

    entry_id = await enqueue_send(
        redis, from_="app@example.com", to=["ann@example.com"], subject="Invoice",
        text="Hello", html="<p>Hello</p>", attachments=["invoice.pdf"],
    )

A partitioned deployment (``--partitions N`` or a Redis Cluster, schema/README.md
"Partitioned streams") is written through :class:`SendPartitions`, which applies the
producers' rule: ``crc32(id) mod N`` for a message with an ``id`` (a same-id send meets its
duplicate guard in that partition), else the partitions in turn (round robin)::

    async with send_partitions("redis+cluster://h1:7000,h2:7000", partitions=6) as sends:
        entry_id = await enqueue_send(sends, from_=..., to=[...], id="order-1042")

Message layout built by :func:`make_send_message`:

* text only -> ``text/plain; charset=utf-8``; html only -> ``text/html; charset=utf-8``;
  both -> ``multipart/alternative`` [text, html];
* with attachments -> ``multipart/mixed`` [that body (if any), attachment, ...]; each
  attachment has ``content-type`` (given, else guessed from the filename with
  :mod:`mimetypes`, else ``application/octet-stream``), ``filename`` (the delivery worker
  writes ``Content-Disposition: attachment`` with it, RFC 2231-encoded when non-ASCII) and
  ``body`` bytes; a guessed ``text/*`` type has no charset: the delivery worker's builder
  adds ``charset=utf-8`` to UTF-8 text and sends other non-ASCII octets as
  ``application/octet-stream`` (see ``workers.codec.build``);
* headers: ``from`` (the envelope sender, unless given), ``to`` (the recipients joined with
  ", ", unless given), ``subject`` when given, then the caller's headers, which win over
  these defaults.  ``Date``, ``Message-ID`` and ``MIME-Version`` are written by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import random
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from workers.codec.build import build_message
from workers.codec.errors import CodecError
from workers.codec.types import SCHEMA_VERSION, Content, SendMessage
from workers.codec.validate import validate_send
from workers.codec.wire import pack, unpack
from workers.config import CommonConfig, ConfigError, option
from workers.streams import layout
from workers.streams.connection import close_all, connect, one_shot_partitions, partition_clients
from workers.streams.layout import StreamKeys

# Compressed files: mimetypes reports the compression separately (``x.tar.gz`` ->
# ``application/x-tar`` + ``gzip``); what is attached is the compressed file.
COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}
DEFAULT_ATTACHMENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    content_type: str | None = None  # None: guessed from the filename


# A path to read, (filename, bytes) or (filename, bytes, content type or None).
AttachmentSpec: TypeAlias = (
    "str | os.PathLike[str] | Attachment | tuple[str, bytes] | tuple[str, bytes, str | None]"
)
HeaderSpec: TypeAlias = "Mapping[str, str] | Iterable[tuple[str, str]]"


def guess_content_type(filename: str) -> str:
    mime_type, compression = mimetypes.guess_type(filename, strict=False)
    if compression is not None:
        return COMPRESSED_TYPES.get(compression, DEFAULT_ATTACHMENT_TYPE)
    return mime_type or DEFAULT_ATTACHMENT_TYPE


def load_attachment(spec: AttachmentSpec) -> Attachment:
    """An :class:`Attachment` from any accepted form; paths are read here (may raise OSError)."""
    if isinstance(spec, Attachment):
        return spec
    if isinstance(spec, tuple):
        filename, data, *rest = spec
        return Attachment(filename, bytes(data), rest[0] if rest else None)
    path = Path(spec)
    return Attachment(path.name, path.read_bytes())


def attachment_content(attachment: Attachment) -> Content:
    content_type = attachment.content_type or guess_content_type(attachment.filename)
    return {"content-type": content_type, "filename": attachment.filename, "body": attachment.data}


def text_part(subtype: str, text: str) -> Content:
    return {"content-type": f"text/{subtype}; charset=utf-8", "body": text.encode("utf-8")}


def build_content(text: str | None, html: str | None, attachments: Sequence[Attachment]) -> Content:
    alternatives = [text_part(sub, body) for sub, body in (("plain", text), ("html", html)) if body]
    body: Content | None
    if len(alternatives) > 1:
        body = {"content-type": "multipart/alternative", "parts": alternatives}
    elif alternatives:
        body = alternatives[0]
    else:
        body = None if attachments else text_part("plain", text or html or "")
    if not attachments:
        assert body is not None
        return body
    leading = [body] if body is not None else []
    parts = leading + [attachment_content(a) for a in attachments]
    return {"content-type": "multipart/mixed", "parts": parts}


def header_pairs(headers: HeaderSpec | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(name), str(value)) for name, value in items]


def build_headers(
    from_: str | None, to: Sequence[str], subject: str | None, extra: list[tuple[str, str]]
) -> tuple[dict[str, str], list[list[str]] | None]:
    """(headers, header_list): header_list only when a field repeats.

    The worker builds from header_list when present, so every copy is sent.  Send header
    values may not hold line breaks, so ``headers`` keeps the first copy of a repeated field
    (a spec-only reader still sees one value).
    """
    given = {name.lower() for name, _ in extra}
    defaults = [("From", from_), ("To", ", ".join(to)), ("Subject", subject)]
    ordered = [(n, v) for n, v in defaults if v and n.lower() not in given] + extra
    headers: dict[str, str] = {}
    for name, value in ordered:
        headers.setdefault(name.lower(), value)
    repeated = len(headers) < len(ordered)
    return headers, [[n, v] for n, v in ordered] if repeated else None


def make_send_message(
    *,
    from_: str | None,
    to: str | Sequence[str],
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    attachments: Iterable[AttachmentSpec] = (),
    headers: HeaderSpec | None = None,
    id: str | None = None,  # the spec extension key is called "id"
    max_attempts: int | None = None,
    max_age: float | None = None,
) -> SendMessage:
    """The ``email.send`` message, checked as the delivery worker will check it: raises
    CodecError (the path and reason, e.g. ``from: invalid envelope address``) for what it
    would dead-letter as ``invalid``, or OSError for an attachment path it cannot read.

    ``from_`` is the envelope sender; None or "<>" sends with the null sender.  ``id`` is the
    idempotency id: a message id is sent at most once per recipient.  ``max_attempts`` and
    ``max_age`` (seconds) override the workers' retry limits for this message.
    """
    recipients = [to] if isinstance(to, str) else list(to)
    sender = None if from_ in (None, "", "<>") else from_
    loaded = [load_attachment(spec) for spec in attachments]
    fields, header_list = build_headers(sender, recipients, subject, header_pairs(headers))
    message: dict[str, Any] = {
        "from": sender,
        "to": recipients,
        "headers": fields,
        "content": build_content(text, html, loaded),
        "version": SCHEMA_VERSION,
    }
    if header_list is not None:
        message["header_list"] = header_list
    extensions = {"id": id, "max_attempts": max_attempts, "max_age": max_age}
    message.update({key: value for key, value in extensions.items() if value is not None})
    return deliverable(message)


def deliverable(message: dict[str, Any]) -> SendMessage:
    """The message typed, once the delivery worker's own builder accepts it.

    Building is what delivery does first (schema, envelope addresses, header injection,
    encodability); a message it refuses would only become a dead letter a moment after
    the enqueue, so the producer is told now instead.
    """
    send = validate_send(message)
    build_message(send, default_id="enqueue-check")
    # The limits the worker reads an entry with (50 MiB, lengths of strings, lists, maps):
    # a 60 MB attachment was enqueued, then dead-lettered as invalid.
    unpack(pack(send))
    return send


# ---------------------------------------------------------------------------------------------
# Partitions


def partition_for(
    message: SendMessage, count: int, spread: Callable[[int], int] = random.randrange
) -> int:
    """The producers' rule: ``crc32(id) mod count`` for a message with an ``id``, so that a
    same-id send lands where its idempotency record is; else ``spread(count)``: any
    partition will do."""
    message_id = message.get("id")
    return spread(count) if message_id is None else layout.partition_of(message_id, count)


class SendPartitions:
    """The send stream of every partition, each with a client of the Redis serving it (on a
    cluster, the primary of the partition's slot): :func:`enqueue` picks one per message by
    :func:`partition_for`, messages without an ``id`` going to the partitions in turn."""

    def __init__(self, clients: Sequence[aioredis.Redis], keys: Sequence[StreamKeys]) -> None:
        if not keys or len(clients) != len(keys):
            raise ValueError("SendPartitions: one client per partition, at least one")
        self.clients = list(clients)
        self.streams = [k.send for k in keys]
        # Many short-lived producers must not all start on partition 0.
        self._turn = random.randrange(len(keys))  # noqa: S311 - spreading load, not secrets

    def _next_turn(self, count: int) -> int:
        self._turn = (self._turn + 1) % count
        return self._turn

    def target(self, message: SendMessage) -> tuple[aioredis.Redis, str]:
        """The client and send stream ``message`` goes to."""
        partition = partition_for(message, len(self.streams), self._next_turn)
        return self.clients[partition], self.streams[partition]


@contextlib.asynccontextmanager
async def send_partitions(
    redis_url: str, partitions: int = 1, *, send_stream: str = layout.DEFAULT_SEND
) -> AsyncIterator[SendPartitions]:
    """The :class:`SendPartitions` of a deployment, named as its workers' options name it
    (``--redis-url``, ``--partitions``, ``--send-stream``); ConfigError (a ValueError) for
    options the workers would refuse.  Standalone with 1 partition: ``send_stream`` itself.

    The clients never send a command twice (an XADD retried after a lost reply would
    enqueue the message twice): a Redis failure reaches the caller, who decides.
    """
    config = CommonConfig(redis_url=redis_url, partitions=partitions, send_stream=send_stream)
    config.validate()
    keys = config.partition_keys()
    clients = partition_clients(redis_url, keys, connect, retries=0)
    try:
        yield SendPartitions(clients, keys)
    finally:
        await close_all(clients)


async def enqueue(
    redis: aioredis.Redis | SendPartitions,
    message: SendMessage,
    *,
    stream: str = layout.DEFAULT_SEND,
) -> str:
    """XADD one validated send message; returns the stream entry id.

    To ``stream`` through one client, or to the partition :class:`SendPartitions` picks
    (``stream`` is then unused: each partition has its own).
    """
    if isinstance(redis, SendPartitions):
        redis, stream = redis.target(message)
    # redis-py types the field map as a dict of its own unions (invariant): copied into one.
    entry: dict[FieldT, EncodableT] = dict(layout.data_entry(pack(message)).items())
    entry_id = await redis.xadd(stream, entry)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def enqueue_send(
    redis: aioredis.Redis | SendPartitions,
    *,
    from_: str | None,
    to: str | Sequence[str],
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    attachments: Iterable[AttachmentSpec] = (),
    headers: HeaderSpec | None = None,
    id: str | None = None,
    max_attempts: int | None = None,
    max_age: float | None = None,
    stream: str = layout.DEFAULT_SEND,
) -> str:
    """Build, validate and enqueue one send (see :func:`make_send_message`); the entry id.
    ``redis`` and ``stream`` as for :func:`enqueue`."""
    specs = list(attachments)
    arguments: dict[str, Any] = {
        "from_": from_, "to": to, "subject": subject, "text": text, "html": html,
        "attachments": specs, "headers": headers, "id": id, "max_attempts": max_attempts,
        "max_age": max_age,
    }  # fmt: skip
    if any(not isinstance(s, Attachment | tuple) for s in specs):
        # Files are read in a thread so a large attachment does not stall the event loop.
        message = await asyncio.to_thread(lambda: make_send_message(**arguments))
    else:
        message = make_send_message(**arguments)
    return await enqueue(redis, message, stream=stream)


# ---------------------------------------------------------------------------------------------
# `mailpool send`


@dataclass
class SendConfig(CommonConfig):
    """``mailpool send``: enqueue one message on the send stream and print its entry id.

    Partitioned: on the send stream of partition ``crc32(--id) mod --partitions``, without
    ``--id`` of a random one (each run sends one message: there is no turn to take).
    """

    sender: str | None = option(
        None, "envelope sender and default From header ('<>' for the null sender)", flag="--from"
    )
    to: list[str] = option([], "recipient (repeatable; at least one)", repeatable=True)
    subject: str | None = option(None, "Subject header")
    text: str | None = option(None, "plain text body ('-' reads it from standard input)")
    html: str | None = option(None, "HTML body")
    attach: list[str] = option([], "file to attach (repeatable)", repeatable=True)
    header: list[str] = option(
        [], "extra header 'Name: value' (repeatable; overrides From/To/Subject)", repeatable=True
    )
    message_id: str | None = option(
        None,
        "idempotency id: the message is sent at most once per recipient (partitioned: it "
        "picks the partition, crc32(id) mod N; without it a random partition)",
        flag="--id",
    )

    def validate(self) -> None:
        super().validate()
        if self.sender is None:
            raise ConfigError("--from is required ('<>' for the null sender)")
        if not self.to:
            raise ConfigError("--to is required (repeat it for several recipients)")
        for path in self.attach:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise ConfigError(f"--attach: cannot read file {path!r}")
        self.parsed_headers()

    def parsed_headers(self) -> list[tuple[str, str]]:
        pairs = []
        for given in self.header:
            name, sep, value = given.partition(":")
            if not sep or not name.strip() or name != name.strip():
                raise ConfigError(f"--header: expected 'Name: value', got {given!r}")
            pairs.append((name, value.strip()))
        return pairs


def message_from_config(config: SendConfig) -> SendMessage:
    """The send message the flags describe; ConfigError with one line when they cannot."""
    text = _standard_input() if config.text == "-" else config.text
    try:
        return make_send_message(
            from_=config.sender, to=config.to, subject=config.subject, text=text,
            html=config.html, attachments=config.attach, headers=config.parsed_headers(),
            id=config.message_id,
        )  # fmt: skip
    except CodecError as exc:
        raise ConfigError(f"invalid message: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--attach: {exc.filename}: {exc.strerror}") from None


def _standard_input() -> str:
    """``--text -``: standard input, which must be UTF-8 (read as octets: a text stream
    let octets that are not through, and the message failed later with a traceback)."""
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--text -: standard input is not UTF-8 text (octet {exc.start})"
        ) from None


async def main(config: SendConfig) -> int:
    message = message_from_config(config)
    partitions = config.partition_keys()
    # Only the chosen partition's Redis is connected to (and must answer).
    keys = partitions[partition_for(message, len(partitions))]
    async with one_shot_partitions(config.redis_url, (keys,)) as (redis,):
        entry_id = await enqueue(redis, message, stream=keys.send)
    print(entry_id, flush=True)
    return 0
