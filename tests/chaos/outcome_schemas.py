"""The chaos suite's schema check: every event and dead letter a scenario wrote satisfies
schema/event.schema.json and schema/dead-letter.schema.json (fixtures in conftest.py).

Read with a plain client after the scenario, from every Redis it used that still answers
(a scenario may end with its own server stopped: nothing to read there)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import redis

from tests.schema_util import schema_violations

STREAMS = {"email.send.events": "event", "email.send.dead": "dead-letter"}
BATCH = 2000


def _entries(client: redis.Redis, stream: str) -> Iterator[tuple[bytes, Mapping[bytes, bytes]]]:
    start: bytes | str = "-"
    while True:
        rows = client.xrange(stream, min=start, count=BATCH)
        yield from rows
        if len(rows) < BATCH:
            return
        start = b"(" + rows[-1][0]


def outcome_violations(url: str) -> list[str]:
    """What breaks the schemas in the events and dead letters at ``url`` ([] when Redis is
    not there any more)."""
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2)
    try:
        return [
            problem
            for stream, kind in STREAMS.items()
            for problem in schema_violations(kind, list(_entries(client, stream)))
        ]
    except redis.ConnectionError:
        return []
    finally:
        client.close()


def check_outcomes(urls: list[str]) -> None:
    problems = [problem for url in urls for problem in outcome_violations(url)]
    assert not problems, f"{len(problems)} schema violations, e.g. {problems[:5]}"
