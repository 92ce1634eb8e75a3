"""A real DNS server for the tests: Debian's unbound on a free loopback port, answering for
the test zones from ``local-data`` and for nothing else (no recursion, no network).

``make setup-dev`` installs unbound (scripts/setup.sh); the tests start their own.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from workers.verify.resolver import Resolver

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
TXT_STRING = 255  # octets per character-string of a TXT record (RFC 1035 section 3.3.14)
# How long a test's resolver waits for unbound: ample on a loaded CI machine (answers take
# milliseconds; a test about silence uses a port that never answers, not this).
DNS_TIMEOUT = 5.0


def txt(value: str) -> str:
    """A TXT record's data as unbound reads it: quoted strings of at most 255 octets."""
    parts = [value[i : i + TXT_STRING] for i in range(0, len(value), TXT_STRING)] or [""]
    return " ".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"' for part in parts)


def free_udp_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (DNS answers on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if port not in (53, 6379):
            return port


class DnsServer:
    """unbound serving ``records``: name -> [(type, data)], e.g.
    ``{"s1._domainkey.example.com": [("TXT", txt("v=DKIM1; ..."))]}``, each with a TTL of
    ``ttl`` seconds.  Every zone named in ``zones`` answers NXDOMAIN for the names it does
    not hold."""

    def __init__(
        self,
        directory: Path,
        zones: Sequence[str],
        records: Mapping[str, Sequence[tuple[str, str]]],
        ttl: int = 300,
    ) -> None:
        self.directory = directory
        self.ttl = ttl
        self.port = free_udp_tcp_port()
        self.zones = list(zones)
        self.records = {name: list(rrs) for name, rrs in records.items()}
        self.process: subprocess.Popen[bytes] | None = None

    def resolver(self) -> Resolver:
        """Verification's resolver, asking this server alone."""
        host, port = self.address.split(":")
        return Resolver((host, int(port)), timeout=DNS_TIMEOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            "server:",
            f"  interface: 127.0.0.1@{self.port}",
            f"  port: {self.port}",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{self.directory}"',
            f'  pidfile: "{self.directory}/unbound.pid"',
            f'  logfile: "{self.directory}/unbound.log"',
            "  use-syslog: no",
            "  do-ip6: no",
            "  access-control: 127.0.0.0/8 allow",
            '  module-config: "iterator"',
            "  num-threads: 1",
            "  verbosity: 1",
        ]
        lines += [f'  local-zone: "{zone.rstrip(".")}." static' for zone in self.zones]
        for name, rrs in self.records.items():
            for rtype, data in rrs:
                entry = f"{name.rstrip('.')}. {self.ttl} IN {rtype} {data}"
                lines.append("  local-data: '" + entry.replace("'", "\\'") + "'")
        lines += ["remote-control:", "  control-enable: no"]
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        """unbound.conf in the directory, checked by unbound-checkconf."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "unbound.conf"
        config.write_text(self._config(), encoding="utf-8")
        checked = subprocess.run(
            [UNBOUND.replace("unbound", "unbound-checkconf"), str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert checked.returncode == 0, f"unbound config refused:\n{checked.stdout}{checked.stderr}"
        return config

    def start(self) -> None:
        config = self.write_config()
        self.process = subprocess.Popen(
            [UNBOUND, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Until unbound answers on TCP (it binds UDP and TCP together)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.directory / "unbound.log").read_text(errors="replace")
                raise AssertionError(f"unbound exited: {log[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"unbound did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def running_dns(
    directory: Path, zones: Sequence[str], records: Mapping[str, Sequence[tuple[str, str]]]
) -> Iterator[DnsServer]:
    server = DnsServer(directory, zones, records)
    server.start()
    try:
        yield server
    finally:
        server.stop()
