"""deploy/redis/users.acl on a Redis Cluster: the one shipped file gives each role what it
needs on partitioned streams too (the tagged names ``email.send{3}``, ``mailpool:{3}retry``
and ``CLUSTER SLOTS``, which the roles' clients read the slot map with).  The file's users
are set on every node of the shared cluster, primaries and replicas (ACLs are per node),
the roles run as their users end to end, and the users are removed again."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from tests.cluster_util import PARTITIONS, ClusterSet, all_keys
from tests.delivery_util import make_config, running_worker, send_message
from tests.harness import child_env, wait_until
from tests.ingest_util import ingest, send_one
from tests.sinks import RecordingSink
from tests.test_deploy_acl import acl_rules, example_password
from workers import producer

ROLES = ("setup", "ingest", "producer", "delivery", "monitor")


@pytest.fixture
def acl_users(cluster: ClusterSet) -> Iterator[None]:
    """The file's roles on every node of the cluster (not its ``default off``)."""
    rules = acl_rules()
    for server in cluster.running():
        for role in ROLES:
            cluster.client(server).acl_setuser(role, reset=True)  # the file's line says reset
            cluster.client(server).execute_command("ACL", "SETUSER", role, *rules[role])
    try:
        yield
    finally:
        for server in cluster.running():
            cluster.client(server).acl_deluser(*ROLES)


def role_url(cluster: ClusterSet, role: str) -> str:
    return cluster.url().replace("://", f"://{role}:{example_password(role)}@")


async def test_the_roles_run_as_their_users_of_the_shipped_acl_on_a_cluster(
    cluster: ClusterSet, partitions: list[aioredis.Redis], acl_users: None, sink: RecordingSink
) -> None:
    keys = all_keys()
    setup = subprocess.run(
        [sys.executable, "-m", "workers", "redis-setup", "--redis-url", role_url(cluster, "setup")],
        capture_output=True, text=True, env=child_env(), timeout=30, check=False,
    )  # fmt: skip
    assert setup.returncode == 0, setup.stderr
    async with ingest(role_url(cluster, "ingest"), partitions=PARTITIONS) as server:
        for n in range(PARTITIONS):
            assert (await send_one(server.port))[0] == 250, n
    assert [await c.xlen(k.receive) for c, k in zip(partitions, keys, strict=True)] == [1] * 6
    ids = [f"acl-{n}" for n in range(2 * PARTITIONS)]
    async with producer.send_partitions(role_url(cluster, "producer"), PARTITIONS) as sends:
        for message_id in ids:
            await producer.enqueue(sends, send_message([f"{message_id}@example.com"],
                                                       message_id=message_id))  # fmt: skip
    config = make_config(role_url(cluster, "delivery"), sink.url, partitions=PARTITIONS)
    async with running_worker(config):
        await wait_until(lambda: len(sink.received) >= len(ids), "every send delivered")
    status = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--redis-url", role_url(cluster, "monitor"),
         "--partitions", str(PARTITIONS)],
        capture_output=True, text=True, env=child_env(), timeout=30, check=False,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "email.send (all 6)" in status.stdout
