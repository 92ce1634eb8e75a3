"""Group commit of delivery outcomes: settlements queued while one Redis round trip is in
flight go in the next, so a busy worker records many finished sends per round trip."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from workers.config import Unavailable
from workers.streams import outcomes as oc

log = structlog.get_logger("mailpool.delivery")

REDIS_BACKOFF_CAP = 5.0
# Seconds a settler waits, once a settlement comes while sends are still in progress, for
# more to join its round trip (group commit's linger).  At --concurrency 10 into smtp-sink
# a batch grew from about 7 settlements to 9, and Redis's CPU per delivered message against
# the raw floor went from 1.46x and 1.38x to 1.07x and 1.10x (bench/redis_floor.py, two
# alternated pairs of 5 rounds).  The cost: an outcome recorded a millisecond later, so a
# worker killed outright (kill -9) in that millisecond leaves a few more sent entries
# without their record, to be sent again after --claim-after (README, Guarantees).  An
# idle worker, with no other send in progress, does not wait.
SETTLE_LINGER = 0.001

Settled = Callable[[oc.Settlement], None]  # called once Redis has applied the settlement


@dataclass(slots=True)  # not frozen: one per message (frozen __init__ costs 2x)
class Queued:
    """A settlement waiting for its round trip, and whom to tell once it is applied."""

    settlement: oc.Settlement
    settled: Settled


class SettlementUnwritable(Exception):
    """Not even the bare record of a settlement could be written: a bug."""

    def __init__(self, entry_id: str) -> None:
        super().__init__(f"the settlement of entry {entry_id} cannot be written")


class SettlerCrashed(Unavailable):
    """The settler died of a bug: the worker stopped (exit 1) so that it is restarted."""

    def __init__(self) -> None:
        super().__init__(
            "outcomes could not be recorded (settler_crashed in the log); the worker stopped, "
            "unrecorded entries stay pending and are claimed after --claim-after"
        )


class Settler:
    """Group commit: settlements queued while one round trip is in flight go in the next.

    Each settlement comes with a callback, called once Redis has applied it (never when it
    was not: the entry then stays pending).
    """

    def __init__(
        self,
        outcomes: oc.Outcomes,
        on_crash: Callable[[], None],
        *,
        busy: Callable[[], bool] = lambda: False,
        linger: float = SETTLE_LINGER,
    ) -> None:
        self.outcomes = outcomes
        # True while sends are in progress whose outcomes may join the next round trip.
        self._busy = busy
        self._linger = linger
        # Called when the settler dies of a bug: a worker that keeps sending while nothing
        # is acknowledged would send every message again after a claim, so it must stop.
        self._on_crash = on_crash
        self.crashed = False
        self._queue: list[Queued] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._applying = 0  # settlements in the round trip under way
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="settler")

    def submit(self, settlement: oc.Settlement, settled: Settled) -> None:
        self._queue.append(Queued(settlement, settled))
        self._wake.set()

    async def _run(self) -> None:
        try:
            await self._settle_until_closed()
        except Exception:  # a bug (Redis errors are retried in _apply): stop the worker
            log.exception("settler_crashed", unsettled=len(self._queue) + self._applying)
            self.crashed = True
            self._on_crash()

    async def _settle_until_closed(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                # One loop turn lets sends that finished together join the same round trip;
                # while others are still in progress, a moment longer (SETTLE_LINGER).
                await asyncio.sleep(self._linger if self._busy() and not self._closing else 0)
                continue
            batch, self._queue = self._queue, []
            self._applying = len(batch)
            await self._apply(batch)
            self._applying = 0

    async def _apply(self, batch: list[Queued], *, first_run: bool = True) -> None:
        """Apply a batch; retry what failed (Redis away, out of memory) until it is applied.

        An outcome is never dropped: the recipients it records were really sent, and an
        entry left unacknowledged would be sent again.  Only the stop deadline ends this.
        """
        delay = 0.05
        # ``first_run``: none was sent before.  A run after a failed one may find its
        # settlements applied, so it must not say so.
        while batch:
            try:
                results: list[bool | RedisError] = list(
                    await self.outcomes.settle(
                        [q.settlement for q in batch], time.time(), first_run=first_run
                    )
                )
            except (RedisError, OSError) as exc:
                results = [RedisError(str(exc))] * len(batch)
            except Exception:  # a bug: a settlement that cannot be written (see _unwritable)
                # Whatever raised may have come after the batch reached Redis.
                batch, first_run = await self._unwritable(batch), False
                continue
            failed = []
            for queued, result in zip(batch, results, strict=True):
                if isinstance(result, RedisError):
                    failed.append(queued)
                else:
                    queued.settled(queued.settlement)
            if failed:
                errors = {str(r) for r in results if isinstance(r, RedisError)}
                log.warning("settle_retry", errors=sorted(errors)[:3], settlements=len(failed))
                await asyncio.sleep(delay)
                delay = min(delay * 2, REDIS_BACKOFF_CAP)
            batch, first_run = failed, False

    async def _unwritable(self, batch: list[Queued]) -> list[Queued]:
        """A batch that could not be written for a reason other than Redis (a bug: a field
        no encoder takes).  Each settlement goes alone, and one that still cannot is
        written bare: its recipients recorded as sent and its entry acknowledged, without its
        events, dead letters or retry (logged).  Stopping the worker instead, as for any
        other bug, left the whole batch pending, and the next worker to claim it sent every
        message in it again.  What is left to write is returned; a bare settlement that
        cannot be written either raises (the settler stops the worker)."""
        if len(batch) > 1:
            for queued in batch:
                await self._apply([queued], first_run=False)
            return []
        [queued] = batch
        settlement = queued.settlement
        bare = oc.Settlement(
            entry_id=settlement.entry_id, message_id=settlement.message_id,
            accepted=list(settlement.accepted),
        )  # fmt: skip
        if settlement == bare:
            raise SettlementUnwritable(settlement.entry_id)
        log.exception("settlement_unwritable", entry=settlement.entry_id,
                      id=settlement.message_id, written="the record of the recipients sent "
                      "and the acknowledgement; not its events, dead letters or retry")  # fmt: skip
        return [Queued(bare, queued.settled)]

    async def close(self, grace: float) -> None:
        """Flush what is queued; give up after ``grace`` seconds (Redis gone at shutdown)."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, grace)
        except TimeoutError:
            # Those entries stay pending; recipients they record as sent may be sent again.
            log.error("settlements_lost_at_stop", count=len(self._queue) + self._applying)
