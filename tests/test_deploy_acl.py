"""deploy/redis/users.acl against a real redis-server: each role can do its job, nothing more.

The server loads a copy of the ACL file (plus a test-only admin user for set-up); every
role connects with its documented example password.  Two kinds of checks: a table of raw
commands per role (allowed ones work, the rest get NOPERM), and the roles' own code paths
(producer, listener, ingest, delivery outcomes, status, housekeeping) run as their user.
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from tests.harness import RedisServer
from workers.streams.consumer import GroupConsumer
from workers.streams.keys import StreamKeys

REPO = Path(__file__).resolve().parent.parent
ACL_FILE = REPO / "deploy" / "redis" / "users.acl"
BASE = REPO / "deploy" / "base"
ROLES = (
    "ingest", "producer", "delivery", "listener", "monitor", "housekeeping", "keda", "operator",
)  # fmt: skip
ADMIN = ("acl-test-admin", "acl-test-admin-password")


def example_password(role: str) -> str:
    """The documented example password of a role (deploy/redis/README.md)."""
    return f"EXAMPLE-{role}-password-CHANGE-ME"


def acl_rules() -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for line in ACL_FILE.read_text().splitlines():
        if line.strip():
            keyword, name, *rules = line.split()
            assert keyword == "user", f"not an ACL user line: {line!r}"
            users[name] = rules
    return users


# ---------------------------------------------------------------------------------------
# The file itself and its link to the Kubernetes Secret template


def test_acl_file_has_one_user_per_role_and_default_off() -> None:
    users = acl_rules()
    assert set(users) == {"default", *ROLES}
    assert users["default"] == ["off"]
    for role in ROLES:
        rules = users[role]
        assert rules[:2] == ["reset", "on"], f"{role}: start from nothing (reset) then enable"
        assert not any(r in {"+@all", "allcommands", "~*", "allkeys", "nopass"} for r in rules)


def test_passwords_are_hashes_of_the_documented_examples() -> None:
    for role, rules in acl_rules().items():
        if role == "default":
            continue
        hashes = [r[1:] for r in rules if r.startswith("#")]
        assert not [r for r in rules if r.startswith(">")], f"{role}: clear-text password"
        expected = hashlib.sha256(example_password(role).encode()).hexdigest()
        assert hashes == [expected], f"{role}: hash is not sha256 of the documented example"


def test_secret_template_matches_the_acl_users() -> None:
    """The example deploys as is: each Deployment's user and password exist in the ACL."""
    import yaml

    secret = yaml.safe_load((BASE / "secret.yaml").read_text())["stringData"]
    rules = acl_rules()
    checked = 0
    for path in BASE.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] != "Deployment":
                continue
            env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
            user = next(v["value"] for v in env if v["name"] == "REDIS_USERNAME")
            key = next(
                v["valueFrom"]["secretKeyRef"]["key"] for v in env if v["name"] == "REDIS_PASSWORD"
            )
            digest = hashlib.sha256(secret[key].encode()).hexdigest()
            assert f"#{digest}" in rules[user], f"{path.name}: {key} is not {user}'s password"
            checked += 1
    assert checked == 3
    keda_digest = hashlib.sha256(secret["redis-keda-password"].encode()).hexdigest()
    assert f"#{keda_digest}" in rules[secret["redis-keda-username"]]


# ---------------------------------------------------------------------------------------
# A redis-server with the ACL file


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    directory = tmp_path_factory.mktemp("acl")
    acl_copy = directory / "users.acl"
    # The file as shipped, plus an admin for the test's own set-up (never in the shipped file).
    acl_copy.write_text(ACL_FILE.read_text() + f"user {ADMIN[0]} on >{ADMIN[1]} ~* &* +@all\n")
    server = RedisServer(directory / "data", extra=["--aclfile", str(acl_copy)])
    server.start()
    assert server.process is not None and server.process.poll() is None, "ACL file rejected"
    try:
        yield server
    finally:
        server.stop(kill=True)


def client(server: RedisServer, user: str, password: str) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=server.port, username=user, password=password, socket_timeout=5
    )


def raw_client(server: RedisServer, user: str, password: str) -> redis.Redis:
    """A client that returns raw replies (the table sends commands in forms redis-py's
    reply parsers do not expect, e.g. XPENDING with a range)."""
    connection = client(server, user, password)
    connection.response_callbacks.clear()
    return connection


