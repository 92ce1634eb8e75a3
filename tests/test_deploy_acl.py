"""deploy/redis/users.acl against a real redis-server: each role can do its job, nothing more.

The server loads a copy of the ACL file (plus a test-only admin user for set-up); every
role connects with its documented example password, and the Redis functions library is
loaded by ``mailpool redis-setup`` as the ``setup`` user.  Three kinds of checks: a table of
raw commands per role (allowed ones work, the rest get NOPERM); the attacks a compromised
role would try, each refused or listed in deploy/README.md as what that role can still do
(and shown to work, so the list stays true); and the roles' own code paths (producer,
listener, ingest, delivery outcomes, status, housekeeping, dead replay) run as their user.
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from tests.harness import RedisServer, child_env
from workers.config import ConfigError
from workers.streams import functions
from workers.streams.consumer import GroupConsumer
from workers.streams.layout import StreamKeys

REPO = Path(__file__).resolve().parent.parent
ACL_FILE = REPO / "deploy" / "redis" / "users.acl"
DEPLOY_README = REPO / "deploy" / "README.md"
BASE = REPO / "deploy" / "base"
# One listener user per application; the file ships two examples.
LISTENERS = ("listener-app1", "listener-app2")
ROLES = (
    "setup", "ingest", "producer", "delivery", *LISTENERS, "monitor", "housekeeping", "keda",
    "operator",
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


# Rules that let a user run Lua of its own choosing (a `while true do end` blocks Redis).
RUNS_ANY_CODE = {"+eval", "+eval_ro", "+evalsha", "+evalsha_ro", "+script", "+script|load",
                 "+@scripting", "+function", "+function|load", "+function|restore"}  # fmt: skip


def test_only_setup_may_load_code_and_roles_call_functions_only() -> None:
    for role, rules in acl_rules().items():
        words = {w.strip("()") for w in rules}
        loads = words & RUNS_ANY_CODE
        if role == "setup":
            assert loads == {"+function|load"}, f"setup: {loads}"
        else:
            assert not loads, f"{role} may run code of its own: {loads}"


def test_one_listener_user_per_application_with_the_same_rights() -> None:
    users = acl_rules()
    rights = {name: [r for r in users[name] if not r.startswith("#")] for name in LISTENERS}
    assert len(set(map(tuple, rights.values()))) == 1, rights


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

    from tests.test_deploy_render import all_containers, mounted_secret_files

    secret = yaml.safe_load((BASE / "secret.yaml").read_text())["stringData"]
    docs = [d for path in BASE.glob("*.yaml") for d in yaml.safe_load_all(path.read_text()) if d]
    rules = acl_rules()
    users = []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in all_containers(doc["spec"]["template"]["spec"]):
            env = container["env"]
            user = next(v["value"] for v in env if v["name"] == "REDIS_USERNAME")
            # The password is the file of the mounted Secret that the container reads.
            path = next(v["value"] for v in env if v["name"] == "MAILPOOL_REDIS_PASSWORD_FILE")
            password = mounted_secret_files(docs, container)[path]
            digest = hashlib.sha256(password.encode()).hexdigest()
            assert f"#{digest}" in rules[user], f"{container['name']}: {path} is not {user}'s"
            users.append(user)
    assert sorted(users) == ["delivery", "housekeeping", "ingest", "setup"]
    setup_digest = hashlib.sha256(secret["redis-setup-password"].encode()).hexdigest()
    assert f"#{setup_digest}" in rules["setup"]
    keda_digest = hashlib.sha256(secret["redis-keda-password"].encode()).hexdigest()
    assert f"#{keda_digest}" in rules[secret["redis-keda-username"]]


def test_functions_are_loaded_by_a_hardened_init_container_of_housekeeping() -> None:
    """Only the housekeeping pod carries the setup password, in an init container that runs
    `mailpool redis-setup` and is hardened like every other container."""
    import yaml

    (deployment,) = [d for d in yaml.safe_load_all((BASE / "housekeeping.yaml").read_text())
                     if d and d["kind"] == "Deployment"]  # fmt: skip
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["mailpool", "redis-setup"]
    assert init["image"] == pod["containers"][0]["image"]
    security = init["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= init["resources"]["limits"].keys()
    others = [p for p in BASE.glob("*.yaml") if p.name not in {"housekeeping.yaml", "secret.yaml"}]
    assert not [p.name for p in others if "redis-setup-password" in p.read_text()]


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
        setup = run_mailpool(server, "setup", "redis-setup")
        assert setup.returncode == 0, setup.stderr
        assert setup.stdout == f"{functions.LIBRARY} loaded (digest {functions.DIGEST})\n"
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


def run_mailpool(server: RedisServer, role: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``mailpool ARGS`` in a process of its own, as ``role`` (URL in the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=child_env(MAILPOOL_REDIS_URL=role_url(server, role)),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


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


# Lua that never ends: run once, Redis answers BUSY to every client until it is killed.
BUSY_LOOP = "while true do end"
BUSY_LIBRARY = "#!lua name=busy\nredis.register_function('busy', function() " + BUSY_LOOP + " end)"
BUSY_SHA = hashlib.sha1(BUSY_LOOP.encode()).hexdigest()  # Redis's id of that script

# Commands every role is refused: server administration, other keys, and any way to run
# code of its own (scripts, or replacing the functions library the other roles call).
EVERYONE_REFUSED: list[tuple[Any, ...]] = [
    ("FLUSHALL",),
    ("CONFIG", "GET", "maxmemory"),
    ("CONFIG", "SET", "busy-reply-threshold", "1"),
    ("KEYS", "*"),
    ("ACL", "LIST"),
    ("GET", "unrelated:secret"),
    ("DEL", "unrelated:secret"),
    ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("BGSAVE",),
    ("EVAL", BUSY_LOOP, "0"),
    ("EVAL_RO", BUSY_LOOP, "0"),
    ("SCRIPT", "LOAD", BUSY_LOOP),
    ("EVALSHA", BUSY_SHA, "0"),
    ("EVALSHA_RO", BUSY_SHA, "0"),
    ("SCRIPT", "EXISTS", BUSY_SHA),
    ("SCRIPT", "FLUSH"),
    ("SCRIPT", "KILL"),
    ("FUNCTION", "DELETE", functions.LIBRARY),
    ("FUNCTION", "FLUSH"),
    ("FUNCTION", "KILL"),
    ("FUNCTION", "DUMP"),
    ("FUNCTION", "RESTORE", b"\x00", "REPLACE"),
]
# ... and every role but `setup`, whose job it is, is refused loading functions.
LOADING = [("FUNCTION", "LOAD", "REPLACE", BUSY_LIBRARY), ("FUNCTION", "LIST")]
VERSION_CALL = ("FCALL", functions.VERSION, "0")
# NOPERM for a command; inside a function, the ACL error of the command it ran.
REFUSAL = r"(?i)no permissions|can't run this command|can't access"
PROMOTE_CALL = ("FCALL", functions.PROMOTE, "2", "mailpool:retry", "email.send", "0", "1", "x")

LISTENER_ALLOWED: list[tuple[Any, ...]] = [
    ("PING",),
    ("XGROUP", "CREATE", "email.receive", "app2", "0", "MKSTREAM"),
    ("XREADGROUP", "GROUP", "app", "l1", "COUNT", "10", "STREAMS", "email.receive", ">"),
    ("XPENDING", "email.receive", "app", "-", "+", "10"),
    ("XAUTOCLAIM", "email.receive", "app", "l2", "0", "0-0"),
    ("XACK", "email.receive", "app", "0-1"),
    ("XGROUP", "DELCONSUMER", "email.receive", "app", "gone"),  # listen's clean exit (FCALL)
    VERSION_CALL,
]
LISTENER_REFUSED: list[tuple[Any, ...]] = [
    ("XADD", "email.receive", "*", "data", "x"),
    ("XADD", "email.send", "*", "data", "x"),
    ("XREADGROUP", "GROUP", "delivery", "l", "STREAMS", "email.send", ">"),
    ("XRANGE", "email.send", "-", "+"),
    ("XTRIM", "email.receive", "MAXLEN", "0"),
    ("XGROUP", "DESTROY", "email.receive", "app"),
    ("XDEL", "email.receive", "0-1"),
    ("FCALL", functions.REPLAY, "2", "email.receive", "email.send", "0-1", "data", "x"),
    ("FCALL", functions.REMOVE_IDLE_CONSUMER, "1", "email.send", "delivery", "w1"),
]

ALLOWED: dict[str, list[tuple[Any, ...]]] = {
    "setup": [
        ("PING",),
        ("FUNCTION", "LIST", "LIBRARYNAME", "mailpool_v*"),
        ("FUNCTION", "LOAD", "REPLACE", functions.LIBRARY_CODE),
        VERSION_CALL,
    ],
    "ingest": [
        ("PING",),
        ("XADD", "email.receive", "*", "data", "x"),
        ("WAIT", "0", "10"),
    ],
    "producer": [("PING",), ("XADD", "email.send", "*", "data", "x")],
    "delivery": [
        ("PING",),
        ("WAIT", "0", "10"),  # --min-replicas
        ("XGROUP", "CREATE", "email.send", "delivery", "0", "MKSTREAM"),  # BUSYGROUP is fine
        ("XREADGROUP", "GROUP", "delivery", "w1", "COUNT", "10", "STREAMS", "email.send", ">"),
        ("XPENDING", "email.send", "delivery", "-", "+", "10"),
        ("XAUTOCLAIM", "email.send", "delivery", "w2", "0", "0-0", "COUNT", "10"),
        ("XCLAIM", "email.send", "delivery", "w1", "0", "0-1", "IDLE", "2592000000", "JUSTID"),
        ("XACK", "email.send", "delivery", "0-1"),
        ("MULTI",),  # a plain delivery's first settlement is a transaction
        ("EXEC",),
        ("MULTI",),
        ("DISCARD",),
        ("XADD", "email.send.dead", "*", "data", "x", "reason", "rejected"),
        ("XADD", "email.send.events", "MAXLEN", "~", "1000", "*", "event", "sent"),
        ("HMGET", "mailpool:sent:m1", "a@example.org"),
        ("HSETNX", "mailpool:sent:m1", "a@example.org", "2"),
        ("ZRANGEBYSCORE", "mailpool:retry", "-inf", "+inf"),
        ("ZMSCORE", "mailpool:suppressed", "a@example.org"),  # the suppression look-up
        ("GET", "mailpool:suppressed:version"),  # its copy of the list, refreshed
        ("ZCARD", "mailpool:suppressed"),
        ("INCR", "mailpool:suppressed:version"),
        ("ZADD", "mailpool:suppressed", "GT", "1", "a@example.org"),
        ("HSET", "mailpool:suppressed:why", "a@example.org", "{}"),
        VERSION_CALL,
        PROMOTE_CALL,
    ],
    **{name: LISTENER_ALLOWED for name in LISTENERS},
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
        ("FCALL", functions.REMOVE_IDLE_CONSUMER, "1", "email.receive", "app", "gone"),
        ("ZCARD", "mailpool:retry"),
        ("ZRANGE", "mailpool:retry", "0", "0", "WITHSCORES"),
        ("ZRANGEBYSCORE", "mailpool:suppressed", "-inf", "1"),  # expired suppressions
        ("ZREMRANGEBYSCORE", "mailpool:suppressed", "-inf", "1"),
        ("HDEL", "mailpool:suppressed:why", "a@b.c"),
        # the bounce reader: its group on email.receive, the send records, events, suppression
        ("XGROUP", "CREATE", "email.receive", "mailpool-bounces", "$", "MKSTREAM"),
        (
            "XREADGROUP",
            "GROUP",
            "mailpool-bounces",
            "h",
            "COUNT",
            "10",
            "STREAMS",
            "email.receive",
            ">",
        ),
        ("XACK", "email.receive", "mailpool-bounces", "0-1"),
        ("HKEYS", "mailpool:sent:order-7"),
        ("XGROUP", "DESTROY", "email.receive", "mailpool-bounces"),  # --no-read-bounces
        ("XADD", "email.send.events", "MAXLEN", "~", "1000", "*", "event", "bounced"),
        ("ZADD", "mailpool:suppressed", "GT", "1", "a@b.c"),
        ("HSET", "mailpool:suppressed:why", "a@b.c", "{}"),
        VERSION_CALL,
    ],
    "operator": [
        ("XRANGE", "email.send.dead", "-", "+"),
        ("XREVRANGE", "email.send.dead", "+", "-", "COUNT", "1"),
        ("XLEN", "email.send.dead"),
        ("XINFO", "GROUPS", "email.send"),
        ("XDEL", "email.send.dead", "0-1"),
        ("XTRIM", "email.send.dead", "MINID", "0"),
        ("XADD", "email.send", "*", "data", "x"),
        ("ZADD", "mailpool:suppressed", "1", "a@b.c"),  # mailpool suppress add/remove/list
        ("HSET", "mailpool:suppressed:why", "a@b.c", "{}"),
        ("ZRANGEBYSCORE", "mailpool:suppressed", "0", "+inf", "WITHSCORES"),
        ("HMGET", "mailpool:suppressed:why", "a@b.c"),
        ("ZREM", "mailpool:suppressed", "a@b.c"),
        ("HDEL", "mailpool:suppressed:why", "a@b.c"),
        ("INCR", "mailpool:suppressed:version"),
        VERSION_CALL,
    ],
    "keda": [
        ("PING",),
        ("INFO",),  # KEDA >= 2.11 reads redis_version before it trusts the lag
        ("XINFO", "GROUPS", "email.send"),
        ("XPENDING", "email.send", "delivery"),
        ("XLEN", "email.send"),
    ],
}

REFUSED: dict[str, list[tuple[Any, ...]]] = {
    "setup": [
        ("XADD", "email.receive", "*", "data", "x"),
        ("XRANGE", "email.send", "-", "+"),
        ("XLEN", "email.send.dead"),
        PROMOTE_CALL,
    ],
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
        VERSION_CALL,
    ],
    "producer": [
        ("XADD", "email.receive", "*", "data", "x"),
        ("XADD", "email.send.dead", "*", "data", "x"),
        ("XRANGE", "email.send", "-", "+"),
        ("XLEN", "email.send"),
        ("XREADGROUP", "GROUP", "delivery", "p", "STREAMS", "email.send", ">"),
        ("XTRIM", "email.send", "MAXLEN", "0"),
        ("DEL", "email.send"),
        VERSION_CALL,
    ],
    "delivery": [
        ("XADD", "email.receive", "*", "data", "x"),
        ("XREADGROUP", "GROUP", "app", "d", "STREAMS", "email.receive", ">"),
        ("XCLAIM", "email.receive", "app", "d", "0", "0-1", "JUSTID"),
        ("XRANGE", "email.receive", "-", "+"),
        ("XTRIM", "email.send", "MAXLEN", "0"),
        ("XTRIM", "email.send.dead", "MAXLEN", "0"),
        ("XDEL", "email.send.dead", "0-1"),
        ("XGROUP", "DESTROY", "email.send", "delivery"),
        ("SET", "mailpool:x", "1"),
        ("DEL", "email.send.dead"),
        ("DEL", "email.send"),
        ("XRANGE", "email.send.dead", "-", "+"),
        # a function runs with its caller's rights: no key or command beyond its own
        ("FCALL", functions.REPLAY, "2", "email.send.dead", "email.send", "0-1", "data", "x"),
        ("FCALL", functions.PROMOTE, "2", "email.receive", "email.send", "0", "1", "x"),
    ],
    **{name: LISTENER_REFUSED for name in LISTENERS},
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
        VERSION_CALL,
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
        ("HSET", "mailpool:sent:m1", "a@b.c", "1"),  # it reads send records, never writes
        ("FCALL", functions.REPLAY, "2", "email.send.dead", "email.send", "0-1", "data", "x"),
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
        ("HSET", "mailpool:sent:m1", "a@b.c", "1"),  # suppression keys only
        PROMOTE_CALL,
    ],
    "keda": [
        ("XRANGE", "email.send", "-", "+"),  # no message content
        ("XINFO", "STREAM", "email.send"),  # shows first and last entries
        ("XINFO", "GROUPS", "email.receive"),
        ("XREADGROUP", "GROUP", "delivery", "k", "STREAMS", "email.send", ">"),
        ("XADD", "email.send", "*", "data", "x"),
        ("CONFIG", "GET", "*"),
        VERSION_CALL,
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
        loading = [] if role == "setup" else LOADING
        for command in REFUSED[role] + EVERYONE_REFUSED + loading:
            with pytest.raises(ResponseError, match=REFUSAL):
                connection.execute_command(*command)
                pytest.fail(f"{role} may run {command}")
    finally:
        connection.close()
    # Nothing the refused commands aimed at changed.
    assert {key: admin.type(key) for key in admin.keys("*")} == before
    assert {k: admin.xlen(k) for k in lengths} == lengths


# ---------------------------------------------------------------------------------------
# Attacks: refused, or listed in deploy/README.md as what a compromised role can still do

# Redis 7 ACLs allow or refuse a command and its keys, never its other arguments or a
# consumer group's name.  (README label of the role, what the README row names, command.)
WIPE = ("MAXLEN", "0", "*", "data", "x")
STILL_POSSIBLE: list[tuple[str, str, str, tuple[Any, ...]]] = [
    ("ingest", "ingest", "XADD email.receive MAXLEN 0", ("XADD", "email.receive", *WIPE)),
    ("ingest", "ingest", "MINID", ("XADD", "email.receive", "MINID", "9" * 13, "*", "d", "x")),
    ("producer", "producer", "XADD email.send MAXLEN 0", ("XADD", "email.send", *WIPE)),
    ("delivery", "delivery", "XADD email.send.dead MAXLEN 0", ("XADD", "email.send.dead", *WIPE)),
    ("delivery", "delivery", "XADD email.send MAXLEN 0", ("XADD", "email.send", *WIPE)),
    ("delivery", "delivery", "`DEL mailpool:retry`", ("DEL", "mailpool:retry")),
    ("housekeeping", "housekeeping", "XTRIM email.receive MAXLEN 0",
     ("XTRIM", "email.receive", "MAXLEN", "0")),
    ("housekeeping", "housekeeping", "XADD email.send MAXLEN 0", ("XADD", "email.send", *WIPE)),
    ("operator", "operator", "XADD email.send MAXLEN 0", ("XADD", "email.send", *WIPE)),
    ("listener-app1", "listener-<application>", "XACK email.receive <other group>",
     ("XACK", "email.receive", "app", "0-1")),
    ("listener-app1", "listener-<application>", "XAUTOCLAIM",
     ("XAUTOCLAIM", "email.receive", "app", "thief", "0", "0-0")),
    ("listener-app1", "listener-<application>", "XGROUP DELCONSUMER",
     ("XGROUP", "DELCONSUMER", "email.receive", "app", "a1")),
    ("listener-app1", "listener-<application>", "XGROUP CREATE",
     ("XGROUP", "CREATE", "email.receive", "rogue", "0")),
]  # fmt: skip


def readme_rows(label: str) -> list[str]:
    """The rows of deploy/README.md's table of what a compromised role can still do."""
    text = DEPLOY_README.read_text()
    section = text.partition("### What a compromised role can still do")[2].partition("\n#")[0]
    return [line for line in section.splitlines() if line.startswith(f"| `{label}` |")]


