"""The suppression list: a recipient a relay refused as an address (5.1.x, 5.2.1) is not
attempted again for --suppress-ttl; the send gets a dead letter and an event with reason
``suppressed``; a message can opt out; refusals of policy or content suppress nobody;
``mailpool suppress`` lists, adds and removes; housekeeping drops what expired."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    pack,
    run_until_settled,
    running_worker,
    send_message,
    stream_fields,
)
from tests.harness import ROOT, wait_until
from tests.sinks import RecordingSink
from workers.housekeeping import HousekeepConfig, housekeep_once
from workers.relay import Reply
from workers.streams import suppression as suppression_module
from workers.streams.layout import StreamKeys
from workers.streams.suppression import (
    Suppression,
    SuppressionList,
    normalise,
    refuses_the_address,
)

LIST = "mailpool:suppressed"
TTL = 3600.0


def suppress(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "suppress", *args, "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip


def replay(redis_url: str, letter_id: str) -> None:
    command = ["dead", "replay", letter_id, "--redis-url", redis_url]
    done = subprocess.run(
        [sys.executable, "-m", "workers", *command],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


async def _send(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, *to: str, **kw: object
) -> None:
    await enqueue(redis, send_message(list(to), **kw))
    await run_until_settled(redis, make_config(redis_url, sink.url, suppress_ttl=TTL))


async def test_a_recipient_refused_as_an_address_is_not_attempted_again(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_rcpt("bob@example.com", "550 5.1.1 <bob@example.com>: no such user", times=1)
    await _send(redis, redis_url, sink, "ann@example.com", "Bob@Example.com")
    until = await redis.zscore(LIST, "bob@example.com")
    assert until is not None and abs(until - (time.time() + TTL)) < 30
    why = json.loads(await redis.hget(LIST + ":why", "bob@example.com"))
    assert (why["reason"], why["code"]) == ("rejected", 550)
    # The relay would take bob now; he is suppressed, ann is sent to.
    await _send(redis, redis_url, sink, "ann@example.com", "bob@example.com", subject="second")
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",), ("ann@example.com",)]
    letters = await stream_fields(redis, "email.send.dead")
    assert [d["reason"] for d in letters] == ["rejected", "suppressed"]
    assert json.loads(letters[1]["recipients"]) == ["bob@example.com"]
    assert "bob@example.com: suppressed until " in letters[1]["error"]
    kinds = [(e["event"], e["recipients"]) for e in await events(redis)]
    assert ("suppressed", ["bob@example.com"]) in kinds
    assert kinds.count(("delivered", ["ann@example.com"])) == 2


async def test_a_send_with_every_recipient_suppressed_makes_no_transaction(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    assert suppress(redis_url, "add", "bob@example.com", "--note", "asked us").returncode == 0
    await _send(redis, redis_url, sink, "bob@example.com")
    assert sink.received == []
    [letter] = await stream_fields(redis, "email.send.dead")
    assert (letter["reason"], letter["attempts"]) == ("suppressed", "0")
    [event] = await events(redis)
    assert (event["event"], event["smtp_code"]) == ("suppressed", "")


async def test_opting_out_and_replaying_send_to_a_suppressed_recipient(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    assert suppress(redis_url, "add", "bob@example.com").returncode == 0
    await _send(redis, redis_url, sink, "bob@example.com", ignore_suppression=True)
    assert [r.rcpt_tos for r in sink.received] == [("bob@example.com",)]
    await _send(redis, redis_url, sink, "bob@example.com", subject="no opt-out")
    [letter] = await stream_fields(redis, "email.send.dead")
    replay(redis_url, letter["_id"])
    await run_until_settled(redis, make_config(redis_url, sink.url, suppress_ttl=TTL))
    assert [r.message["subject"] for r in sink.received] == ["Hello", "no opt-out"]


@pytest.mark.parametrize(
    "refusal",
    [
        "554 5.7.1 <bob@example.com>: Relay access denied",  # the relay's policy
        "550 5.7.26 unauthenticated sender",
        "552 5.2.2 mailbox full",
        "550 5.0.0 bob@example.com: refused",  # no address status
    ],
)
async def test_refusals_that_do_not_blame_the_address_suppress_nobody(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, refusal: str
) -> None:
    sink.refuse_rcpt("bob@example.com", refusal, times=1)
    await _send(redis, redis_url, sink, "bob@example.com")
    assert await redis.zcard(LIST) == 0


async def test_a_refused_message_suppresses_nobody(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    sink.refuse_data("550 5.1.1 odd relay that blames the address at DATA", times=1)
    await _send(redis, redis_url, sink, "bob@example.com")
    assert await redis.zcard(LIST) == 0


async def test_suppress_ttl_0_turns_the_list_off(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    assert suppress(redis_url, "add", "ann@example.com").returncode == 0
    sink.refuse_rcpt("bob@example.com", "550 5.1.1 no such user", times=1)
    await enqueue(redis, send_message(["ann@example.com", "bob@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url, suppress_ttl=0))
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    assert await redis.zrange(LIST, 0, -1) == [b"ann@example.com"]


async def test_the_cli_lists_adds_and_removes(redis: aioredis.Redis, redis_url: str) -> None:
    added = suppress(redis_url, "add", "Bob@Example.com", "carol@example.com", "--ttl", "600",
                     "--note", "complaint")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "suppressed 2 until 20" in added.stdout
    forever = suppress(redis_url, "add", "dave@example.com")
    assert "until further notice" in forever.stdout
    listed = suppress(redis_url, "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["address"] for r in rows] == [
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    ]
    assert rows[0]["reason"] == "manual" and rows[0]["text"] == "complaint"
    assert 500 < rows[0]["until"] - time.time() <= 600
    assert rows[2]["until"] is None
    table = suppress(redis_url, "list").stdout
    assert "bob@example.com" in table and "complaint" in table
    removed = suppress(redis_url, "remove", "BOB@example.com", "nobody@example.com")
    assert (removed.returncode, removed.stdout.strip()) == (1, "removed 1 of 2")
    assert await redis.zscore(LIST, "bob@example.com") is None
    assert await redis.hget(LIST + ":why", "bob@example.com") is None


async def test_hand_written_entries_neither_stop_delivery_nor_the_cli(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Written by hand with redis-cli: a member that is not UTF-8 killed the delivery
    worker that copied the list (UnicodeDecodeError, a crash loop), and reasons that are
    not our JSON object gave tracebacks, or NaN in ``list --json``."""
    far = time.time() + TTL
    await redis.zadd(LIST, {b"b\xff@x.example": far, "c@x.example": far, "d@x.example": far})
    reasons = {"c@x.example": '{"since": "abc"}', "d@x.example": '{"since": NaN, "code": [1]}'}
    await redis.hset(LIST + ":why", mapping=reasons)
    await redis.incr("mailpool:suppressed:version")
    await _send(redis, redis_url, sink, "ann@example.com")
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    listed = suppress(redis_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]  # NaN is no JSON
    assert {r["address"] for r in rows} >= {"c@x.example", "d@x.example"}
    assert all(math.isfinite(r["since"]) and r["code"] is None for r in rows)
    assert suppress(redis_url, "list").returncode == 0