def role_url(server: RedisServer, role: str) -> str:
    return f"redis://{role}:{example_password(role)}@127.0.0.1:{server.port}/0"


@pytest.fixture
def admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    """Admin connection; the data set every table test starts from."""
    connection = client(acl_server, *ADMIN)
    connection.flushall()
    connection.xadd("email.receive", {"data": b"received"})
    connection.xgroup_create("email.receive", "app", id="0")
    connection.xadd("email.send", {"data": b"to-send"})
    connection.xgroup_create("email.send", "delivery", id="0")
    connection.xadd("email.send.dead", {"data": b"dead", "reason": "invalid"})
    connection.xadd("email.send.events", {"event": "delivered"})
    connection.zadd("mailpool:retry", {"1-0": 1.0})
    connection.hset("mailpool:sent:m1", "a@example.org", "1")
    connection.set("unrelated:secret", "not for mailpool")
    try:
        yield connection
    finally:
        connection.close()


def test_default_user_is_off(acl_server: RedisServer, admin: redis.Redis) -> None:
    # retry=None: recent redis-py retries authentication failures with back-off.
    anonymous = redis.Redis(host="127.0.0.1", port=acl_server.port, socket_timeout=5, retry=None)
    with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
        anonymous.ping()
    wrong = redis.Redis(
        host="127.0.0.1", port=acl_server.port, username="ingest", password="wrong", retry=None
    )
    with pytest.raises(AuthenticationError):
        wrong.ping()
    anonymous.close()
    wrong.close()


# Commands every role is refused: server administration and other keys.
EVERYONE_REFUSED: list[tuple[Any, ...]] = [
    ("FLUSHALL",),
    ("CONFIG", "GET", "maxmemory"),
    ("KEYS", "*"),
    ("ACL", "LIST"),
    ("GET", "unrelated:secret"),
    ("DEL", "unrelated:secret"),
    ("CLIENT", "LIST"),
    ("SCRIPT", "FLUSH"),
    ("BGSAVE",),
]

ALLOWED: dict[str, list[tuple[Any, ...]]] = {
    "ingest": [
        ("PING",),
        ("XADD", "email.receive", "*", "data", "x"),
        ("WAIT", "0", "10"),
    ],
    "producer": [("PING",), ("XADD", "email.send", "*", "data", "x")],
    "delivery": [
        ("PING",),
        ("XGROUP", "CREATE", "email.send", "delivery", "0", "MKSTREAM"),  # BUSYGROUP is fine
        ("XREADGROUP", "GROUP", "delivery", "w1", "COUNT", "10", "STREAMS", "email.send", ">"),
        ("XPENDING", "email.send", "delivery", "-", "+", "10"),
        ("XAUTOCLAIM", "email.send", "delivery", "w2", "0", "0-0", "COUNT", "10"),
        ("XACK", "email.send", "delivery", "0-1"),
        ("XADD", "email.send.dead", "*", "data", "x", "reason", "rejected"),
        ("XADD", "email.send.events", "MAXLEN", "~", "1000", "*", "event", "sent"),
        ("HMGET", "mailpool:sent:m1", "a@example.org"),
        ("ZRANGEBYSCORE", "mailpool:retry", "-inf", "+inf"),
        ("SCRIPT", "EXISTS", "0" * 40),
    ],
    "listener": [
        ("PING",),
        ("XGROUP", "CREATE", "email.receive", "app2", "0", "MKSTREAM"),
        ("XREADGROUP", "GROUP", "app", "l1", "COUNT", "10", "STREAMS", "email.receive", ">"),
        ("XPENDING", "email.receive", "app", "-", "+", "10"),
        ("XAUTOCLAIM", "email.receive", "app", "l2", "0", "0-0"),
        ("XACK", "email.receive", "app", "0-1"),
    ],
    "monitor": [
        ("PING",),
        ("INFO", "memory"),
        ("SCAN", "0", "COUNT", "100"),
        ("TYPE", "email.send"),
        ("XINFO", "STREAM", "email.send"),
        ("XINFO", "GROUPS", "email.receive"),
        ("XINFO", "CONSUMERS", "email.send", "delivery"),
        ("XLEN", "email.send.dead"),
        ("XPENDING", "email.send", "delivery"),
        ("XRANGE", "email.send.dead", "-", "+", "COUNT", "10"),
        ("XREVRANGE", "email.send.events", "+", "-", "COUNT", "10"),
        ("ZCARD", "mailpool:retry"),
        ("ZRANGE", "mailpool:retry", "0", "0", "WITHSCORES"),
    ],
    "housekeeping": [
        ("PING",),
        ("TYPE", "email.receive"),
        ("XINFO", "GROUPS", "email.send"),
        ("XINFO", "CONSUMERS", "email.send", "delivery"),
        ("XLEN", "email.send.dead"),
        ("XRANGE", "email.send", "-", "+", "COUNT", "10"),
        ("XPENDING", "email.receive", "app"),
        ("XTRIM", "email.receive", "MINID", "0"),
        ("XTRIM", "email.send", "MAXLEN", "1000"),
        ("XGROUP", "DELCONSUMER", "email.send", "delivery", "gone"),
        ("ZCARD", "mailpool:retry"),
        ("ZRANGE", "mailpool:retry", "0", "0", "WITHSCORES"),
    ],
    "operator": [
        ("XRANGE", "email.send.dead", "-", "+"),
        ("XREVRANGE", "email.send.dead", "+", "-", "COUNT", "1"),
        ("XLEN", "email.send.dead"),
        ("XINFO", "GROUPS", "email.send"),
        ("XDEL", "email.send.dead", "0-1"),
        ("XTRIM", "email.send.dead", "MINID", "0"),
        ("XADD", "email.send", "*", "data", "x"),
    ],
    "keda": [
        ("PING",),
        ("XINFO", "GROUPS", "email.send"),
        ("XPENDING", "email.send", "delivery"),
        ("XLEN", "email.send"),
    ],
}

