"""The Kubernetes deployment keeps passwords where only the process that needs them can read
them: files of the Secret, mounted read-only into the containers that use them, never an
environment variable, an argument, a URL or a ConfigMap value (see deploy/README.md,
Secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_deploy_render import (
    DEPLOY,
    KUSTOMIZATIONS,
    all_containers,
    mounted_secret_files,
    of_kind,
    render,
)
from workers.config import mask_secrets

READ_BY_OWNER_AND_GROUP = 0o440


@pytest.fixture(params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    path: Path = request.param
    return list(render(path))


def pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind(docs, "Deployment")
    ]


def test_no_password_is_a_variable_an_argument_or_a_setting(docs: list[dict[str, Any]]) -> None:
    for name, pod in pods(docs):
        for container in all_containers(pod):
            where = f"{name}/{container['name']}"
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef", {})
                assert "password" not in ref.get("key", ""), f"{where}: {var['name']} from {ref}"
                value = var.get("value", "")
                assert mask_secrets(value) == value, f"{where}: {var['name']} holds a password"
            assert not container.get("args"), f"{where}: arguments are visible in ps"
    for config_map in of_kind(docs, "ConfigMap"):
        for key, value in config_map.get("data", {}).items():
            assert "PASSWORD" not in key or key.endswith("_FILE"), f"{key} in a ConfigMap"
            assert mask_secrets(value) == value, f"{key} in a ConfigMap holds a password"


def test_password_files_are_read_only_mounts_of_the_secret(docs: list[dict[str, Any]]) -> None:
    """Every *_PASSWORD_FILE names a file of a mounted Secret; the mount is read-only and the
    files are readable by the pod's group only, which the pod's user belongs to."""
    checked = 0
    for name, pod in pods(docs):
        security = pod["securityContext"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in all_containers(pod):
            files = mounted_secret_files(docs, container)
            for var in container.get("env", []):
                if var["name"].endswith("_PASSWORD_FILE"):
                    assert var["value"] in files, f"{name}: {var['value']} is no Secret file"
                    checked += 1
            for mount in container.get("volumeMounts", []):
                if "secret" in volumes[mount["name"]]:
                    assert mount.get("readOnly") is True, f"{name}: {mount['name']} writable"
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == READ_BY_OWNER_AND_GROUP, name
                assert security["fsGroup"] == security["runAsGroup"], name
    assert checked == 5  # ingest, delivery (Redis and relay), housekeeping and its init container


def test_each_container_mounts_only_the_passwords_it_reads(docs: list[dict[str, Any]]) -> None:
    """No pod gets another role's password, and the init container's `setup` password is not
    mounted into the long-running housekeeping container."""
    for name, pod in pods(docs):
        for container in all_containers(pod):
            read = {v["value"] for v in container.get("env", []) if v["name"].endswith("_FILE")}
            mounted = set(mounted_secret_files(docs, container))
            assert mounted == read, f"{name}/{container['name']}: mounts {mounted - read} unread"