async def test_a_refusal_that_does_not_extend_an_entry_keeps_its_reason(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """An operator's entry "until further notice" with a note, then a bounce (or a refusal
    at RCPT) of an earlier send: the end stays, and so does the note (it was replaced by
    the bounce's reply, the end kept)."""
    assert suppress(redis_url, "add", "bob@example.com", "--note", "legal hold").returncode == 0
    now = time.time()
    bounce = Suppression(address="bob@example.com", until=now + 60, reason="bounced",
                         since=now, code=550, text="5.1.1 no such user")  # fmt: skip
    await SuppressionList([(redis, StreamKeys())]).add([bounce])
    [row] = [json.loads(line) for line in suppress(redis_url, "list", "--json").stdout.splitlines()]
    assert (row["reason"], row["text"], row["until"]) == ("manual", "legal hold", None)


@pytest.mark.parametrize(
    "args",
    [
        ("add",),
        ("remove",),
        ("list", "a@b.c"),
        ("add", "not-an-address"),
        # Each once listed with exit 0.
        ("add", "bob@"),
        ("add", "@example.org"),
        ("add", "a@b@example.org"),
        ("add", "a@-bad-.example"),
        ("add", "x@bücher..example"),
        ("add", "postmaster"),
        ("add", "a" * 65 + "@example.org"),  # no relay need take it (RFC 5321 4.5.3.1.1)
        ("add", "a@b.c", "--ttl", "-1"),
        ("forget", "a@b.c"),
    ],
)
def test_the_cli_refuses_bad_use_with_exit_2(redis_url: str, args: tuple[str, ...]) -> None:
    done = suppress(redis_url, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


async def test_expired_entries_count_as_absent_and_housekeeping_removes_them(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await redis.zadd(LIST, {"old@example.com": time.time() - 1, "new@example.com": math.inf})
    await redis.hset(LIST + ":why", mapping={"old@example.com": "{}", "new@example.com": "{}"})
    assert [
        json.loads(x)["address"]
        for x in suppress(redis_url, "list", "--json").stdout.split("\n")
        if x
    ] == ["new@example.com"]
    await _send(redis, redis_url, sink, "old@example.com")
    assert [r.rcpt_tos for r in sink.received] == [("old@example.com",)]
    await housekeep_once(redis, StreamKeys(), HousekeepConfig(redis_url=redis_url))
    assert await redis.zrange(LIST, 0, -1) == [b"new@example.com"]
    assert await redis.hkeys(LIST + ":why") == [b"new@example.com"]


@pytest.mark.parametrize(
    "reply",
    [
        Reply(550, "5.1.1 no such user"),
        Reply(550, "5.1.10 null MX"),
        Reply(550, "5.2.1 mailbox disabled"),
        Reply(550, "5.1.0 <bob@example.com>: Recipient address rejected: User unknown"),
        # Without an enhanced code: a text that says the mailbox is unknown.
        Reply(550, "Unrouteable address"),  # Exim
        Reply(550, "<bob@example.com>... User unknown"),  # sendmail
        Reply(553, "sorry, no mailbox here by that name. (#5.1.1)"),  # qmail, code last
        Reply(550, "Requested action not taken: mailbox unavailable"),
        Reply(550, "No such user here"),
        Reply(550, "The email account that you tried to reach does not exist"),
    ],
)
def test_these_refusals_blame_the_address(reply: Reply) -> None:
    assert refuses_the_address(reply)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(554, "5.7.1 relay denied"),
        Reply(450, "4.1.1 try later"),
        Reply(None, "timeout"),
        Reply(552, "5.2.2 over quota"),
        # The sender's address, refused at RCPT time (Postfix): nobody's recipient is bad.
        Reply(554, "5.1.8 <news@nodns.example>: Sender address rejected: Domain not found"),
        Reply(550, "5.1.7 <news@example.org>: Sender address rejected: bad syntax"),
        Reply(550, "5.1.0 <news@example.org>: Sender address rejected: User unknown"),
        # A relay that does not relay for us: every recipient would be suppressed.
        Reply(550, "relay not permitted"),  # Exim, no enhanced codes
        Reply(553, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),  # qmail
        Reply(553, "sorry, that domain isn't in my list"),  # neither code nor a word of mailboxes
        Reply(550, "Administrative prohibition"),
        Reply(550, "Unknown user; blocked by policy"),
        # "unknown" alone names no mailbox (each once suppressed the recipient).
        Reply(550, "Client host rejected: cannot find your hostname (unknown)"),
        Reply(550, "Mail from unknown IP address refused"),
        Reply(550, "Message contains unknown attachment type"),
        Reply(550, "Your message could not be delivered because the HELO domain is unknown"),
        Reply(554, "Message rejected: see 5.1.1 in our FAQ"),  # a code not at the start
    ],
)
def test_these_refusals_suppress_nobody(reply: Reply) -> None:
    assert not refuses_the_address(reply)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("X@Straße.example", "x@xn--strae-oqa.example"),  # IDNA 2003 made it strasse.example
        ("bob@Bücher.Example", "bob@xn--bcher-kva.example"),
        ("bob@example.com", "bob@example.com"),
    ],
)
def test_the_list_keys_international_domains_by_idna_2008(address: str, key: str) -> None:
    assert normalise(address) == key


