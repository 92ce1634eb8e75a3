"""No command ever shows a password: one unique password is planted everywhere a secret can
be given (the Redis URL of a real redis-server whose ACL user has it, the relay URL and
--relay-password of a real SMTP relay that requires AUTH, --auth-users / --auth-file of
ingest, the *_PASSWORD variables and *-file options), every command runs with debug logging
(run, ingest, deliver, housekeep, send, listen, status, dead list/show) on its happy path and
its failure paths (Redis unreachable, Redis refusing the login, no Sentinel answering, the
relay refusing AUTH, bad configuration), and all of their stdout, stderr and /metrics output
is searched for it.

What is searched for is a random hex core inside the password: it survives any percent-
encoding, so a URL-encoded leak is found too.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
import redis
from aiosmtpd.smtp import AuthResult

from tests.harness import (
    ROOT,
    RedisServer,
    child_env,
    free_port,
    running_redis,
    wait_for_port,
    wait_until_blocking,
)
from tests.sinks import RecordingSink

CORE = uuid.uuid4().hex
# "@" and "/" must be percent-encoded in a URL: both spellings are planted.
PASSWORD = f"Pl@nted/{CORE}"
ENCODED = quote(PASSWORD, safe="")
USER = "app"  # the Redis ACL user and the ingest AUTH user
RELAY_USER = "mailer"


def redis_url(port: int, *, user: str = USER, password: str | None = ENCODED) -> str:
    userinfo = f"{user}:{password}@" if password is not None else f"{user}@"
    return f"redis://{userinfo}127.0.0.1:{port}/0"


# ---------------------------------------------------------------------------------------
# Everything the commands printed


@dataclass
class Transcript:
    """The output of every command run in a test, by label."""

    outputs: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, text: str) -> str:
        self.outputs[label] = self.outputs.get(label, "") + text
        return text

    def leaks(self) -> list[str]:
        return [
            f"{label}: {line}"
            for label, text in self.outputs.items()
            for line in text.splitlines()
            if CORE in line
        ]

    def assert_clean(self, *expected_events: str) -> None:
        leaks = self.leaks()
        assert not leaks, f"{len(leaks)} line(s) show the planted password:\n" + "\n".join(
            leaks[:20]
        )
        everything = "\n".join(self.outputs.values())
        for event in expected_events:  # the logs searched are real ones, at debug level
            assert event in everything, f"{event} not logged: the search would prove nothing"


@pytest.fixture
def transcript() -> Transcript:
    return Transcript()


@pytest.fixture
def environment(tmp_path: Path) -> dict[str, str]:
    """Debug logging, JSON lines, and a data directory of the test's own."""
    return child_env(MAILPOOL_LOG_LEVEL="debug", MAILPOOL_DATA_DIR=str(tmp_path / ".mailpool"))


@dataclass(frozen=True)
class Run:
    """A command that ends: its label in the transcript, arguments, environment and the exit
    status it must have."""

    label: str
    args: tuple[str, ...]
    env: dict[str, str]
    status: int = 0

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", *self.args], cwd=ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


def run_all(transcript: Transcript, runs: list[Run]) -> list[str]:
    """Run commands that end, side by side; record their stdout and stderr; check their exit
    statuses. Returns their stdout."""
    processes = [run.start() for run in runs]
    outputs = [process.communicate(timeout=60) for process in processes]
    for run, process, (stdout, stderr) in zip(runs, processes, outputs, strict=True):
        transcript.add(run.label, stdout + stderr)
        assert process.returncode == run.status, f"{run.label}: exit {process.returncode}\n{stderr}"
    return [stdout for stdout, _ in outputs]


def mailpool(
    transcript: Transcript, label: str, *args: str, env: dict[str, str], status: int = 0
) -> str:
    """Run one command that ends (see :func:`run_all`); its stdout."""
    return run_all(transcript, [Run(label, args, env, status)])[0]