@pytest.mark.parametrize(
    ("role", "label", "documented", "command"), STILL_POSSIBLE, ids=lambda v: str(v)[:24]
)
def test_what_a_compromised_role_can_still_do_works_and_is_documented(
    acl_server: RedisServer, admin: redis.Redis, role: str, label: str, documented: str,
    command: tuple[Any, ...],
) -> None:  # fmt: skip
    rows = readme_rows(label)
    assert rows, f"deploy/README.md has no row for `{label}`"
    assert any(documented in row for row in rows), f"`{label}` row does not name {documented}"
    admin.xreadgroup("app", "a1", {"email.receive": ">"})  # something pending in `app`
    connection = raw_client(acl_server, role, example_password(role))
    try:
        connection.execute_command(*command)  # no NoPermissionError: the limit is real
    finally:
        connection.close()


def entries_lost(admin: redis.Redis, stream: str) -> list[str]:
    """deploy/README.md's check: the groups of ``stream`` that lost entries they still needed.

    Housekeeping trims only below every group's oldest pending and first unread entry, so
    a group whose oldest pending entry has no content any more, or whose lag (Redis counts
    it from entries added and read; trims do not change it) exceeds the entries after its
    last-delivered id, lost entries to someone else's trim.
    """
    lost = []
    for group in admin.xinfo_groups(stream):
        name = group["name"].decode()
        oldest = admin.xpending(stream, name)["min"]
        pending_gone = oldest is not None and not admin.xrange(stream, oldest, oldest)
        after = admin.xrange(stream, b"(" + group["last-delivered-id"], "+")
        unread_gone = group["lag"] is not None and int(group["lag"]) > len(after)
        if pending_gone or unread_gone:
            lost.append(name)
    return lost