async def test_every_partition_has_the_list(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Partitioned: a refusal seen on one partition suppresses on all of them (each
    partition's copy is written), and the CLI changes and lists every copy."""
    sink.refuse_rcpt("bob@example.com", "550 5.1.1 no such user", times=1)
    config = make_config(redis_url, sink.url, partitions=3, suppress_ttl=TTL)
    await redis.xadd("email.send{0}", {"data": pack(send_message(["bob@example.com"]))})
    await run_until_settled(redis, config, partition=0)
    copies = [f"mailpool:{{{p}}}suppressed" for p in range(3)]
    assert [await redis.zscore(key, "bob@example.com") is not None for key in copies] == [True] * 3
    await redis.xadd("email.send{2}", {"data": pack(send_message(["bob@example.com"]))})
    await run_until_settled(redis, config, partition=2)
    assert sink.received == []
    [letter] = await stream_fields(redis, "email.send.dead{2}")
    assert letter["reason"] == "suppressed"
    assert suppress(redis_url, "add", "carol@example.com", "--partitions", "3").returncode == 0
    assert [await redis.zscore(key, "carol@example.com") for key in copies].count(None) == 0
    listed = suppress(redis_url, "list", "--json", "--partitions", "3").stdout.splitlines()
    assert [json.loads(row)["address"] for row in listed] == [
        "bob@example.com",
        "carol@example.com",
    ]


async def test_a_replay_deferred_once_still_goes_to_the_suppressed_recipient(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """The replay's retry carries the bypass (before, it was suppressed again)."""
    assert suppress(redis_url, "add", "bob@example.com").returncode == 0
    await _send(redis, redis_url, sink, "bob@example.com")
    [letter] = await stream_fields(redis, "email.send.dead")
    replay(redis_url, letter["_id"])
    sink.refuse_rcpt("bob@example.com", "451 4.3.0 try again", times=1)
    await run_until_settled(redis, make_config(redis_url, sink.url, suppress_ttl=TTL))
    assert [r.rcpt_tos for r in sink.received] == [("bob@example.com",)]
    kinds = [e["event"] for e in await events(redis)]
    assert kinds == ["suppressed", "deferred", "delivered"]


async def test_a_second_entry_with_the_id_is_not_sent_to_an_address_just_refused(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    """Two entries of one message id: the first finds bob refused as an address; the
    second, waiting its turn, finds him suppressed and does not try him again."""
    sink.refuse_rcpt("bob@example.com", "550 5.1.1 no such user")
    for _ in range(2):
        await enqueue(redis, send_message(["ann@example.com", "bob@example.com"], message_id="M1"))
    await run_until_settled(redis, make_config(redis_url, sink.url, suppress_ttl=TTL))
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    assert sink.rcpt_seen["bob@example.com"] == 1
    letters = await stream_fields(redis, "email.send.dead")
    assert sorted(d["reason"] for d in letters) == ["rejected", "suppressed"]


async def test_remove_takes_what_delivery_may_have_listed(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Delivery sends to (and so may suppress) an address ``add`` refuses as a typo: the
    operator can still take it off the list."""
    await redis.zadd(LIST, {"bob@exa_mple.com": math.inf})
    assert suppress(redis_url, "add", "bob@exa_mple.com").returncode == 2
    done = suppress(redis_url, "remove", "bob@exa_mple.com")
    assert done.returncode == 0, done.stdout + done.stderr
    assert await redis.zcard(LIST) == 0


async def test_an_international_domain_matches_in_either_form(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    assert suppress(redis_url, "add", "Bob@Bücher.example").returncode == 0
    assert await redis.zscore(LIST, "bob@xn--bcher-kva.example") is not None
    await _send(redis, redis_url, sink, "bob@bücher.example")
    assert sink.received == []
    assert suppress(redis_url, "remove", "bob@xn--bcher-kva.example").returncode == 0


async def test_a_listing_read_by_head_ends_quietly(redis: aioredis.Redis, redis_url: str) -> None:
    """``mailpool suppress list | head -1``: the reader left; that is no Redis failure
    (before: "cannot use Redis at ...: Broken pipe", exit 1)."""
    await redis.zadd(LIST, {f"user{n}@example.com": math.inf for n in range(3000)})
    listing = subprocess.Popen(
        [sys.executable, "-m", "workers", "suppress", "list", "--redis-url", redis_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert listing.stdout is not None and listing.stderr is not None
    assert listing.stdout.readline().startswith(b"ADDRESS")
    listing.stdout.close()  # more than the pipe holds is still to come
    assert listing.wait(timeout=30) == 128 + signal.SIGPIPE
    assert listing.stderr.read() == b""


@pytest.mark.parametrize("ttl", ["1e300", "nan", "inf", "3153600001"])
def test_a_ttl_beyond_a_century_is_refused(redis_url: str, ttl: str) -> None:
    done = suppress(redis_url, "add", "a@b.c", "--ttl", ttl)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


async def test_a_change_reaches_a_running_worker_within_a_second(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    config = make_config(redis_url, sink.url, suppress_ttl=TTL)
    async with running_worker(config):
        await enqueue(redis, send_message(["bob@example.com"], subject="before"))
        await wait_until(lambda: len(sink.received) == 1, "the first send")
        assert suppress(redis_url, "add", "bob@example.com").returncode == 0
        await asyncio.sleep(1.2)  # the worker's copy is refreshed within a second
        await enqueue(redis, send_message(["bob@example.com"], subject="after"))
        await wait_until(lambda: _dead_letters(redis), "the suppressed send")
    assert [r.message["subject"] for r in sink.received] == ["before"]


async def _dead_letters(redis: aioredis.Redis) -> bool:
    return bool(await redis.xlen("email.send.dead"))


async def test_a_list_too_large_to_copy_is_asked_about_per_batch(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suppression_module, "MAX_LOCAL", 0)
    assert suppress(redis_url, "add", "bob@example.com").returncode == 0
    await _send(redis, redis_url, sink, "ann@example.com", "bob@example.com")
    assert [r.rcpt_tos for r in sink.received] == [("ann@example.com",)]
    [letter] = await stream_fields(redis, "email.send.dead")
    assert letter["reason"] == "suppressed"