REFUSED: dict[str, list[tuple[Any, ...]]] = {
    "ingest": [
        ("XADD", "email.send", "*", "data", "x"),
        ("XRANGE", "email.receive", "-", "+"),
        ("XLEN", "email.receive"),
        ("XINFO", "STREAM", "email.receive"),
        ("XREADGROUP", "GROUP", "app", "i", "STREAMS", "email.receive", ">"),
        ("XTRIM", "email.receive", "MAXLEN", "0"),
        ("XDEL", "email.receive", "0-1"),
        ("DEL", "email.receive"),
        ("SCAN", "0"),
    ],
    "producer": [
        ("XADD", "email.receive", "*", "data", "x"),
        ("XADD", "email.send.dead", "*", "data", "x"),
        ("XRANGE", "email.send", "-", "+"),
        ("XLEN", "email.send"),
        ("XREADGROUP", "GROUP", "delivery", "p", "STREAMS", "email.send", ">"),
        ("XTRIM", "email.send", "MAXLEN", "0"),
        ("DEL", "email.send"),
    ],
    "delivery": [
        ("XADD", "email.receive", "*", "data", "x"),
        ("XREADGROUP", "GROUP", "app", "d", "STREAMS", "email.receive", ">"),
        ("XRANGE", "email.receive", "-", "+"),
        ("XTRIM", "email.send", "MAXLEN", "0"),
        ("XTRIM", "email.send.dead", "MAXLEN", "0"),
        ("XDEL", "email.send.dead", "0-1"),
        ("XGROUP", "DESTROY", "email.send", "delivery"),
        ("EVAL", "return 1", "0"),  # only the registered scripts, by sha
        ("SET", "mailpool:x", "1"),
        ("DEL", "email.send.dead"),
        ("DEL", "email.send"),
        ("XRANGE", "email.send.dead", "-", "+"),
    ],
    "listener": [
        ("XADD", "email.receive", "*", "data", "x"),
        ("XADD", "email.send", "*", "data", "x"),
        ("XREADGROUP", "GROUP", "delivery", "l", "STREAMS", "email.send", ">"),
        ("XRANGE", "email.send", "-", "+"),
        ("XTRIM", "email.receive", "MAXLEN", "0"),
        ("XGROUP", "DESTROY", "email.receive", "app"),
        ("XDEL", "email.receive", "0-1"),
    ],
    "monitor": [
        ("XADD", "email.send", "*", "data", "x"),
        ("XREADGROUP", "GROUP", "delivery", "m", "STREAMS", "email.send", ">"),
        ("XACK", "email.send", "delivery", "0-1"),
        ("XTRIM", "email.send", "MAXLEN", "0"),
        ("XGROUP", "CREATE", "email.send", "spy", "0"),
        ("DEL", "email.send.dead"),
        ("ZADD", "mailpool:retry", "1", "x"),
        ("SET", "mailpool:x", "1"),
        ("CONFIG", "SET", "maxmemory", "1"),
    ],
    "housekeeping": [
        ("XTRIM", "email.send.dead", "MAXLEN", "0"),  # dead letters stay until purged
        ("XTRIM", "email.send.events", "MAXLEN", "0"),
        ("XDEL", "email.send", "0-1"),
        ("XADD", "email.receive", "*", "data", "x"),
        ("XADD", "email.send.dead", "*", "data", "x"),
        ("XREADGROUP", "GROUP", "delivery", "h", "STREAMS", "email.send", ">"),
        ("XGROUP", "DESTROY", "email.send", "delivery"),
        ("XGROUP", "DELCONSUMER", "email.send.dead", "g", "c"),
        ("DEL", "email.send"),
        ("ZADD", "mailpool:retry", "1", "x"),
        ("HGETALL", "mailpool:sent:m1"),
    ],
    "operator": [
        ("XTRIM", "email.send", "MAXLEN", "0"),
        ("XDEL", "email.send", "0-1"),
        ("XADD", "email.receive", "*", "data", "x"),
        ("XADD", "email.send.dead", "*", "data", "x"),
        ("DEL", "email.send.dead"),
        ("XREADGROUP", "GROUP", "delivery", "o", "STREAMS", "email.send", ">"),
        ("XGROUP", "DESTROY", "email.send", "delivery"),
        ("ZADD", "mailpool:retry", "1", "x"),
    ],
    "keda": [
        ("XRANGE", "email.send", "-", "+"),  # no message content
        ("XINFO", "STREAM", "email.send"),  # shows first and last entries
        ("XINFO", "GROUPS", "email.receive"),
        ("XREADGROUP", "GROUP", "delivery", "k", "STREAMS", "email.send", ">"),
        ("XADD", "email.send", "*", "data", "x"),
    ],
}


