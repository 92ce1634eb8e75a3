"""Fixtures of the chaos scenarios: the JSON Schema check of what each scenario left in
Redis.  Their helpers are in tests/chaos/scenario.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.chaos.outcome_schemas import check_outcomes
from tests.harness import RedisServer


@pytest.fixture(autouse=True)
def outcomes_follow_the_schemas(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each scenario on the session's Redis: its events and dead letters satisfy the
    JSON Schemas (scenarios on servers of their own: ``make_redis`` below)."""
    # Asked for here, before the scenario's other fixtures, so that it is still there after
    # them (a function-scoped fixture is torn down in the reverse order of set-up).
    url = request.getfixturevalue("redis_url") if "redis_url" in request.fixturenames else None
    yield
    if url is not None:
        check_outcomes([url])


@pytest.fixture
def make_redis(make_redis: Callable[..., RedisServer]) -> Iterator[Callable[..., RedisServer]]:
    """tests/conftest.py's ``make_redis``; at the end, the schema check on every server
    started that is still running (before they are stopped)."""
    started: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        started.append(make_redis(**kwargs))
        return started[-1]

    yield make
    check_outcomes([server.url for server in started if server.process is not None])