class Role:
    """A long-running command (run, ingest, deliver, housekeep, listen) with its output in a
    file; ``stop`` sends SIGTERM and records the output."""

    def __init__(self, transcript: Transcript, label: str, log: Path, *args: str,
                 env: dict[str, str]) -> None:  # fmt: skip
        self.transcript, self.label, self.log = transcript, label, log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers", *args],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        def logged() -> bool:
            if text in self.output():
                return True
            assert self.process.poll() is None, f"{self.label} exited:\n{self.output()[-2000:]}"
            return False

        what = f"{self.label} logging {text!r} (its output: {self.log})"
        wait_until_blocking(logged, what, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.transcript.add(self.label, self.output())


@pytest.fixture
def roles(transcript: Transcript, tmp_path: Path) -> Iterator[Callable[..., Role]]:
    started: list[Role] = []

    def start(label: str, *args: str, env: dict[str, str]) -> Role:
        role = Role(transcript, label, tmp_path / f"{label}.log", *args, env=env)
        started.append(role)
        return role

    yield start
    for role in started:
        with contextlib.suppress(Exception):
            role.stop()


def fetch(transcript: Transcript, label: str, port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return transcript.add(f"{label} {path}", response.read().decode())


def swaks(port: int, to: str, *, auth: bool) -> str:
    args = ["swaks", "--server", f"127.0.0.1:{port}", "--to", to, "--from", "a@example.net",
            "--timeout", "20"]  # fmt: skip
    if auth:
        args += ["--tls", "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


# ---------------------------------------------------------------------------------------
# The servers that know the password


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server where only the ACL user ``app`` with the planted password gets in."""
    acl = ["--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    with running_redis(tmp_path_factory.mktemp("acl-redis"), extra=acl) as server:
        yield server


@pytest.fixture
def client(acl_redis: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis(port=acl_redis.port, username=USER, password=PASSWORD)
    connection.flushall()
    yield connection
    connection.close()


@pytest.fixture
def relay(make_sink: Callable[..., RecordingSink], certificate: tuple[Path, Path]) -> RecordingSink:
    """A relay that offers STARTTLS and requires AUTH as ``mailer`` with the password."""
    return make_sink(certificate=certificate, users={RELAY_USER: PASSWORD})


class RefusingRelay(RecordingSink):
    """A relay that answers every AUTH with 535 (the sink's own check answers nothing for a
    wrong password, which the client sees as a timeout)."""

    def _authenticate(self, *args: Any) -> AuthResult:
        return AuthResult(success=False, handled=False)


def delivered_to(sink: RecordingSink, address: str) -> Callable[[], bool]:
    return lambda: bool(sink.deliveries_to(address))


def tls_options(certificate: tuple[Path, Path]) -> list[str]:
    return ["--tls-cert", str(certificate[0]), "--tls-key", str(certificate[1])]


@dataclass
class Scene:
    """What every scenario works with: the servers that know the password, the commands'
    environment, a starter of long-running commands, and the transcript of all output."""

    redis_server: RedisServer
    client: redis.Redis
    relay: RecordingSink
    certificate: tuple[Path, Path]
    environment: dict[str, str]
    role: Callable[..., Role]
    transcript: Transcript


@pytest.fixture
def scene(
    acl_redis: RedisServer,
    client: redis.Redis,
    relay: RecordingSink,
    certificate: tuple[Path, Path],
    environment: dict[str, str],
    roles: Callable[..., Role],
    transcript: Transcript,
) -> Scene:
    return Scene(acl_redis, client, relay, certificate, environment, roles, transcript)


# ---------------------------------------------------------------------------------------
# The scenarios


@pytest.mark.timeout(180)
def test_pool_and_the_one_shot_commands_never_show_the_password(scene: Scene) -> None:
    """Every secret given the worst way (flags, URLs with passwords): `mailpool run` still
    logs none, nor do send, listen, status and dead list/show."""
    url, relay, out = redis_url(scene.redis_server.port), scene.relay, scene.transcript
    smtp, http = free_port(), free_port()
    relay.refuse_rcpt("bounce@example.com", "550 5.1.1 no such user")
    pool = scene.role(
        "run", "run", "--redis-url", url,
        "--relay", f"smtp://{RELAY_USER}:{ENCODED}@127.0.0.1:{relay.port}",
        "--relay-password", PASSWORD, "--no-tls-verify", "--max-attempts", "1",
        "--listen", f"127.0.0.1:{smtp}", "--http", f"127.0.0.1:{http}", "--hostname", "mx.test",
        *tls_options(scene.certificate), "--auth-users", f"{USER}:{PASSWORD}",
        env=scene.environment,
    )  # fmt: skip
    wait_for_port(smtp, timeout=30)
    assert "235 2.7.0" in swaks(smtp, "in@example.org", auth=True)

    with_url = {**scene.environment, "MAILPOOL_REDIS_URL": url}
    for to in ("out@example.com", "bounce@example.com"):
        mailpool(out, f"send {to}", "send", "--from", "app@example.org", "--to", to,
                 "--subject", "hi", "--text", "hello", env=with_url)  # fmt: skip
    wait_until_blocking(
        delivered_to(relay, "out@example.com"), "the relay got the send", timeout=20
    )
    wait_until_blocking(
        lambda: scene.client.xlen("email.send.dead") == 1, "the bounce is a dead letter", timeout=20
    )
    pool.wait_for_log("message_accepted")

    [(dead_id, _)] = cast(list[tuple[bytes, Any]], scene.client.xrange("email.send.dead"))
    one_shots = [
        ("listen", "--group", "app", "--start", "all", "--count", "1"),
        ("status",), ("status", "--json"), ("dead", "list"), ("dead", "list", "--json"),
        ("dead", "show", dead_id.decode()),
    ]  # fmt: skip
    run_all(out, [Run(" ".join(args), args, with_url) for args in one_shots])
    fetch(out, "run", http, "/metrics")
    pool.stop()
    assert pool.process.returncode == 0
    out.assert_clean("pool_starting", "ingest_starting", "mailpool_ingest_messages")


@pytest.mark.timeout(180)
def test_roles_with_secrets_from_files_and_the_environment_never_show_them(
    scene: Scene, tmp_path: Path
) -> None:
    """The recommended way: the URL without a password, passwords in files (as a mounted
    Kubernetes Secret) or the environment. The roles log in with them and log none."""
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")  # as `echo` writes it
    auth_file = tmp_path / "auth"
    auth_file.write_text(f"{USER}:{PASSWORD}\n")
    without_password = redis_url(scene.redis_server.port, password=None)
    from_file = {**scene.environment, "MAILPOOL_REDIS_URL": without_password,
                 "MAILPOOL_REDIS_PASSWORD_FILE": str(password_file)}  # fmt: skip
    smtp, ports = free_port(), {name: free_port() for name in ("ingest", "deliver", "housekeep")}
    started = [
        scene.role(
            "ingest", "ingest", "--listen", f"127.0.0.1:{smtp}",
            "--http", f"127.0.0.1:{ports['ingest']}", *tls_options(scene.certificate),
            "--auth-file", str(auth_file), "--auth-required", env=from_file,
        ),
        scene.role(
            "deliver", "deliver", "--relay", f"smtp://127.0.0.1:{scene.relay.port}",
            "--no-tls-verify", "--http", f"127.0.0.1:{ports['deliver']}",
            env={**from_file, "MAILPOOL_REDIS_PASSWORD_FILE": "",
                 "MAILPOOL_REDIS_PASSWORD": PASSWORD, "MAILPOOL_RELAY_USER": RELAY_USER,
                 "MAILPOOL_RELAY_PASSWORD_FILE": str(password_file)},
        ),
        scene.role("housekeep", "housekeep", "--http", f"127.0.0.1:{ports['housekeep']}",
                   "--housekeep-interval", "0.5", env=from_file),
    ]  # fmt: skip
    wait_for_port(smtp, timeout=30)
    assert "250 2.0.0" in swaks(smtp, "in@example.org", auth=True)
    mailpool(scene.transcript, "send", "send", "--from", "app@example.org",
             "--to", "out@example.com", "--text", "hello", env=from_file)  # fmt: skip
    wait_until_blocking(
        delivered_to(scene.relay, "out@example.com"), "deliver logged in to both", timeout=20
    )
    assert scene.client.xlen("email.receive") == 1
    started[0].wait_for_log("message_accepted")
    for name, port in ports.items():
        wait_for_port(port)
        fetch(scene.transcript, name, port, "/metrics")
        fetch(scene.transcript, name, port, "/readyz")
    for role in started:
        role.stop()
    scene.transcript.assert_clean(
        "ingest_starting", "delivery_started", '"event": "auth"', "mailpool_"
    )


@pytest.mark.timeout(180)
def test_failure_paths_never_show_the_password(scene: Scene) -> None:
    """Redis not there, Redis refusing the login, the relay refusing AUTH: every command says
    what went wrong, with the URL's password masked."""
    out = scene.transcript
    nowhere = {**scene.environment, "MAILPOOL_REDIS_URL": redis_url(free_port())}
    port = scene.redis_server.port
    reachable = {**scene.environment, "MAILPOOL_REDIS_URL": redis_url(port)}
    wrong_user = {**reachable, "MAILPOOL_REDIS_URL": redis_url(port, user="nobody")}
    one_shots = [
        ("status",), ("dead", "list"),
        ("send", "--from", "a@example.org", "--to", "b@example.org", "--text", "x"),
    ]  # fmt: skip
    no_sentinel = {
        **scene.environment, "MAILPOOL_SENTINEL_PASSWORD": PASSWORD,
        "MAILPOOL_REDIS_URL": f"redis+sentinel://{USER}:{ENCODED}@127.0.0.1:{free_port()}/m",
    }  # fmt: skip
    run_all(out, [
        *(Run(f"{' '.join(args)} {why}", args, env, status=1)
          for env, why in ((nowhere, "unreachable"), (wrong_user, "login refused"))
          for args in one_shots),
        Run("status no sentinel", ("status",), no_sentinel, status=1),
    ])  # fmt: skip

    smtp = free_port()
    waiting = {
        "message_deferred": scene.role(
            "ingest unreachable", "ingest", "--listen", f"127.0.0.1:{smtp}", env=nowhere),
        "redis_unavailable_at_start": scene.role(
            "deliver unreachable", "deliver", "--relay", scene.relay.url, env=nowhere),
        "housekeeping_failed": scene.role(
            "housekeep unreachable", "housekeep", "--housekeep-interval", "0.2", env=nowhere),
        "redis_not_answering": scene.role(
            "listen unreachable", "listen", "--group", "app", env=nowhere),
    }  # fmt: skip
    refusing = RefusingRelay(certificate=scene.certificate, users={}).start()
    try:
        waiting["relay_connect_failed"] = scene.role(
            "deliver relay refuses AUTH", "deliver", "--no-tls-verify",
            "--relay", f"smtp://{RELAY_USER}:{ENCODED}@127.0.0.1:{refusing.port}", env=reachable,
        )  # fmt: skip
        wait_for_port(smtp, timeout=30)
        assert "451 " in swaks(smtp, "in@example.org", auth=False)
        mailpool(out, "send for the refusing relay", "send", "--from", "a@example.org",
                 "--to", "b@example.org", "--text", "x", env=reachable)  # fmt: skip
        for event, role in waiting.items():
            role.wait_for_log(event)
            role.stop()
    finally:
        refusing.stop()
    out.assert_clean(
        "cannot use Redis at", "535", "relay_connect_failed", "no Sentinel names a master"
    )


# Bad configuration with the password somewhere on the line: one line, exit 2, no password.
BAD_CONFIGURATIONS = {
    "redis url scheme": ["status", "--redis-url", f"http://{USER}:{ENCODED}@127.0.0.1/0"],
    "redis url port": ["status", "--redis-url", f"redis://{USER}:{ENCODED}@127.0.0.1:port/0"],
    "relay without host": ["deliver", "--relay", f"smtp://{RELAY_USER}:{ENCODED}@"],
    "relay port": ["deliver", "--relay", f"smtp://{RELAY_USER}:{ENCODED}@127.0.0.1:99999"],
    "relay scheme": ["deliver", "--relay", f"ftp://{RELAY_USER}:{ENCODED}@127.0.0.1"],
    "bad number beside secrets": [
        "deliver", "--relay", "smtp://127.0.0.1:25", "--relay-password", PASSWORD,
        "--max-attempts", "many",
    ],
    "auth without tls": ["ingest", "--auth-users", f"{USER}:{PASSWORD}"],
    "password file missing": ["status", "--redis-password-file", "/nonexistent/redis-password"],
    "redis password without url": ["status", "--redis-password", PASSWORD],
    "mistyped password flag": ["deliver", "--relay", "x", "--relay-pasword", PASSWORD],
    "mistyped flag with =": ["status", f"--redis-pasword={PASSWORD}"],
    "sentinel url port": [
        "status", "--redis-url", f"redis+sentinel://{USER}:{ENCODED}@127.0.0.1:port/mailpool",
    ],
    "sentinel url option": [
        "status", "--redis-url",
        f"redis+sentinel://127.0.0.1/mailpool?sentinel_password={ENCODED}&db=1",
    ],
    "sentinel password without a sentinel url": [
        "status", "--redis-url", "redis://127.0.0.1:1/0", "--sentinel-password", PASSWORD,
    ],
}  # fmt: skip


def test_bad_configuration_never_shows_the_password(
    environment: dict[str, str], transcript: Transcript, tmp_path: Path
) -> None:
    other = tmp_path / "other-password"
    other.write_text("another password\n")
    both = ["deliver", "--relay", "smtp://127.0.0.1:25", "--relay-password", PASSWORD,
            "--relay-password-file", str(other)]  # fmt: skip
    bad = [*BAD_CONFIGURATIONS.items(), ("password and its file", both)]
    run_all(transcript, [Run(label, tuple(args), environment, status=2) for label, args in bad])
    transcript.assert_clean(
        "--redis-url", "--relay", "--max-attempts", "--relay-pasword", "--sentinel-password"
    )