@pytest.mark.parametrize("role", ROLES)
def test_role_may_run_its_commands(acl_server: RedisServer, admin: redis.Redis, role: str) -> None:
    connection = raw_client(acl_server, role, example_password(role))
    try:
        for command in ALLOWED[role]:
            try:
                connection.execute_command(*command)
            except NoPermissionError as exc:
                pytest.fail(f"{role} refused {command}: {exc}")
            except ResponseError as exc:
                assert "BUSYGROUP" in str(exc), f"{role} {command}: {exc}"
    finally:
        connection.close()


@pytest.mark.parametrize("role", ROLES)
def test_role_is_refused_everything_else(
    acl_server: RedisServer, admin: redis.Redis, role: str
) -> None:
    connection = raw_client(acl_server, role, example_password(role))
    before = {key: admin.type(key) for key in admin.keys("*")}
    lengths = {k: admin.xlen(k) for k, t in before.items() if t == b"stream"}
    try:
        for command in REFUSED[role] + EVERYONE_REFUSED:
            with pytest.raises(NoPermissionError):
                connection.execute_command(*command)
                pytest.fail(f"{role} may run {command}")
    finally:
        connection.close()
    # Nothing the refused commands aimed at changed.
    assert {key: admin.type(key) for key in admin.keys("*")} == before
    assert {k: admin.xlen(k) for k in lengths} == lengths


# ---------------------------------------------------------------------------------------
# The roles' own code, run as their ACL user


@pytest.fixture
async def as_role(acl_server: RedisServer, admin: redis.Redis) -> AsyncIterator[Any]:
    opened: list[aioredis.Redis] = []

    def open_as(role: str) -> aioredis.Redis:
        connection = aioredis.Redis.from_url(role_url(acl_server, role))
        opened.append(connection)
        return connection

    yield open_as
    for connection in opened:
        await connection.aclose()


async def test_producer_enqueues_a_send(as_role: Any, admin: redis.Redis) -> None:
    from workers import producer

    entry_id = await producer.enqueue_send(
        as_role("producer"), from_="a@example.org", to="b@example.org", subject="hi", text="x"
    )
    assert admin.xrange("email.send", entry_id, entry_id)


