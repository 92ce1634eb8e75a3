"""Default consumer names are unique per worker however it is run.

Host name plus pid is not: containers on the host network share the host's name and each
runs as pid 1, so two delivery containers both joined the group as one consumer.  The
container image test (tests/test_image_podman.py) shows it with real containers; here the
same situation is made with pid namespaces, and the default is checked where it is made.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.harness import child_env
from workers.config import DeliveryConfig, default_consumer_name
from workers.listen import ListenConfig

# Prints the consumer a `mailpool deliver` started in a new pid namespace would use.
CHILD = (
    "import os; from workers.config import DeliveryConfig; "
    "print(os.getpid(), DeliveryConfig(relay='smtp://127.0.0.1:1').consumer)"
)


def test_same_host_and_pid_still_give_distinct_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    monkeypatch.setattr(os, "getpid", lambda: 1)
    names = {default_consumer_name() for _ in range(2)}
    assert len(names) == 2, names
    # The readable part stays: an operator can tell which host and process a consumer is.
    assert all(name.startswith("vm-1-") for name in names), names


def test_each_config_gets_its_own_default() -> None:
    """A default made once at import would be shared by every process forked after it."""
    deliveries = {DeliveryConfig(relay="smtp://127.0.0.1:1").consumer for _ in range(2)}
    listeners = {ListenConfig(group="app").consumer for _ in range(2)}
    assert len(deliveries) == 2 and len(listeners) == 2


def consumer_as_pid_1() -> str:
    command = ["unshare", "--pid", "--fork", sys.executable, "-c", CHILD]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, env=child_env(), timeout=30
    )
    if done.returncode != 0:
        pytest.skip(f"cannot start a process in a new pid namespace: {done.stderr.strip()}")
    pid, consumer = done.stdout.split()
    assert pid == "1"
    return consumer


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare (util-linux)")
def test_two_pid_1_processes_on_one_host_are_two_consumers() -> None:
    first, second = consumer_as_pid_1(), consumer_as_pid_1()
    assert first != second, "two workers would share one consumer's pending entries"
    prefix = f"{socket.gethostname()}-1-"
    assert first.startswith(prefix) and second.startswith(prefix)
