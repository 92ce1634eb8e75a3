"""The retry schedule's arithmetic (pure): exponential, jittered, capped, bounded by age."""

from __future__ import annotations

import random

from workers.config import DeliveryConfig
from workers.streams.retry import RetryPolicy

POLICY = RetryPolicy(base=60.0, cap=3600.0, max_attempts=30, max_age=172_800.0)


def test_delays_double_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    for attempts, nominal in [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (20, 3600)]:
        delays = [POLICY.delay(attempts, rng) for _ in range(200)]
        assert 0.8 * nominal <= min(delays) and max(delays) <= 1.2 * nominal
        assert max(delays) - min(delays) > 0.2 * nominal  # jitter spreads retries


def test_gives_up_after_max_attempts() -> None:
    rng = random.Random(2)
    assert POLICY.next_attempt(29, first_attempt=0.0, now=10.0, rng=rng) is not None
    assert POLICY.next_attempt(30, first_attempt=0.0, now=10.0, rng=rng) is None


def test_last_try_at_the_deadline_then_gives_up() -> None:
    rng = random.Random(3)
    due = POLICY.next_attempt(10, first_attempt=0.0, now=172_000.0, rng=rng)
    assert due == 172_800.0  # an hour's delay would pass the deadline: try at the deadline
    assert POLICY.next_attempt(11, first_attempt=0.0, now=172_800.0, rng=rng) is None


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert POLICY.delay(10_000, random.Random(4)) <= 1.2 * 3600


def test_defaults_are_those_documented() -> None:
    defaults = DeliveryConfig(relay="maildir:/tmp/x")
    assert (defaults.retry_base, defaults.retry_cap) == (60.0, 3600.0)
    assert (defaults.max_attempts, defaults.max_age) == (60, 172_800.0)
