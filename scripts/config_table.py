"""Print README's configuration tables from the config classes (tests keep README in sync)."""

from __future__ import annotations

import dataclasses
import sys

sys.path.insert(0, ".")

from workers.cli import COMMANDS
from workers.config import CommonConfig, env_name, flag_name

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def _default(field: dataclasses.Field[object]) -> str:
    if field.metadata.get("repeatable"):
        return "(none)"
    value = field.default
    if field.name in {"hostname", "consumer"}:
        return "host name" + (" + pid + random suffix" if field.name == "consumer" else "")
    if field.name == "data_dir":
        return "`.mailpool`"
    return "(none)" if value is None else f"`{value}`"


def table(title: str, config_class: type[CommonConfig], skip: set[str]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| flag | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for field in dataclasses.fields(config_class):
        if field.name in skip or field.name.startswith("_"):
            continue
        help_text = str(field.metadata.get("help", "")).replace("|", "\\|")
        lines.append(
            f"| `{flag_name(field)}` | `{env_name(field)}` | {_default(field)} | {help_text} |"
        )
    if len(lines) == 4:  # a header without rows is no table
        lines[2:] = ["Only the options of every command."]
    return [*lines, ""]


def render() -> str:
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    out = [BEGIN, *table("Every command", CommonConfig, set())]
    for command in COMMANDS:
        if command.name == "run":
            continue  # run takes the union of ingest and deliver options, plus --data-dir
        out += table(f"`mailpool {command.name}`", command.config, common)
    out.append(END)
    return "\n".join(out)


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the generated section of README; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    updated = text[:start] + render() + text[end:]
    if updated != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(updated)
    return updated != text


if __name__ == "__main__":
    if "--write" in sys.argv:
        print("README.md updated" if update_readme() else "README.md already up to date")
    else:
        print(render())
