"""Consumer groups: create, read new entries, recover stale ones, acknowledge.

Both the delivery role and the ``email.receive`` listeners read through this class, so
group creation, claiming of entries left by dead consumers and trimmed-entry handling are
written once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError
from redis.typing import StreamIdT

from workers.streams import layout
from workers.streams.connection import as_text

log = structlog.get_logger("mailpool.streams")

# Start positions for a new group, in operator words.
START_NEW = layout.NEW_ONLY  # only messages added after the group was created
START_ALL = layout.FROM_START  # all retained history
OWN_PAGE = 200  # own pending entries listed per XPENDING (a consumer holds few at a time)
# Idle time given to released entries: 30 days, past any sensible claim_after, so the next
# claim pass of any consumer of the group takes them.
RELEASED_IDLE_MS = 30 * 86_400_000
# Seconds a release may take: it runs at a stop, and Redis may be the reason for the stop.
RELEASE_TIMEOUT = 1.0


@dataclass(frozen=True)
class StreamEntry:
    id: str
    fields: dict[bytes, bytes] | None  # None: the entry was trimmed while pending
    deliveries: int  # how many times the group handed it out (1 for a fresh read)

    @property
    def data(self) -> bytes | None:
        return layout.entry_data(self.fields)


async def ensure_group(
    redis: aioredis.Redis, stream: str, group: str, start: str = START_ALL
) -> bool:
    """Create the group (and the stream) when missing; True when it was created now."""
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    log.info("group_created", stream=stream, group=group, start=start)
    return True


class GroupConsumer:
    """One consumer in one group of one stream."""

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        claim_after: float,
        batch: int = 100,
        block: float = 1.0,
        claim_every: float | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_after_ms = int(claim_after * 1000)
        # Seconds from a full claim pass to the next.  A fraction of claim_after finds the
        # entries of a dead consumer soon enough; entries another consumer released (see
        # release) are claimable at once, and a shorter pause finds them sooner.
        self.claim_every = max(claim_after / 4, 0.5) if claim_every is None else claim_every
        self.batch = batch
        self.block_ms: int | None = int(block * 1000)  # None: do not wait for new entries
        self._claim_cursor = layout.MIN_ID
        self._next_claim_at = 0.0
        self._own_pending_done = False

    async def ensure_group(self, start: str = START_ALL) -> bool:
        return await ensure_group(self.redis, self.stream, self.group, start)

    async def read(self) -> list[StreamEntry]:
        """Entries to work on: our own leftovers first, then stale ones of others, then new."""
        if not self._own_pending_done:
            own = await self._read_own_pending()
            if own:
                return own
            self._own_pending_done = True
        return await self.read_shared()

    def hold_claims(self, seconds: float) -> None:
        """No claim pass for ``seconds`` from now (reads of new entries go on)."""
        self._next_claim_at = max(self._next_claim_at, time.monotonic() + seconds)

    async def read_shared(self) -> list[StreamEntry]:
        """Stale entries of other consumers (every so often), else new ones."""
        if time.monotonic() >= self._next_claim_at:
            claimed = await self.claim_stale()
            if claimed:
                return claimed
        return await self.read_new()

    async def read_new(self) -> list[StreamEntry]:
        reply = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: layout.UNDELIVERED},
            count=self.batch,
            block=self.block_ms,
        )
        return [StreamEntry(as_text(i), f, 1) for i, f in _entries_of(reply)]

    async def _read_own_pending(self) -> list[StreamEntry]:
        """A consumer restarted under the same name (an explicit one) resumes its own work."""
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: layout.FROM_START}, count=self.batch
        )
        entries = _entries_of(reply)
        if not entries:
            return []
        counts = await self._delivery_counts([as_text(i) for i, _ in entries])
        return [StreamEntry(as_text(i), f or None, counts.get(as_text(i), 1)) for i, f in entries]

    async def read_unseen_own(self, in_hand: Container[str], limit: int) -> list[StreamEntry]:
        """Up to ``limit`` entries pending on this consumer that are not ``in_hand``.

        Those are a restarted consumer's leftovers, entries its caller let go of without an
        outcome, and entries handed out by a read whose reply never came: a read that timed
        out while Redis stalled still runs when Redis resumes.  The pending list is listed
        first (XPENDING: no entry data, no delivery counter bumped), so a caller may look
        often; only when something unseen is there is it read (XREADGROUP from just before
        it, which re-reads entries in hand that lie in between: they are left out).
        """
        unseen, span = await self._unseen_own(in_hand, limit)
        if not unseen:
            return []
        reply = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: layout.id_before(next(iter(unseen)))},
            count=span,
        )
        return [
            StreamEntry(entry_id, fields or None, unseen[entry_id])
            for entry_id, fields in ((as_text(i), f) for i, f in _entries_of(reply))
            if entry_id in unseen
        ]

    async def _unseen_own(self, in_hand: Container[str], limit: int) -> tuple[dict[str, int], int]:
        """Own pending ids not in hand (-> delivery counter once read again, in id order) and
        how many own pending entries lie from the first of them to the last."""
        listed: list[str] = []
        unseen: dict[str, int] = {}
        start = "-"
        while len(unseen) < limit:
            rows = await self.redis.xpending_range(
                self.stream, self.group, min=start, max="+", count=OWN_PAGE,
                consumername=self.consumer,
            )  # fmt: skip
            for row in rows:
                entry_id = as_text(cast(bytes, row["message_id"]))
                listed.append(entry_id)
                if entry_id not in in_hand:
                    unseen[entry_id] = int(row["times_delivered"]) + 1
                    if len(unseen) == limit:
                        break
            if len(rows) < OWN_PAGE:
                break
            start = layout.exclusive(listed[-1])
        if not unseen:
            return unseen, 0
        ids = list(unseen)
        return unseen, listed.index(ids[-1]) - listed.index(ids[0]) + 1

    async def claim_stale(self) -> list[StreamEntry]:
        """Take over entries idle longer than ``claim_after`` on any consumer (XAUTOCLAIM).

        The claim bumps each entry's delivery counter, which is how poison entries (that
        kill every worker that touches them) are recognised by the caller.
        """
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_after_ms,
            start_id=self._claim_cursor,
            count=self.batch,
        )
        cursor, claimed = as_text(reply[0]), reply[1]
        deleted = [as_text(i) for i in (reply[2] if len(reply) > 2 else [])]
        self._claim_cursor = cursor
        if cursor == layout.MIN_ID:
            self._next_claim_at = time.monotonic() + self.claim_every  # a full pass is done
        entries = [(as_text(i), f) for i, f in claimed if f is not None]
        counts = await self._delivery_counts([i for i, _ in entries])
        result = [StreamEntry(i, f, counts.get(i, 1)) for i, f in entries]
        # Redis 7 drops trimmed ids from the PEL itself and reports them separately.
        result.extend(StreamEntry(i, None, 0) for i in deleted)
        if result:
            log.info("entries_claimed", stream=self.stream, group=self.group, count=len(result))
        return result

    async def release(self, entries: Iterable[StreamEntry]) -> int:
        """Make ``entries``, pending on this consumer, claimable by the others at once.

        For a consumer that stops with entries it read and will not work on.  They stay
        pending here (Redis has no "un-read"), with their idle time pushed far back (XCLAIM
        ... IDLE to ourselves, one round trip), so the next claim pass of any consumer of the
        group takes them instead of waiting ``claim_after``; JUSTID leaves their delivery
        counters alone.  Trimmed entries are left out (XCLAIM would drop them from the
        pending list unseen).  Returns how many were released.  A failure (Redis away, or
        slower than ``RELEASE_TIMEOUT``) is logged and harmless: they are claimed after
        ``claim_after``, as without a release.
        """
        ids: list[StreamIdT] = [entry.id for entry in entries if entry.fields is not None]
        if not ids:
            return 0
        claim = self.redis.xclaim(
            self.stream, self.group, self.consumer, min_idle_time=0,
            message_ids=ids, idle=RELEASED_IDLE_MS, justid=True,
        )  # fmt: skip
        try:
            released = len(await asyncio.wait_for(claim, RELEASE_TIMEOUT))
        except (RedisError, OSError) as exc:  # OSError: TimeoutError too
            log.warning("release_failed", stream=self.stream, group=self.group, count=len(ids),
                        error=str(exc) or type(exc).__name__)  # fmt: skip
            return 0
        log.info("entries_released", stream=self.stream, group=self.group, count=released)
        return released

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        """Delivery counters of our pending entries: one XPENDING per id, one round trip."""
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts: dict[str, int] = {}
        for entry_id, rows in zip(ids, await pipe.execute(), strict=True):
            if rows:
                counts[entry_id] = int(rows[0]["times_delivered"])
        return counts

    async def ack(self, *ids: str) -> int:
        if not ids:
            return 0
        return int(await self.redis.xack(self.stream, self.group, *ids))


def _entries_of(reply: Any) -> list[tuple[bytes | str, dict[bytes, bytes] | None]]:
    """Flatten an XREADGROUP reply (RESP2: [[stream, [(id, fields), ...]]])."""
    if not reply:
        return []
    return [(entry_id, fields or None) for _name, entries in reply for entry_id, fields in entries]