async def test_listener_reads_claims_releases_and_acks(as_role: Any, admin: redis.Redis) -> None:
    listener = as_role("listener")
    admin.xadd("email.receive", {"data": b"second"})
    first = GroupConsumer(listener, "email.receive", "app3", "l1", claim_after=0.001, batch=1)
    assert await first.ensure_group() is True  # XGROUP CREATE ... MKSTREAM
    (entry,) = await first.read()  # XREADGROUP 0 (own pending), then >
    assert entry.data == b"received"
    await asyncio.sleep(0.01)
    second = GroupConsumer(listener, "email.receive", "app3", "l2", claim_after=0.001, batch=10)
    claimed = await second.claim_stale()  # XAUTOCLAIM + XPENDING per entry
    assert [(c.id, c.deliveries) for c in claimed] == [(entry.id, 2)]
    # Listener.release_unread hands entries back with XCLAIM JUSTID IDLE.
    await listener.xclaim(
        "email.receive", "app3", "l1", min_idle_time=0, message_ids=[entry.id], justid=True
    )
    assert await second.ack(entry.id) == 1


async def test_ingest_accepts_mail_as_its_user(acl_server: RedisServer, admin: redis.Redis) -> None:
    from workers import ingest
    from workers.config import IngestConfig

    config = IngestConfig(redis_url=role_url(acl_server, "ingest"), listen="127.0.0.1:0")
    config.validate()
    async with ingest.running_ingest(config) as server:
        reply = await asyncio.to_thread(_send_one, server.port)
    assert reply[0] == 250, reply
    assert admin.xlen("email.receive") == 2


def _send_one(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        smtp.mail("a@example.org")
        smtp.rcpt("b@example.org")
        return smtp.data(b"Subject: acl\r\n\r\nhello\r\n")


async def test_delivery_settles_retries_and_promotes(as_role: Any, admin: redis.Redis) -> None:
    from workers.streams.outcomes import OutcomeKeys, Outcomes, Retry, Settlement

    delivery = as_role("delivery")
    keys = OutcomeKeys.from_stream_keys(StreamKeys())
    outcomes = Outcomes(delivery, keys, group="delivery", sent_ttl=60, events_maxlen=1000)
    reader = GroupConsumer(delivery, "email.send", "delivery", "w1", claim_after=900)
    assert await reader.ensure_group() is False  # exists already: BUSYGROUP
    (entry,) = await reader.read()
    settled = Settlement(
        entry_id=entry.id,
        message_id="m2",
        accepted=["a@example.org"],
        retry=Retry(due=time.time() - 1, fields={"data": b"to-send", "attempts": 1}),
        events=[{"event": "deferred"}],
    )
    assert await outcomes.settle([settled], now=time.time()) == [True]  # EVALSHA after load
    assert await outcomes.already_sent([("m2", ["a@example.org", "b@example.org"])]) == [
        {"a@example.org"}
    ]
    # Due: our retry and the fixture's schedule member "1-0" (no payload: dropped).
    assert await outcomes.promote_due(time.time()) == 2
    assert admin.xlen("email.send") == 2 and admin.zcard("mailpool:retry") == 0
    assert admin.xlen("email.send.events") == 2


async def test_housekeeping_trims_promotes_and_reports(as_role: Any, admin: redis.Redis) -> None:
    from workers.housekeeping import HousekeepConfig, housekeep_once
    from workers.status import collect_status

    housekeeping = as_role("housekeeping")
    admin.xack("email.send", "delivery", *[e[0] for e in admin.xrange("email.send")])
    admin.xreadgroup("delivery", "w1", {"email.send": ">"})
    admin.xreadgroup("app", "a1", {"email.receive": ">"})
    admin.xack("email.receive", "app", *[e[0] for e in admin.xrange("email.receive")])
    config = HousekeepConfig(receive_max_len=1, send_max_len=1, consumer_idle=0.001)
    admin.hset("mailpool:retry:1-0", mapping={"data": b"again"})  # the fixture's due retry
    status = await collect_status(housekeeping, StreamKeys())  # its /metrics gauges
    assert status["dead_letters"] == 1 and status["retries_waiting"] == 1
    await asyncio.sleep(0.01)
    await housekeep_once(housekeeping, StreamKeys(), config)
    assert admin.zcard("mailpool:retry") == 0  # due retries back to email.send
    assert [e[1] for e in admin.xrange("email.send")][-1] == {b"data": b"again"}
    assert admin.xlen("email.send.dead") == 1  # never trimmed


async def test_monitor_reads_the_status(as_role: Any, admin: redis.Redis) -> None:
    from workers.status import collect_status

    status = await collect_status(as_role("monitor"), StreamKeys())
    assert status["streams"]["email.send"]["groups"]["delivery"]["lag"] == 1
    assert status["dead_letters"] == 1 and status["retries_waiting"] == 1


async def test_keda_reads_the_lag_it_scales_on(as_role: Any, admin: redis.Redis) -> None:
    keda = as_role("keda")
    groups = await keda.xinfo_groups("email.send")  # what the lag trigger reads
    assert [(g["name"], g["lag"]) for g in groups] == [(b"delivery", 1)]
    assert (await keda.xpending("email.send", "delivery"))["pending"] == 0


async def test_delivery_worker_runs_as_its_user(
    acl_server: RedisServer, admin: redis.Redis, tmp_path: Path
) -> None:
    """The whole delivery role (group, read, send, settle, dead letter, events) as `delivery`."""
    import msgpack

    from workers import delivery
    from workers.config import DeliveryConfig

    admin.delete("email.send")  # the fixture's entry is not a send message
    admin.xgroup_create("email.send", "delivery", id="0", mkstream=True)
    message = {
        "from": "app@example.org",
        "to": ["ann@example.org"],
        "headers": {"from": "app@example.org", "to": "ann@example.org", "subject": "acl"},
        "content": {"content-type": "text/plain; charset=utf-8", "body": b"hello\n"},
    }
    admin.xadd("email.send", {"data": msgpack.packb(message, use_bin_type=True)})
    admin.xadd("email.send", {"data": b"\xc1 not msgpack"})
    maildir = tmp_path / "maildir"
    config = DeliveryConfig(
        redis_url=role_url(acl_server, "delivery"), relay=f"maildir:{maildir}", consumer="w1"
    )
    config.validate()
    stop = asyncio.Event()
    task = asyncio.create_task(delivery.serve(config, stop))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not task.done():
            delivered = list(maildir.glob("new/*"))
            settled = admin.xpending("email.send", "delivery")["pending"] == 0
            if delivered and settled and admin.xlen("email.send.dead") == 2:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)  # re-raises what the worker died of
    assert len(list(maildir.glob("new/*"))) == 1
    assert admin.xinfo_groups("email.send")[0]["lag"] == 0
    assert admin.xpending("email.send", "delivery")["pending"] == 0
    (dead,) = admin.xrevrange("email.send.dead", count=1)
    assert dead[1][b"reason"] == b"invalid"
    assert admin.xlen("email.send.events") >= 2


