"""A Redis Sentinel deployment on loopback for the tests: a primary, its replicas and three
Sentinels (``redis-server --sentinel``), each on a free port, with failover timings of a
second instead of Sentinel's half minute.

The calls block (they wait for Sentinel); a test with an event loop of its own runs them
with ``asyncio.to_thread`` so that its SMTP clients keep going meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from tests.harness import REDIS_SERVER, RedisServer, free_port, wait_for_port, wait_until_blocking

MASTER = "mailpool"
QUORUM = 2
DOWN_AFTER_MS = 1000
# Also how long a Sentinel waits before it tries the same master again: twice this.
FAILOVER_TIMEOUT_MS = 2000
# Sentinel's own periods, shortened with SENTINEL DEBUG (Redis >= 7.0) so that a failover,
# and the discovery of a replica started again, take about a second instead of ten.  PINGs
# go out every 250 ms: well within the 1 s after which a server counts as down (at 500 ms
# and a PING every 500 ms, a master just promoted was taken for down before its first
# reply, and failed over again), and Sentinel promotes no replica silent for 5 of them (at
# 100 ms, a replica on two busy cores was found not good enough now and then).  TILT
# (Sentinel stops acting for 30 s when its timer runs late) is made hard to enter: on two
# busy cores a late timer is load, not a clock jump.
DEBUG_TIMINGS = {
    "info-period": 250, "ping-period": 250, "ask-period": 250, "publish-period": 250,
    "min-link-reconnect-period": 500, "election-timeout": 1000, "slave-reconf-timeout": 2000,
    "tilt-trigger": 60_000, "tilt-period": 1000,
}  # fmt: skip
GOOD_REPLICA_MS = 1000
# Full resyncs go over the socket at once (Redis 7 waits 5 s for more replicas by default).
REPLICATION = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]


def tls_settings(certificate: tuple[Path, Path], port: int) -> list[str]:
    """redis-server settings for TLS only on ``port`` (also to the servers it connects to:
    a replica to its master, a Sentinel to the servers and the other Sentinels)."""
    cert, key = certificate
    return [
        "port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
        f"tls-ca-cert-file {cert}", "tls-auth-clients no", "tls-replication yes",
    ]  # fmt: skip


def as_arguments(settings: list[str]) -> list[str]:
    """Config-file lines as redis-server command-line arguments."""
    return [word for line in settings for word in (f"--{line.split()[0]}", *line.split()[1:])]


class SentinelServer:
    """One ``redis-server --sentinel`` child on 127.0.0.1, watching ``MASTER``."""

    def __init__(
        self,
        data_dir: Path,
        master_port: int,
        *,
        settings: list[str],
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.master_port = master_port
        self.settings = [*settings, *(tls_settings(tls, self.port) if tls else [])]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"  # Sentinel rewrites it: its own copy
        conf.write_text(
            "\n".join([
                f"port {self.port}", "bind 127.0.0.1", "daemonize no",
                f"dir {self.data_dir}", f"logfile {self.data_dir / 'sentinel.log'}",
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} {QUORUM}",
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
                *self.settings, "",
            ])
        )  # fmt: skip
        args = [REDIS_SERVER, str(conf), "--sentinel"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def good_replica(replica: dict[str, Any]) -> bool:
    """A replica Sentinel would promote: up, linked to its master, answering of late."""
    return bool(
        not replica["is_sdown"]
        and replica.get("master-link-status") == "ok"
        and int(replica["info-refresh"]) <= GOOD_REPLICA_MS
        and int(replica["last-ok-ping-reply"]) <= GOOD_REPLICA_MS
    )


class SentinelSet:
    """A primary, ``replicas`` replicas and three Sentinels; ``url`` is what mailpool gets.

    ``servers`` keeps every Redis server; which one is the master changes with failovers
    (``master()`` asks the Sentinels).
    """

    def __init__(
        self,
        base: Path,
        *,
        replicas: int = 1,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``password``: the servers' (``requirepass``, and what replicas and Sentinels log
        in with); ``sentinel_password``: the Sentinels' own; ``tls``: certificate and key
        (also the CA) for TLS only, everywhere."""
        self.base = base
        self.tls = tls
        self.password = password
        self.redis_settings = (
            [f"requirepass {password}", f"masterauth {password}"] if password else []
        )
        sentinel_settings = [f"sentinel auth-pass {MASTER} {password}"] if password else []
        if sentinel_password:
            sentinel_settings.append(f"requirepass {sentinel_password}")
        self.client_options: dict[str, Any] = {"password": sentinel_password}
        if tls:
            self.client_options.update(ssl=True, ssl_ca_certs=str(tls[0]))
        self.servers = [RedisServer(base / f"redis{n}") for n in range(replicas + 1)]
        for server in self.servers:
            server.extra = self._server_args(
                server, None if server is self.servers[0] else self.servers[0]
            )
        self.sentinels = [
            SentinelServer(
                base / f"sentinel{n}", self.servers[0].port, settings=sentinel_settings, tls=tls
            )
            for n in range(3)
        ]

    def _server_args(self, server: RedisServer, master: RedisServer | None) -> list[str]:
        settings = list(self.redis_settings)
        if self.tls:
            settings += tls_settings(self.tls, server.port)
        if master is not None:
            settings.append(f"replicaof 127.0.0.1 {master.port}")
        return [*REPLICATION, *as_arguments(settings)]

    def url(self, scheme: str = "redis+sentinel", db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"{scheme}://{hosts}/{MASTER}/{db}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
            with contextlib.closing(self.sentinel_client(sentinel)) as client:
                args = [item for pair in DEBUG_TIMINGS.items() for item in pair]
                client.execute_command("SENTINEL", "DEBUG", *args)
        self.wait_until_watched()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop(kill=True)

    def server_client(self, server: RedisServer) -> redis.Redis:
        """A client of one Redis server (not through the Sentinels)."""
        options = {**self.client_options, "password": self.password}
        return redis.Redis(port=server.port, socket_timeout=2, **options)

    def role(self, server: RedisServer) -> str:
        with contextlib.closing(self.server_client(server)) as client:
            return str(client.execute_command("ROLE")[0].decode())

    def sentinel_client(self, sentinel: SentinelServer) -> redis.Redis:
        """A client of one Sentinel (the caller closes it)."""
        return redis.Redis(
            port=sentinel.port, socket_timeout=2, decode_responses=True, **self.client_options
        )

    def _views(self) -> list[dict[str, Any]]:
        """What each Sentinel that answers says of the master (SENTINEL MASTER)."""
        views = []
        for sentinel in self.sentinels:
            with (
                contextlib.suppress(redis.RedisError),
                contextlib.closing(self.sentinel_client(sentinel)) as client,
            ):
                views.append(client.sentinel_master(MASTER))
        return views

    def master(self) -> RedisServer:
        """The server most Sentinels name as the master."""
        ports = [int(view["port"]) for view in self._views()]
        port = max(set(ports), key=ports.count)
        return next(s for s in self.servers if s.port == port)

    def replicas(self) -> list[RedisServer]:
        master = self.master()
        return [s for s in self.servers if s is not master and s.process is not None]

    def wait_until_watched(self, timeout: float = 20.0) -> RedisServer:
        """Until every Sentinel names the same live master, knows the other Sentinels and
        sees every running replica linked to it: a failover can then happen."""
        # a loop, not wait_until_blocking: the failure names the last problem it saw
        deadline = time.monotonic() + timeout
        while True:
            problem = self._watch_problem()
            if problem is None:
                return self.master()
            if time.monotonic() > deadline:
                raise AssertionError(f"Sentinels not ready after {timeout}s: {problem}")
            time.sleep(0.05)

    def _watch_problem(self) -> str | None:
        views = self._views()
        if len(views) < len(self.sentinels):
            return "a Sentinel does not answer"
        if len({int(v["port"]) for v in views}) != 1:
            return "the Sentinels name different masters"
        running = sum(1 for s in self.servers if s.process is not None) - 1
        for view in views:
            if view["is_sdown"] or view["is_odown"] or view.get("is_failover_in_progress"):
                return f"master flags {view['flags']}"
            if view["num-other-sentinels"] < len(self.sentinels) - 1:
                return "a Sentinel does not know the others yet"
            if view["num-slaves"] < running:
                return f"{view['num-slaves']} of {running} replicas known"
        return self._replica_problem()

    def _replica_problem(self) -> str | None:
        for sentinel in self.sentinels:
            with contextlib.closing(self.sentinel_client(sentinel)) as client:
                for replica in client.sentinel_slaves(MASTER):
                    alive = any(s.port == int(replica["port"]) and s.process for s in self.servers)
                    if alive and not good_replica(replica):
                        return f"replica {replica['port']}: {replica['flags']}"
        return None

    def kill_master(self) -> tuple[RedisServer, float]:
        """kill -9 the master; returns it and when it died (monotonic)."""
        master = self.master()
        assert master.process is not None
        os.kill(master.process.pid, signal.SIGKILL)
        master.process.wait(timeout=10)
        master.process = None
        return master, time.monotonic()

    def pause_master(self) -> tuple[RedisServer, float]:
        """SIGSTOP the master, as a partition would cut it off: its connections stay open,
        what clients send meanwhile waits in its socket buffers (see ``resume``)."""
        master = self.master()
        assert master.process is not None
        master.process.send_signal(signal.SIGSTOP)
        return master, time.monotonic()

    def resume(self, server: RedisServer) -> None:
        """SIGCONT: it runs what waited, as the master it still thinks it is, until the
        Sentinels make it a replica of the new master (which drops what it ran meanwhile)."""
        assert server.process is not None
        server.process.send_signal(signal.SIGCONT)

    def failover(self) -> tuple[RedisServer, float]:
        """SENTINEL FAILOVER: the Sentinels promote the replica without waiting for the
        master to fail; returns the master as it was and when the failover was asked for."""
        master, at = self.master(), time.monotonic()
        with contextlib.closing(self.sentinel_client(self.sentinels[0])) as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER)
        return master, at

    def wait_for_new_master(self, old: RedisServer, timeout: float = 20.0) -> RedisServer:
        """Until a majority of the Sentinels names another master, which says it is one."""
        promoted: list[RedisServer] = []

        def moved_on() -> bool:
            ports = [int(view["port"]) for view in self._views()]
            moved = [p for p in ports if p != old.port]
            if len(moved) < QUORUM or len(set(moved)) != 1:
                return False
            new = next(s for s in self.servers if s.port == moved[0])
            promoted[:] = [new] if new.process is not None and self.role(new) == "master" else []
            return bool(promoted)

        wait_until_blocking(moved_on, f"a failover from {old.port}", timeout=timeout)
        return promoted[0]

    def restart_as_replica(self, server: RedisServer, master: RedisServer) -> None:
        """Start a killed server again as a replica of ``master`` (empty, it syncs from it:
        never as a master, which would offer its empty data set)."""
        server.extra = self._server_args(server, master)
        server.start()


@contextlib.contextmanager
def running_sentinels(base: Path, **options: Any) -> Iterator[SentinelSet]:
    deployment = SentinelSet(base, **options)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