async def test_the_documented_check_tells_a_wipe_from_retention(
    acl_server: RedisServer, admin: redis.Redis
) -> None:
    """Housekeeping's trims never raise the alarm; ingest's MAXLEN 0 does."""
    from workers.housekeeping import trim_stream

    for n in range(5):
        admin.xadd("email.receive", {"data": f"m{n}".encode()})
    admin.xreadgroup("app", "a1", {"email.receive": ">"}, count=3)  # 3 pending, 3 unread
    admin.xack("email.receive", "app", admin.xrange("email.receive", count=1)[0][0])
    housekeeping = aioredis.Redis.from_url(role_url(acl_server, "housekeeping"))
    try:
        assert await trim_stream(housekeeping, "email.receive", max_age=0, max_len=1) == 1
    finally:
        await housekeeping.aclose()
    assert entries_lost(admin, "email.receive") == []
    ingest = raw_client(acl_server, "ingest", example_password("ingest"))
    try:
        ingest.execute_command("XADD", "email.receive", *WIPE)
    finally:
        ingest.close()
    assert admin.xlen("email.receive") == 0  # every application's mail is gone
    assert entries_lost(admin, "email.receive") == ["app"]


@pytest.mark.parametrize("role", ["delivery", "housekeeping", "operator", *LISTENERS])
def test_no_role_can_make_redis_busy(
    acl_server: RedisServer, admin: redis.Redis, role: str
) -> None:
    """SCRIPT LOAD + EVALSHA (or EVAL, or a function of its own) of a loop that never ends
    would make Redis answer BUSY to everyone: the roles that call functions may not."""
    connection = raw_client(acl_server, role, example_password(role))
    try:
        for attempt in [("SCRIPT", "LOAD", BUSY_LOOP), ("EVALSHA", BUSY_SHA, "0"),
                        ("EVAL", BUSY_LOOP, "0"), ("FUNCTION", "LOAD", BUSY_LIBRARY)]:  # fmt: skip
            with pytest.raises(NoPermissionError):
                connection.execute_command(*attempt)
        with pytest.raises(ResponseError, match="Function not found"):
            connection.execute_command("FCALL", "busy", "0")
    finally:
        connection.close()
    assert admin.ping()


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
    listener = as_role("listener-app1")
    admin.xadd("email.receive", {"data": b"second"})
    first = GroupConsumer(listener, "email.receive", "app3", "l1", claim_after=0.001, batch=1)
    assert await first.ensure_group() is True  # XGROUP CREATE ... MKSTREAM
    (entry,) = await first.read()  # XREADGROUP 0 (own pending), then >
    assert entry.data == b"received"
    await asyncio.sleep(0.01)
    second = GroupConsumer(listener, "email.receive", "app3", "l2", claim_after=0.001, batch=10)
    claimed = await second.claim_stale()  # XAUTOCLAIM + XPENDING per entry
    assert [(c.id, c.deliveries) for c in claimed] == [(entry.id, 2)]
    # Listener.release_unread hands entries back with XCLAIM ... IDLE JUSTID.
    assert await first.release([entry]) == 1
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
    from workers.streams.outcomes import Outcomes, Retry, SentLookup, Settlement

    delivery = as_role("delivery")
    keys = StreamKeys()
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
    assert await outcomes.already_sent([SentLookup("m2", ["a@example.org", "b@example.org"])]) == [
        {"a@example.org"}
    ]
    # Due: our retry and the fixture's schedule member "1-0" (no payload: dropped).
    assert await outcomes.promote_due(time.time()) == 2
    assert admin.xlen("email.send") == 2 and admin.zcard("mailpool:retry") == 0
    assert admin.xlen("email.send.events") == 2


