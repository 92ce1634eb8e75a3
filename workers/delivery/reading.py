"""Where a delivery worker's next entries come from: entries pending on it that it does not
hold, then stale entries of silent consumers, then new ones."""

from __future__ import annotations

import asyncio
import time

import structlog
from redis.exceptions import RedisError

from workers.delivery.held import HeldEntries
from workers.delivery.settler import REDIS_BACKOFF_CAP
from workers.streams.consumer import GroupConsumer, StreamEntry

log = structlog.get_logger("mailpool.delivery")

# Seconds between looks at our own pending list for entries we do not hold (one XPENDING):
# a read that timed out while Redis stalled still runs when it resumes, and the entries it
# hands us would otherwise wait --claim-after.  A failed read makes the next look immediate.
OWN_CHECK = 1.0
READ_RETRY = 1.0  # seconds a stream whose read failed is not read again
# With several partitions, each failure in a row doubles that up to this: a read of a
# stalled shard holds the others' reads up until its deadline.
READ_AWAY_MAX = 5.0
# Seconds a read of one of several partitions may take beyond its wait for new entries
# (the XPENDING, XAUTOCLAIM and delivery-count round trips around it included).
READ_STALL = 2.0
# Seconds between claim passes (one XAUTOCLAIM): entries a stopping worker released are
# sent within this, not after --claim-after (a dead worker's entries wait that anyway).
CLAIM_CHECK = 1.0
# Seconds without claim passes from the first read after a failed step: when Redis was away
# longer than --claim-after, every entry another worker holds looks stale once it is back
# (Redis counts idle time by the clock, also over a restart), while that worker's settler
# has not yet written what it sent meanwhile (it tries again at most REDIS_BACKOFF_CAP
# apart).  Claimed first, its entries would find no record and be sent again.
CLAIM_HOLD = 2 * REDIS_BACKOFF_CAP


class Reader:
    """One worker's reads, and when to look at its own pending list between them."""

    def __init__(self, held: HeldEntries, *, away_max: float = READ_RETRY) -> None:
        self._held = held
        # Until when (monotonic) this stream is not read: its last read failed.  Other
        # partitions are read meanwhile (their Redis may be another shard's primary).
        self.away_until = 0.0
        self._away_for = READ_RETRY
        self._away_max = away_max
        # When to look next for entries pending on us that we do not hold: at once (a
        # restarted consumer's leftovers), then every OWN_CHECK, and after any failed step.
        self._own_check_at = 0.0
        self.group_lost = False  # the last read found no group: it must be made again
        self._failed = False  # a step failed since the last read: claims wait CLAIM_HOLD

    async def read(
        self, consumer: GroupConsumer, batch: int, deadline: float | None = None
    ) -> list[StreamEntry]:
        """Up to ``batch`` entries; [] after a failed read, or one with no reply within
        ``deadline`` seconds, and the stream is away for READ_RETRY (doubled after each
        failure in a row, up to ``away_max``)."""
        consumer.batch = batch
        if self._failed:
            self._failed = False
            consumer.hold_claims(CLAIM_HOLD)
        self._held.read_started()
        try:
            async with asyncio.timeout(deadline):  # TimeoutError is an OSError
                entries = []
                if time.monotonic() >= self._own_check_at:
                    entries = await self._read_unseen_own(consumer)
                if not entries:
                    entries = await consumer.read_shared()
        except (RedisError, OSError) as exc:
            # Redis may still run the read that failed (a stalled Redis runs what waits in
            # its socket buffers when it resumes) and hand us entries we never see.
            self.pass_over("read_failed", consumer.stream, exc)
            # A Redis that came back without its data (no AOF, a new pod without a volume)
            # has no group: the worker makes it again (and loads the functions) first.
            self.group_lost = str(exc).startswith("NOGROUP")
            return []
        self._away_for = READ_RETRY
        return self._held.not_settled_since_read(entries)

    def pass_over(self, event: str, stream: str, exc: BaseException) -> None:
        """A step on this stream failed (logged as ``event``): it is not read for a while,
        and its own pending list is looked at first when it is (what the step may have
        handed us)."""
        self._own_check_at = 0.0
        self._failed = True
        self.away_until = time.monotonic() + self._away_for
        self._away_for = min(2 * self._away_for, self._away_max)
        log.warning(event, error=str(exc) or type(exc).__name__, stream=stream)

    async def _read_unseen_own(self, consumer: GroupConsumer) -> list[StreamEntry]:
        """Entries pending on us that we do not hold: leftovers of a consumer of our name,
        entries let go of without an outcome, entries of a read whose reply never came."""
        entries = await consumer.read_unseen_own(self._held, consumer.batch)
        # A full batch: more may be there, look again at the next read.
        full = len(entries) >= consumer.batch
        self._own_check_at = 0.0 if full else time.monotonic() + OWN_CHECK
        if entries:
            log.info("own_pending_taken", count=len(entries))
        return entries
