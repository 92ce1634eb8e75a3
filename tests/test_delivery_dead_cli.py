"""``mailpool dead list / show / replay / purge`` against real dead letters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    make_config,
    pack,
    run_until_settled,
    running_worker,
    send_message,
    settled,
    stream_fields,
)
from tests.harness import ROOT, wait_until
from tests.sinks import RecordingSink
from workers import deadletters
from workers.streams import layout


def dead(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "dead", *args, "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip


async def _one_rejected(redis: aioredis.Redis, redis_url: str, sink: RecordingSink) -> str:
    """ann accepted, bob refused once with 550: bob's copy is a dead letter."""
    sink.refuse_rcpt("bob@example.com", "550 5.2.1 mailbox disabled", times=1)
    await enqueue(redis, send_message(["ann@example.com", "bob@example.com"], message_id="inv-9"))
    await run_until_settled(redis, make_config(redis_url, sink.url))
    [letter] = await stream_fields(redis, "email.send.dead")
    return str(letter["_id"])


async def test_list_and_show(redis: aioredis.Redis, redis_url: str, sink: RecordingSink) -> None:
    dead_id = await _one_rejected(redis, redis_url, sink)
    listed = dead(redis_url, "list")
    assert listed.returncode == 0, listed.stderr
    assert dead_id in listed.stdout and "rejected" in listed.stdout
    assert "bob@example.com" in listed.stdout
    as_json = [json.loads(line) for line in dead(redis_url, "list", "--json").stdout.splitlines()]
    assert [(d["id"], d["reason"], d["smtp_code"]) for d in as_json] == [(dead_id, "rejected", 550)]
    assert as_json[0]["to"] == ["ann@example.com", "bob@example.com"]  # decoded summary
    shown_json = json.loads(dead(redis_url, "show", dead_id, "--json").stdout)
    for letter in (as_json[0], shown_json):  # JSON arrays and numbers, not their text
        assert letter["recipients"] == ["bob@example.com"]
        assert letter["attempts"] == 1
        assert isinstance(letter["first_attempt"], float)
        assert letter["first_attempt"] <= letter["last_attempt"]
    shown = dead(redis_url, "show", dead_id)
    assert shown.returncode == 0
    assert "mailbox disabled" in shown.stdout and "message_id: inv-9" in shown.stdout
    assert "recipients: bob@example.com\n" in shown.stdout
    missing = dead(redis_url, "show", "1-1")
    assert missing.returncode == 1 and "no such dead letter" in missing.stderr


