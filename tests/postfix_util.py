"""A private Postfix instance (Debian's postfix package, its own configuration, queue and log
under /tmp) as a real MTA peer: its smtpd takes mail on a free loopback port and its queue
manager relays everything to one next hop (mailpool's ingest, or a sink).

Started with ``postfix -c DIR start`` as root; the system's Postfix (never configured here)
is not touched.  DNS is off: the next hop is ``[127.0.0.1]:PORT``.  The log is a file of
its own (``maillog_file``), read by the tests and shown when start-up fails.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness import free_port, wait_for_port

POSTFIX = "/usr/sbin/postfix"
SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
relayhost = [127.0.0.1]:{next_hop}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_dns_support_level = disabled
disable_dns_lookups = yes
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-test
alias_maps =
alias_database =
local_recipient_maps =
# Deliver at once, retry soon: tests wait seconds, not minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


class PrivatePostfix:
    def __init__(self, next_hop: int, **settings: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailpool-postfix-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.conf = self.root / "conf"
        self.conf.mkdir()
        (self.root / "queue").mkdir()
        data = self.root / "data"
        data.mkdir()
        shutil.chown(data, "postfix")
        main = MAIN_CF.format(root=self.root, next_hop=next_hop)
        main += "".join(f"{name} = {value}\n" for name, value in settings.items())
        (self.conf / "main.cf").write_text(main)
        master = SYSTEM_MASTER_CF.read_text().replace(
            "smtp      inet  n       -       y       -       -       smtpd",
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
        )
        assert f":{self.port} inet" in master, "Debian's master.cf changed its smtpd line"
        (self.conf / "master.cf").write_text(master)

    @property
    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def _postfix(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf), *command],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def start(self) -> PrivatePostfix:
        done = self._postfix("start")
        try:
            wait_for_port(self.port, timeout=15)
        except Exception as exc:
            raise RuntimeError(f"private postfix did not start: {done}\n{self.log}") from exc
        return self

    def stop(self) -> None:
        self._postfix("abort")
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        """The log once it says ``text`` (or as it is when time is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and text not in self.log:
            time.sleep(0.1)
        return self.log


@contextlib.contextmanager
def private_postfix(next_hop: int, **settings: str) -> Iterator[PrivatePostfix]:
    postfix = PrivatePostfix(next_hop, **settings).start()
    try:
        yield postfix
    finally:
        postfix.stop()