async def test_delivery_settles_a_plain_delivery_as_a_transaction(
    as_role: Any, admin: redis.Redis
) -> None:
    """The first run of a delivered-only settlement is MULTI/EXEC: the user may run it, and
    the worker's start-up check finds it may."""
    from workers.streams.outcomes import Outcomes, Settlement

    delivery = as_role("delivery")
    outcomes = Outcomes(delivery, StreamKeys(), group="delivery", sent_ttl=60, events_maxlen=1000)
    await outcomes.check_transactions()
    assert outcomes.transactions
    admin.xadd("email.send", {"data": b"plain"})
    reader = GroupConsumer(delivery, "email.send", "delivery", "w3", claim_after=900)
    (entry,) = [e for e in await reader.read() if e.data == b"plain"]
    events = admin.xlen("email.send.events")
    settled = Settlement(entry_id=entry.id, message_id="m3", accepted=["a@example.org"],
                         events=[{"event": "delivered"}])  # fmt: skip
    try:
        assert await outcomes.settle([settled], time.time(), first_run=True) == [True]
    finally:
        await outcomes.aclose()
    assert admin.xlen("email.send.events") == events + 1
    assert admin.hkeys("mailpool:sent:m3") == [b"a@example.org"]


async def test_delivery_releases_what_it_did_not_start(as_role: Any, admin: redis.Redis) -> None:
    """A stopping worker's release (XCLAIM ... IDLE JUSTID) as `delivery`: another worker
    with a long --claim-after claims the entry at once."""
    delivery = as_role("delivery")
    stopping = GroupConsumer(delivery, "email.send", "delivery", "w1", claim_after=900)
    (entry,) = await stopping.read()
    assert await stopping.release([entry]) == 1
    other = GroupConsumer(delivery, "email.send", "delivery", "w2", claim_after=900)
    assert [(e.id, e.deliveries) for e in await other.claim_stale()] == [(entry.id, 2)]


