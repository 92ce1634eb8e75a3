"""Prometheus metrics of every role (names are part of the dashboard in deploy/grafana)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

from workers.streams.layout import Snapshot

# Latency buckets for SMTP transactions: sub-millisecond to a slow remote relay.
SMTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

INGEST_MESSAGES = Counter(
    "mailpool_ingest_messages", "Messages at end of DATA, by result", ["result"]
)  # result: accepted | rejected | failed
INGEST_REJECTED = Counter(
    "mailpool_ingest_rejected", "Commands or messages refused, by reason", ["reason"]
)
INGEST_CONNECTIONS = Gauge("mailpool_ingest_connections", "Open SMTP connections")
INGEST_TRANSACTION = Histogram(
    "mailpool_ingest_transaction_seconds", "End of DATA to reply", buckets=SMTP_BUCKETS
)

DELIVERY_MESSAGES = Counter(
    "mailpool_delivery_messages", "Send outcomes per message", ["outcome"]
)  # outcome: sent | deferred | dead
# Bound once: labels() costs more than the increment, and "sent" is counted per message.
DELIVERY_SENT = DELIVERY_MESSAGES.labels("sent")
DELIVERY_DEFERRED = DELIVERY_MESSAGES.labels("deferred")
DELIVERY_DEAD = DELIVERY_MESSAGES.labels("dead")
DELIVERY_SMTP = Histogram(
    "mailpool_delivery_smtp_seconds", "One SMTP transaction to the relay", buckets=SMTP_BUCKETS
)
DELIVERY_IN_FLIGHT = Gauge("mailpool_delivery_in_flight", "Sends in flight")

STREAM_LENGTH = Gauge("mailpool_stream_length", "Entries in a stream", ["stream"])
STREAM_LAG = Gauge(
    "mailpool_stream_lag", "Entries not yet delivered to a group (absent when unknown)",
    ["stream", "group"],
)  # fmt: skip
STREAM_PENDING = Gauge(
    "mailpool_stream_pending", "Entries delivered but not acknowledged", ["stream", "group"]
)
STREAM_OLDEST_PENDING = Gauge(
    "mailpool_stream_oldest_pending_seconds", "Age of the oldest pending entry",
    ["stream", "group"],
)  # fmt: skip
DEAD_LETTERS = Gauge("mailpool_dead_letters", "Entries in the dead-letter stream")
RETRIES_WAITING = Gauge("mailpool_retries_waiting", "Sends waiting for a retry")


def record_stream_status(status: Snapshot) -> None:
    """Copy a status snapshot (:mod:`workers.streams.snapshot`) into the gauges."""
    for stream, info in status.streams.items():
        STREAM_LENGTH.labels(stream).set(info.length)
        for group, g in info.groups.items():
            STREAM_PENDING.labels(stream, group).set(g.pending)
            STREAM_OLDEST_PENDING.labels(stream, group).set(g.oldest_pending_seconds or 0)
            if g.lag is None:
                # Unknown is not zero: drop the series rather than report a false "caught up".
                with contextlib.suppress(KeyError):
                    STREAM_LAG.remove(stream, group)
            else:
                STREAM_LAG.labels(stream, group).set(g.lag)
    DEAD_LETTERS.set(status.dead_letters)
    RETRIES_WAITING.set(status.retries_waiting)