async def test_replay_sends_only_to_the_dead_letters_recipients(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    dead_id = await _one_rejected(redis, redis_url, sink)
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    replayed = dead(redis_url, "replay", dead_id)
    assert replayed.returncode == 0, replayed.stderr
    assert await redis.xlen("email.send.dead") == 0  # moved, not copied
    await run_until_settled(redis, make_config(redis_url, sink.url))
    # bob gets it now; ann is not sent a second copy; the Message-ID is unchanged
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",), ("bob@example.com",)]
    assert sink.received[0].message_id == sink.received[1].message_id
    assert await redis.xlen("email.send.dead") == 0


async def test_replay_all_of_everything_is_idempotency_aware(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """A dead letter whose recipients were meanwhile accepted (e.g. replayed twice by two
    operators) is not sent again."""
    dead_id = await _one_rejected(redis, redis_url, sink)
    letter = (await redis.xrange("email.send.dead"))[0][1]
    await redis.xadd("email.send.dead", letter)  # a second copy of the same dead letter
    assert dead(redis_url, "replay", "--all").returncode == 0
    await run_until_settled(redis, make_config(redis_url, sink.url))
    assert sink.deliveries_to("bob@example.com")[0].rcpt_tos == ("bob@example.com",)
    assert len(sink.deliveries_to("bob@example.com")) == 1
    assert len(sink.deliveries_to("ann@example.com")) == 1
    assert dead(redis_url, "replay", dead_id).returncode == 1  # gone: already replayed


async def test_replay_all_replays_the_letters_there_at_its_start_once(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """A worker runs and the relay still refuses: each replayed send fails again and makes
    a new letter while ``--all`` pages on (more than a page of letters).  Those are not
    replayed again in the same run (before: 708 replays of 600 letters, and growing)."""
    letters = deadletters.PAGE + 100
    sink.refuse_rcpt("ann@example.com", "550 5.7.1 rejected by policy")  # suppresses nobody
    for n in range(letters):
        ref = layout.MessageRef(f"m-{n}", f"1-{n}", pack(send_message(message_id=f"m-{n}")))
        await redis.xadd("email.send.dead", layout.dead_letter(
            ref, reason="rejected", error="550", recipients=["ann@example.com"], attempts=1,
            first_attempt=1.0, last_attempt=1.0,
        ))  # fmt: skip
    async with running_worker(make_config(redis_url, sink.url, concurrency=20)):
        result = await asyncio.to_thread(dead, redis_url, "replay", "--all")
        await wait_until(lambda: settled(redis), timeout=30)
    assert result.returncode == 0 and f"replayed {letters}," in result.stderr
    assert sink.rcpt_seen["ann@example.com"] == letters


async def test_invalid_dead_letters_are_not_replayed(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await enqueue(redis, b"not msgpack at all")
    await run_until_settled(redis, make_config(redis_url, sink.url))
    result = dead(redis_url, "replay", "--all")
    assert result.returncode == 0 and "invalid" in result.stderr
    assert await redis.xlen("email.send.dead") == 1


async def test_purge_ids_and_all(redis: aioredis.Redis, redis_url: str) -> None:
    ids = [
        (
            await redis.xadd("email.send.dead", {"data": pack(send_message()), "reason": "expired"})
        ).decode()
        for _ in range(4)
    ]
    assert dead(redis_url, "purge", ids[0]).returncode == 0
    assert await redis.xlen("email.send.dead") == 3
    assert dead(redis_url, "purge", "--all").returncode == 0
    assert await redis.xlen("email.send.dead") == 0


async def test_purge_all_after_the_newest_letter_was_purged_by_id_leaves_none(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """An approximate trim (``~``) drops whole stream nodes only: with the newest letter
    deleted by id, ``purge --all`` kept the older ones."""
    await redis.xadd("email.send.dead", {"data": b"d", "reason": "expired"}, id="1-0")
    await redis.xadd("email.send.dead", {"data": b"d", "reason": "expired"}, id="2-0")
    assert dead(redis_url, "purge", "2-0").returncode == 0
    assert dead(redis_url, "purge", "--all").returncode == 0
    assert await redis.xlen("email.send.dead") == 0


async def test_a_field_that_does_not_parse_is_shown_as_text(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A dead letter written by something else (or an older version) is listed, not fatal."""
    await redis.xadd(
        "email.send.dead",
        {"data": pack(send_message()), "reason": "expired", "attempts": "many",
         "recipients": "not json", "smtp_code": "550"},
    )  # fmt: skip
    listed = dead(redis_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (letter,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (letter["attempts"], letter["recipients"], letter["smtp_code"]) == (
        "many", "not json", 550,
    )  # fmt: skip


async def test_odd_values_other_producers_stored_are_listed(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A time past what gmtime shows and a recipient with a lone surrogate (valid JSON, no
    valid UTF-8) each ended the listing with a traceback."""
    await redis.xadd(
        "email.send.dead",
        {"data": pack(send_message()), "reason": "expired", "last_attempt": "1e400",
         "recipients": '["\\ud800@example.com"]', "error": "gave up"},
    )  # fmt: skip
    listed = dead(redis_url, "list")
    assert listed.returncode == 0, listed.stderr
    # The time, no finite number, is shown as unknown ("-"); it showed "inf" before.
    assert "expired   -  \\ud800@example.com" in listed.stdout, listed.stdout


async def test_json_output_stays_json_and_names_the_letter_itself(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A hand-written ``nan`` time came out as ``NaN`` (no JSON), and a field named ``id``
    took the place of the letter's entry id, which a script then replayed or purged."""
    letter_id = await redis.xadd(
        "email.send.dead",
        {"data": pack(send_message()), "reason": "expired", "first_attempt": "nan",
         "last_attempt": "inf", "id": "1-0"},
    )  # fmt: skip
    for args in (["list", "--json"], ["show", letter_id.decode(), "--json"]):
        shown = dead(redis_url, *args)
        assert shown.returncode == 0, shown.stderr
        [letter] = [
            json.loads(line, parse_constant=_no_constant) for line in shown.stdout.splitlines()
        ]
        assert letter["id"] == letter_id.decode()
        assert (letter["first_attempt"], letter["last_attempt"]) == ("nan", "inf")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def test_replay_needs_ids_or_all(redis_url: str) -> None:
    result = dead(redis_url, "replay")
    assert result.returncode == 2
    assert "ids or --all" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("action", ["show", "replay", "purge"])
@pytest.mark.parametrize(
    "given", ["abc", "1-2-3", "", "-", "18446744073709551616-0", "1700000000000"]
)
def test_what_is_not_an_entry_id_is_refused_as_an_argument(
    redis_url: str, action: str, given: str
) -> None:
    """Not Redis's "Invalid stream ID" as a failure to use Redis (exit 1); and a bare
    milliseconds (which XRANGE reads as a range) is no id either."""
    result = dead(redis_url, action, given)
    assert result.returncode == 2 and "is not an entry id" in result.stderr
    assert len(result.stderr.splitlines()) == 1


async def test_a_field_mailpool_does_not_know_is_shown_where_it_is_stored(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """The schema lets others add fields: list and show print them, nothing is hidden."""
    fields = {
        "data": pack(send_message()),
        "reason": "expired",
        "ticket": "OPS-42",
        "attempts": "3",
    }
    dead_id = (await redis.xadd("email.send.dead", fields)).decode()
    (listed,) = [json.loads(line) for line in dead(redis_url, "list", "--json").stdout.splitlines()]
    shown_json = json.loads(dead(redis_url, "show", dead_id, "--json").stdout)
    for letter in (listed, shown_json):
        assert list(letter)[:4] == ["id", "reason", "ticket", "attempts"]
        assert (letter["ticket"], letter["attempts"]) == ("OPS-42", 3)
    shown = dead(redis_url, "show", dead_id)
    assert shown.returncode == 0
    assert "reason: expired\nticket: OPS-42\nattempts: 3\n" in shown.stdout


async def test_a_dead_letter_whose_recipients_do_not_parse_is_named_and_the_rest_replayed(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A letter written by something else with a mangled recipients field is one line, not
    a traceback; the other letters are still replayed and the exit status says one failed."""
    mangled = await redis.xadd(
        "email.send.dead",
        {"data": pack(send_message()), "reason": "expired", "recipients": "not json"},
    )
    await redis.xadd("email.send.dead", {"data": pack(send_message()), "reason": "expired"})
    result = dead(redis_url, "replay", "--all")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [named] = [line for line in result.stderr.splitlines() if mangled.decode() in line]
    assert "recipients" in named
    assert await redis.xlen("email.send") == 1  # the other letter