async def test_housekeeping_trims_promotes_and_reports(as_role: Any, admin: redis.Redis) -> None:
    from workers.housekeeping import HousekeepConfig, housekeep_once
    from workers.streams.snapshot import collect_status

    housekeeping = as_role("housekeeping")
    admin.xack("email.send", "delivery", *[e[0] for e in admin.xrange("email.send")])
    admin.xreadgroup("delivery", "w1", {"email.send": ">"})
    admin.xreadgroup("app", "a1", {"email.receive": ">"})
    admin.xack("email.receive", "app", *[e[0] for e in admin.xrange("email.receive")])
    config = HousekeepConfig(receive_max_len=1, send_max_len=1, consumer_idle=0.001)
    admin.hset("mailpool:retry:1-0", mapping={"data": b"again"})  # the fixture's due retry
    status = await collect_status(housekeeping, StreamKeys())  # its /metrics gauges
    assert status.dead_letters == 1 and status.retries_waiting == 1
    await asyncio.sleep(0.01)
    await housekeep_once(housekeeping, StreamKeys(), config)
    assert admin.zcard("mailpool:retry") == 0  # due retries back to email.send
    assert [e[1] for e in admin.xrange("email.send")][-1] == {b"data": b"again"}
    assert admin.xlen("email.send.dead") == 1  # never trimmed


