"""The retry schedule: exponential back-off with jitter, capped, until attempts or age run out.

Attempt ``n`` (1 for the first send) that fails transiently is retried after
``min(cap, base * 2 ** (n - 1))`` seconds times a random factor in [0.8, 1.2] (jitter, so
messages deferred together by a relay outage do not come back together), but never after
the message's deadline ``first_attempt + max_age``: the last try happens at the deadline.
After ``max_attempts`` attempts, or when the deadline has passed, the message is dead.

With the defaults (base 60 s, cap 1 h, 60 attempts, 2 days) the retries come after about
1, 2, 4, 8, 16, 32 minutes and then hourly; the deadline (2 days, about the 53rd attempt)
is what ends it, and ``--max-attempts`` only bounds a short ``--retry-cap``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

JITTER = (0.8, 1.2)


@dataclass(frozen=True)
class RetryPolicy:
    base: float
    cap: float
    max_attempts: int
    max_age: float

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        exponent = min(max(attempts - 1, 0), 62)  # 2**62 is far past any cap; avoids overflow
        return min(self.cap, self.base * 2.0**exponent) * rng.uniform(*JITTER)

    def next_attempt(
        self, attempts: int, first_attempt: float, now: float, rng: random.Random
    ) -> float | None:
        """When to try again after ``attempts`` attempts, or None: give up (dead letter)."""
        deadline = first_attempt + self.max_age
        if attempts >= self.max_attempts or now >= deadline:
            return None
        return min(now + self.delay(attempts, rng), deadline)