async def test_operator_lists_replays_and_purges_dead_letters(
    as_role: Any, admin: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers import deadletters

    operator = as_role("operator")
    keys = StreamKeys()
    rejected = admin.xadd("email.send.dead", {"data": b"d2", "reason": "rejected"}).decode()
    purged = admin.xadd("email.send.dead", {"data": b"d3", "reason": "expired"}).decode()

    def config(action: str, *ids: str) -> Any:
        return deadletters.DeadConfig(_action=action, _ids=list(ids))

    assert await deadletters.list_dead(operator, keys, config("list")) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert await deadletters.replay_dead(operator, keys, config("replay", rejected)) == 0
    assert await deadletters.purge_dead(operator, keys, config("purge", purged)) == 0
    assert admin.xlen("email.send.dead") == 1 and admin.xlen("email.send") == 2


async def test_housekeeping_pass_promotes_due_retries(as_role: Any, admin: redis.Redis) -> None:
    """Delivery scales to zero when nothing is lagging or pending, so a retry waiting in the
    schedule would wait for the next new send: the always-on housekeeping pass moves due
    retries back to email.send (lag > 0 wakes delivery through KEDA)."""
    from workers.housekeeping import HousekeepConfig, housekeep_once

    admin.hset("mailpool:retry:1-0", mapping={"data": b"again", "attempts": "1"})
    before = admin.xlen("email.send")
    await housekeep_once(as_role("housekeeping"), StreamKeys(), HousekeepConfig())
    assert admin.zcard("mailpool:retry") == 0, "due retry not promoted by housekeeping"
    assert admin.xlen("email.send") == before + 1
