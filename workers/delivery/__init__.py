"""``mailpool deliver``: read ``email.send`` in the ``delivery`` group and send each message.

One loop (:class:`~workers.delivery.worker.DeliveryWorker`, every partition in turn): read a
batch (own leftovers, then stale entries of silent consumers, then new ones), prepare it
(decode, build, drop recipients already accepted), send over ``--concurrency`` connections
(one more send behind each one's final dot, to a relay that takes chained transactions), and
hand each outcome to the settler, which writes idempotency records, acks, dead letters,
retries and events in one Redis round trip per batch of finished sends (group commit). A
side task moves due retries back into the stream. Entry layout:
:mod:`workers.streams.layout`; atomicity of each move: :mod:`workers.streams.outcomes`.

The modules: :mod:`~workers.delivery.worker` (the loop and its invariants),
:mod:`~workers.delivery.held` (one state per entry in hand, one method per step),
:mod:`~workers.delivery.reading` (where entries come from), :mod:`~workers.delivery.attempt`
(build an entry, and what each outcome records), :mod:`~workers.delivery.settler` (group
commit); this one starts the role.

Duplicate guarantee: a recipient is sent a message id again only if the worker dies (or
loses Redis for good) between the relay's reply to DATA and the settlement that records
it; every other redelivery (claims after a crash, retries, replays, a producer enqueuing
the same ``id`` twice) skips recipients already recorded as accepted.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog

from workers.config import DeliveryConfig, mask_url_password
from workers.delivery.attempt import Job, Prepared, settle_attempt
from workers.delivery.reading import CLAIM_CHECK
from workers.delivery.settler import Settler, SettlerCrashed
from workers.delivery.worker import FLUSH_CAP, READ_BLOCK, DeliveryWorker, Stream
from workers.health import serving_health
from workers.lifecycle import serve_until_signalled
from workers.streams import outcomes as oc
from workers.streams.cluster import is_cluster_url
from workers.streams.connection import close_all, connect, partition_clients, resolve_redis_url
from workers.streams.consumer import GroupConsumer
from workers.streams.layout import StreamKeys
from workers.streams.sentinel import is_sentinel_url

__all__ = [
    "FLUSH_CAP",
    "DeliveryConfig",
    "DeliveryWorker",
    "Job",
    "Prepared",
    "Settler",
    "SettlerCrashed",
    "Stream",
    "main",
    "serve",
    "settle_attempt",
]

log = structlog.get_logger("mailpool.delivery")


async def serve(config: DeliveryConfig, stop: asyncio.Event) -> None:
    """One worker for all partitions (one alone when not partitioned): each read takes
    from the next partition in turn what the window has room for, and 2 x --concurrency
    lanes send from all of them, so a busy partition never starves another."""
    url = resolve_redis_url(config.redis_url)
    partitions = config.partition_keys()
    redis = partition_clients(url, partitions, connect)
    # The reads keep a connection of their own (a blocking XREADGROUP holds it anyway):
    # a pool checkout per read costs CPU on every batch.  No retries on it: redis-py would
    # send a read that timed out again, and Redis may run both; our loop retries instead
    # and then looks at our pending list for what the lost read handed us.
    reads = partition_clients(url, partitions, connect, retries=0)
    # Through Sentinel or a cluster, each read checks a connection out of the pool instead:
    # redis-py 8 connects a held connection again to the address it had, so after a
    # failover it would read from the old master (now a replica: READONLY) for ever; a
    # checkout asks the Sentinels (the cluster) where the master is.
    pooled = is_sentinel_url(url) or is_cluster_url(url)
    readers = [r if pooled else r.client() for r in reads]
    streams = [
        Stream(_consumer(config, keys, reader), _outcomes(config, keys, r))
        for keys, r, reader in zip(partitions, redis, readers, strict=True)
    ]
    try:
        await _serve_streams(config, streams, list(zip(redis, partitions, strict=True)), stop)
    finally:
        for stream in streams:
            await stream.outcomes.aclose()
        own = [reader for reader, r in zip(readers, reads, strict=True) if reader is not r]
        await close_all(own)  # the readers holding a connection of their own
        await close_all(reads)
        await close_all(redis)


async def _serve_streams(
    config: DeliveryConfig,
    streams: list[Stream],
    partitions: list[tuple[aioredis.Redis, StreamKeys]],
    stop: asyncio.Event,
) -> None:
    names = [stream.consumer.stream for stream in streams]
    log.info("delivery_started", relay=_safe_relay(config.relay), consumer=config.consumer,
             concurrency=config.concurrency, streams=names,
             dkim=_signing_summary(config))  # fmt: skip
    _say_if_unverified(config)
    worker = DeliveryWorker(config, streams, config.open_transport())
    # /readyz: ready while any partition's Redis answers (the others' reads are passed over).
    redis, keys = partitions[0]
    listening = lambda: not stop.is_set()  # noqa: E731
    async with serving_health(config.http, redis, keys, listening, partitions=partitions):
        await worker.run(stop)
    log.info("delivery_stopped", consumer=config.consumer)


def _consumer(config: DeliveryConfig, keys: StreamKeys, reader: aioredis.Redis) -> GroupConsumer:
    return GroupConsumer(
        reader, keys.send, config.group, config.consumer,
        claim_after=config.claim_after, batch=config.batch, block=READ_BLOCK,
        claim_every=CLAIM_CHECK,
    )  # fmt: skip


def _outcomes(config: DeliveryConfig, keys: StreamKeys, redis: aioredis.Redis) -> oc.Outcomes:
    return oc.Outcomes(
        redis, keys, group=config.group, sent_ttl=config.sent_ttl,
        events_maxlen=config.events_maxlen, min_replicas=config.min_replicas,
        replica_timeout=config.replica_timeout,
    )  # fmt: skip


def _say_if_unverified(config: DeliveryConfig) -> None:
    """An SMTP relay whose certificate is not checked is said so at start, once."""
    if not (config.relay or "").startswith("smtp"):
        return
    settings = config.relay_settings()
    if settings.verify:
        return
    how = "when offered" if config.starttls == "opportunistic" else "as configured"
    credentials = (
        "sent over that TLS: to anyone in the middle who answers the handshake"
        if settings.username is not None else None
    )  # fmt: skip
    log.warning(
        "relay_tls_unverified", starttls=config.starttls, relay=_safe_relay(config.relay),
        note=f"TLS {how}, the relay's certificate not verified: the mail is encrypted "
        "against eavesdroppers, not against someone in the middle", credentials=credentials,
    )  # fmt: skip


def _signing_summary(config: DeliveryConfig) -> list[str] | None:
    """What the --dkim-keys table signs for ("example.com ed1 ed25519-sha256"), never a
    key; None: no signing."""
    table = config.signing_keys
    if table is None:
        return None
    return [
        f"{key.domain} {key.selector} {key.algorithm}"
        for keys in table.by_domain.values()
        for key in keys
    ]


def _safe_relay(relay: str | None) -> str:
    return mask_url_password(relay or "")


async def main(config: DeliveryConfig) -> int:
    return await serve_until_signalled(serve, config)