async def test_monitor_reads_the_status(as_role: Any, admin: redis.Redis) -> None:
    from workers.streams.snapshot import collect_status

    status = await collect_status(as_role("monitor"), StreamKeys())
    assert status.streams["email.send"].groups["delivery"].lag == 1
    assert status.dead_letters == 1 and status.retries_waiting == 1


async def test_listen_removes_its_consumer_on_a_clean_exit(
    as_role: Any, admin: redis.Redis
) -> None:
    """``mailpool listen`` deletes its consumer when nothing is pending on it (a function:
    the check and the delete in one step), as an application's own listener user."""
    from workers.listen import Listener

    listener = Listener(as_role("listener-app2"), "app", "l-exit", start="all", batch=10)
    await listener.ensure_group()
    admin.execute_command("XGROUP", "CREATECONSUMER", "email.receive", "app", "l-exit")
    assert await listener.remove_consumer_if_idle() is True
    assert b"l-exit" not in [c["name"] for c in admin.xinfo_consumers("email.receive", "app")]


async def test_keda_reads_the_lag_it_scales_on(as_role: Any, admin: redis.Redis) -> None:
    keda = as_role("keda")
    info = await keda.info()  # KEDA >= 2.11: lag only from Redis 7 on (reads redis_version)
    assert int(str(info["redis_version"]).split(".")[0]) >= 7
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

    partitions = [deadletters.Partition(0, operator, keys, qualified=False)]
    assert await deadletters.list_dead(partitions, config("list")) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert await deadletters.replay_dead(partitions, config("replay", rejected)) == 0
    assert await deadletters.purge_dead(partitions, config("purge", purged)) == 0
    assert admin.xlen("email.send.dead") == 1 and admin.xlen("email.send") == 2


