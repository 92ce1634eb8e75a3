"""deploy/Dockerfile, checked without building it.

tests/test_image_podman.py builds the image and runs it; these checks are the ones a build
would not catch: the stages and their instructions (no build tools in the runtime stage,
a numeric non-root user), that the builder stage copies everything the wheel build needs
(and the .dockerignore lets it through, and nothing else), and the HEALTHCHECK command
itself, failing as well as passing, against the real /healthz endpoint of
:mod:`workers.health`.
"""

from __future__ import annotations

import ast
import asyncio
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workers.health import HealthServer

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
RUNTIME_IMAGE = "python:3.11-slim"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "clang", "apt-get install", "curl")


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions per stage: continuation lines joined, comments dropped, ARGs applied."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            image, *alias = rest.split()
            for name, value in args.items():
                image = image.replace("${" + name + "}", value).replace("$" + name, value)
            stages.append(Stage(image, alias[1] if alias and alias[0].upper() == "AS" else None))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_two_stages_wheel_built_then_installed(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder.name and builder.image == runtime.image == RUNTIME_IMAGE
    # The builder makes the project's wheel and gathers (or builds: dkimpy is an sdist) the
    # wheels of its dependencies; the runtime installs from those alone, offline.
    assert any("pip wheel" in run and "--wheel-dir" in run for run in builder.all("RUN"))
    copies = runtime.all("COPY")
    assert any(c.startswith(f"--from={builder.name} ") for c in copies), "wheel from the builder"
    assert not [c for c in copies if not c.startswith("--from=")], "no sources in the runtime"
    assert any(
        "pip install" in run and "--no-index" in run and "--find-links" in run
        for run in runtime.all("RUN")
    )


def test_runtime_stage_has_no_build_tools(stages: list[Stage]) -> None:
    for run in stages[-1].all("RUN"):
        for tool in BUILD_TOOLS:
            assert tool not in run, f"runtime stage runs {tool!r}: {run}"


def test_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    # Kubernetes can verify runAsNonRoot only for a numeric user.
    assert uid.isdigit() and int(uid) == 10001
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # Nothing after USER switches back.
    last = max(i for i, (kw, _) in enumerate(stages[-1].instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in stages[-1].instructions[last + 1 :])


def test_ports_entrypoint_and_healthcheck_declared(stages: list[Stage]) -> None:
    runtime = stages[-1]
    exposed = {port for line in runtime.all("EXPOSE") for port in line.split()}
    assert exposed == {"2525", "8080"}
    assert exec_form(runtime.all("ENTRYPOINT")[-1]) == ["mailpool"]
    check = runtime.all("HEALTHCHECK")[-1]
    assert "CMD" in check and "/healthz" in check
    assert "curl" not in check and "wget" not in check
    assert exec_form(check.partition("CMD")[2].strip())[0] == "python"
    env = " ".join(runtime.all("ENV"))
    assert "MAILPOOL_HTTP=0.0.0.0:8080" in env, "the health endpoint is on by default"


def test_entrypoint_is_the_package_script() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mailpool"] == "workers.cli:main"


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes; a match on a parent
    directory covers what is inside it."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes) or (
            body.startswith("**/") and fnmatch.fnmatchcase(parts[-1], body[3:])
        ):
            result = not negate
    return result


def test_builder_gets_everything_the_wheel_needs(stages: list[Stage]) -> None:
    """pyproject.toml, the readme it names and every package directory reach the builder."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed.add(pattern.rstrip("*"))
    copied: set[str] = set()
    for line in stages[0].all("COPY"):
        *sources, _dest = shlex.split(line)
        copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in sorted(needed):
        assert path in copied, f"the builder does not COPY {path}"
        assert (REPO / path).exists(), f"{path} is missing from the repository"
        assert not ignored(path, patterns), f".dockerignore drops {path}"
        if (REPO / path).is_dir():
            assert not ignored(f"{path}/cli.py", patterns), f".dockerignore drops {path}/*"
    # And the ignore file keeps the rest of the tree (tests, .git, caches) out of the context.
    for noise in (".git", "tests/conftest.py", ".venv", "workers/__pycache__/x.pyc"):
        assert ignored(noise, patterns), f"{noise} would be sent to the Docker daemon"


def healthcheck_command(stages: list[Stage]) -> list[str]:
    check = stages[-1].all("HEALTHCHECK")[-1]
    command = exec_form(check.partition("CMD")[2].strip())
    return [sys.executable, *command[1:]]  # the image's `python` is this interpreter here


async def run_check(command: list[str], http: str) -> int:
    env = {**os.environ, "MAILPOOL_HTTP": http}
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), timeout=20)


async def always_ready() -> bool:
    return True


async def test_healthcheck_passes_on_a_live_worker_and_fails_otherwise(
    stages: list[Stage],
) -> None:
    command = healthcheck_command(stages)
    server = HealthServer("127.0.0.1:0", always_ready)
    await server.start()
    try:
        assert await run_check(command, f"0.0.0.0:{server.port}") == 0
    finally:
        await server.close()
    # Nothing listening any more: the check must report unhealthy.
    assert await run_check(command, f"0.0.0.0:{server.port}") != 0


async def test_healthcheck_fails_on_an_error_status(stages: list[Stage]) -> None:
    async def answer_500(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_500, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await run_check(healthcheck_command(stages), f"0.0.0.0:{port}") != 0
    finally:
        server.close()
        await server.wait_closed()


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_declares_every_third_party_import() -> None:
    """The image installs only the wheel and its declared dependencies: anything workers/
    imports from outside the standard library must be among them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        normalized(re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0]) for d in project["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for path in (REPO / "workers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"workers"}
    assert third_party, "workers imports nothing from outside the standard library?"
    for module in sorted(third_party):
        owners = {normalized(d) for d in distributions.get(module, [module])}
        assert owners & declared, f"workers imports {module} but pyproject does not depend on it"