def test_operator_adds_and_removes_suppressions(
    acl_server: RedisServer, admin: redis.Redis
) -> None:
    """redis-py's ``incr`` sends INCRBY, which no role may run: ``suppress add`` and
    ``remove`` wrote the list, then failed (exit 1) on its version, and workers never
    copied the change."""
    version = admin.get("mailpool:suppressed:version")
    added = run_mailpool(acl_server, "operator", "suppress", "add", "victim@example.org")
    assert added.returncode == 0, added.stderr
    assert admin.get("mailpool:suppressed:version") != version
    removed = run_mailpool(acl_server, "operator", "suppress", "remove", "victim@example.org")
    assert removed.returncode == 0, removed.stderr
    assert admin.zscore("mailpool:suppressed", "victim@example.org") is None


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


async def test_roles_stop_at_start_with_one_line_when_the_library_is_missing(
    acl_server: RedisServer, admin: redis.Redis, tmp_path: Path
) -> None:
    """No role may load functions: a Redis without mailpool's library (never set up, or a
    release whose library version is not loaded yet) stops each role that needs it at
    start, with exit status 2 and one line saying what to run; `setup` then loads it."""
    from workers.housekeeping import HousekeepConfig, serve

    admin.function_delete(functions.LIBRARY)
    try:
        runs = {
            "delivery": ("deliver", "--relay", f"maildir:{tmp_path / 'maildir'}"),
            "operator": ("dead", "replay", "--all"),
        }
        done = await asyncio.gather(*(
            asyncio.to_thread(run_mailpool, acl_server, role, *args)
            for role, args in runs.items()
        ))  # fmt: skip
        for role, result in zip(runs, done, strict=True):
            assert result.returncode == 2, (role, result.stderr)
            (line,) = result.stderr.strip().splitlines()[-1:]
            assert f"functions library {functions.LIBRARY} is not loaded" in line, (role, line)
            assert "run `mailpool redis-setup`" in line, (role, line)
        config = HousekeepConfig(redis_url=role_url(acl_server, "housekeeping"))
        with pytest.raises(ConfigError, match="mailpool redis-setup"):
            await asyncio.wait_for(serve(config, asyncio.Event()), 10)
        await the_settler_and_promoter_say_what_to_run(acl_server)
        not_setup = run_mailpool(acl_server, "delivery", "redis-setup")
        assert not_setup.returncode == 2 and "may not load" in not_setup.stderr
    finally:
        loaded = run_mailpool(acl_server, "setup", "redis-setup")
    assert loaded.returncode == 0 and f"{functions.LIBRARY} loaded" in loaded.stdout, loaded


async def the_settler_and_promoter_say_what_to_run(acl_server: RedisServer) -> None:
    """A library gone while delivery runs: each settlement and promotion fails with the
    same line (a Redis error: the settler keeps the entry pending and tries again)."""
    from workers.streams.outcomes import Outcomes, Settlement

    delivery = aioredis.Redis.from_url(role_url(acl_server, "delivery"))
    outcomes = Outcomes(delivery, StreamKeys(), group="delivery",
                        sent_ttl=60, events_maxlen=1000)  # fmt: skip
    try:
        for attempt in (
            outcomes.settle([Settlement(entry_id="1-0", message_id="m")], 1.0),
            outcomes.promote_due(1.0),
        ):
            with pytest.raises(functions.FunctionsNotLoaded, match="run `mailpool redis-setup`"):
                await attempt
    finally:
        await outcomes.aclose()
        await delivery.aclose()
