"""The golden vectors of schema/ against our codec, our JSON Schemas and their generator.

Every valid vector must decode (wire.unpack + validate_*) to its JSON twin, every twin must
satisfy its JSON Schema, every invalid vector must be refused by our validator at the
documented path (and by the JSON Schema where the entry is msgpack at all), and
``schema/vectors/generate.py`` must reproduce the committed files byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis.asyncio as aioredis

from tests.corpus_util import corpus_files
from tests.schema_util import REPO_ROOT, SCHEMA_DIR, SCHEMA_FOR_KIND, VECTOR_DIR, generate
from tests.schema_util import entry_twin as _entry_twin
from tests.schema_util import read_json as _twin
from tests.schema_util import validator as _validator
from workers.codec import wire
from workers.codec.build import build_message
from workers.codec.errors import CodecError, WireError
from workers.codec.parse import parse_message
from workers.codec.validate import validate_receive, validate_send
from workers.streams import layout
from workers.verify.arc import ArcResult
from workers.verify.dkim import DkimResult
from workers.verify.dmarc import DmarcResult
from workers.verify.results import Verdicts
from workers.verify.spf import SpfResult
from workers.verify.verifier import authentication_results

INVALID_DIR = VECTOR_DIR / "invalid"
ENTRY_DIR = VECTOR_DIR / "entries"


def _names(directory: Path, suffix: str = ".msgpack") -> list[str]:
    return sorted(path.name.removesuffix(suffix) for path in directory.glob(f"*{suffix}"))


VALID = _names(VECTOR_DIR)
INVALID = _names(INVALID_DIR)
ENTRIES = _names(ENTRY_DIR, ".json")


def _entry_kind(name: str) -> str:
    return "dead-letter" if name.startswith("dead-letter") else "event"


# One step of an error path: ".name", "[3]" or "['odd:name']" (names that are not plain tokens).
_PATH_STEP = re.compile(r"\.?([a-z0-9][a-z0-9_-]*)|\[(\d+)\]|\['([^']*)'\]")


def _path_parts(path: str) -> tuple[str | int, ...]:
    """Our error path ("content.parts[1].body") as JSON Schema instance path parts."""
    parts: list[str | int] = []
    position = 0
    while position < len(path):
        step = _PATH_STEP.match(path, position)
        assert step is not None, f"unreadable path {path!r} at {position}"
        name, index, quoted = step.groups()
        parts.append(int(index) if index is not None else name if name is not None else quoted)
        position = step.end()
    return tuple(parts)


def _all_errors(
    errors: Iterator[jsonschema.ValidationError],
) -> Iterator[jsonschema.ValidationError]:
    for error in errors:
        yield error
        yield from _all_errors(iter(error.context or []))


# ---------------------------------------------------------------------------------------
# the schemas themselves


@pytest.mark.parametrize("name", [*sorted(SCHEMA_FOR_KIND.values()), "content.schema.json"])
def test_schema_files_are_valid_draft_2020_12(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(_twin(SCHEMA_DIR / name))


def test_the_vector_set_is_complete() -> None:
    index = _twin(VECTOR_DIR / "index.json")
    assert sorted(entry["name"] for entry in index) == VALID
    kinds = {entry["kind"] for entry in index}
    assert kinds == {"receive", "send"}
    assert len(VALID) >= 10 and len(INVALID) >= 10 and len(ENTRIES) >= 5


# ---------------------------------------------------------------------------------------
# generator


def test_generator_uses_the_real_encoder() -> None:
    assert generate.pack is wire.pack


def test_regenerating_gives_byte_identical_files() -> None:
    rendered = generate.render_all()
    on_disk = {
        path
        for path in VECTOR_DIR.rglob("*")
        if path.is_file() and path.suffix in (".msgpack", ".json")
    }
    assert on_disk == set(rendered), "stale or missing vector files: run schema/vectors/generate.py"
    for path, content in rendered.items():
        assert path.read_bytes() == content, f"{path.relative_to(REPO_ROOT)} differs"


def test_generator_notices_a_changed_file() -> None:
    rendered = generate.render_all()
    assert generate.differing(rendered) == []
    changed = VECTOR_DIR / "send-minimal.msgpack"
    rendered[changed] += b"\x00"
    assert generate.differing(rendered) == [changed]


# ---------------------------------------------------------------------------------------
# valid vectors


@pytest.mark.parametrize("name", VALID)
def test_vector_decodes_to_its_twin(name: str) -> None:
    data = (VECTOR_DIR / f"{name}.msgpack").read_bytes()
    twin = _twin(VECTOR_DIR / f"{name}.json")
    decoded = wire.unpack(data)
    assert generate.to_twin(decoded) == twin
    # Our encoder writes the twin back to the same octets.
    assert wire.pack(generate.from_twin(twin)) == data


@pytest.mark.parametrize("name", VALID)
def test_vector_passes_our_validator(name: str) -> None:
    decoded = wire.unpack((VECTOR_DIR / f"{name}.msgpack").read_bytes())
    validate = validate_receive if generate.kind_of(name) == "receive" else validate_send
    validated = generate.to_twin(validate(decoded))
    twin = _twin(VECTOR_DIR / f"{name}.json")
    # Every key the validator hands on keeps its value; only unknown keys may be left out.
    assert {key: value for key, value in twin.items() if key in validated} == validated
    assert set(validated) >= {"from", "to", "headers", "content"}


@pytest.mark.parametrize("name", VALID)
def test_twin_satisfies_its_json_schema(name: str) -> None:
    twin = _twin(VECTOR_DIR / f"{name}.json")
    _validator(generate.kind_of(name)).validate(twin)


@pytest.mark.parametrize("name", sorted(generate.SOURCES))
def test_receive_vector_is_what_the_parser_gives(name: str) -> None:
    source = generate.SOURCES[name]
    parsed = parse_message(
        source.raw,
        mail_from=source.mail_from,
        rcpt_tos=list(source.rcpt_tos),
        message_id=source.message_id,
        received_at=generate.RECEIVED_AT,
        keep_raw=source.keep_raw,
        auth=source.auth,
    )
    expected = generate.valid_vectors()[name]
    # Defect wording is free text; the paths they name are part of the contract.
    defect_paths = [defect.split(": ", 1)[0] for defect in parsed.pop("defects", [])]
    assert defect_paths == [defect.split(": ", 1)[0] for defect in expected.pop("defects", [])]
    assert dict(parsed) == expected


@pytest.mark.parametrize("path", corpus_files(), ids=lambda path: path.name)
def test_parsed_corpus_message_satisfies_the_receive_schema(path: Path) -> None:
    """What ingest stores for real-world mail (the CPython email corpus) fits the schema."""
    parsed = parse_message(path.read_bytes(), mail_from="", rcpt_tos=["bob@example.org"])
    twin = generate.to_twin(wire.unpack(wire.pack(parsed)))
    _validator("receive").validate(twin)


def _leaves(content: Mapping[str, Any]) -> list[tuple[str | None, bytes]]:
    """(filename, body octets) of every leaf, in tree order; str bodies as UTF-8."""
    if "parts" in content:
        return [leaf for part in content["parts"] for leaf in _leaves(part)]
    body = content["body"]
    return [(content.get("filename"), body.encode() if isinstance(body, str) else body)]


@pytest.mark.parametrize("name", [name for name in VALID if generate.kind_of(name) == "send"])
def test_send_vector_builds_and_parses_back(name: str) -> None:
    message = wire.unpack((VECTOR_DIR / f"{name}.msgpack").read_bytes())
    built = build_message(validate_send(message), default_id="1767225600250-0", now=0.0)
    assert built.mail_from == (message["from"] or "")
    assert built.recipients == message["to"]
    assert all(len(line) <= 998 for line in built.data.split(b"\r\n"))
    parsed = parse_message(built.data, mail_from=built.mail_from, rcpt_tos=built.recipients)
    assert "defects" not in parsed, parsed.get("defects")
    written = message.get("header_list") or list(message["headers"].items())
    for field_name, value in written:
        assert value in parsed["headers"][field_name.lower()].split("\n")
    assert _leaves(parsed["content"]) == _leaves(message["content"])


# ---------------------------------------------------------------------------------------
# invalid vectors


@pytest.mark.parametrize("name", INVALID)
def test_invalid_vector_is_refused_at_the_documented_path(name: str) -> None:
    data = (INVALID_DIR / f"{name}.msgpack").read_bytes()
    expected = _twin(INVALID_DIR / f"{name}.json")
    validate = validate_receive if expected["kind"] == "receive" else validate_send
    with pytest.raises(CodecError) as caught:
        validate(wire.unpack(data))
    error = caught.value
    assert isinstance(error, WireError) == (expected["stage"] == "wire"), repr(error)
    assert error.path == expected["path"], str(error)
    assert error.reason


@pytest.mark.parametrize(
    "name", [name for name in INVALID if _twin(INVALID_DIR / f"{name}.json")["stage"] == "schema"]
)
def test_invalid_twin_breaks_the_json_schema_at_or_above_the_path(name: str) -> None:
    expected = _twin(INVALID_DIR / f"{name}.json")
    twin = generate.to_twin(wire.unpack((INVALID_DIR / f"{name}.msgpack").read_bytes()))
    errors = list(_all_errors(_validator(expected["kind"]).iter_errors(twin)))
    assert errors, "the JSON Schema accepts an entry our validator refuses"
    target = _path_parts(expected["path"])
    locations = [tuple(error.absolute_path) for error in errors]
    assert any(target[: len(location)] == location for location in locations), locations


def test_path_parts_reads_our_path_syntax() -> None:
    assert _path_parts("content.parts[1].content-type") == ("content", "parts", 1, "content-type")
    assert _path_parts("header_list[1][1]") == ("header_list", 1, 1)
    assert _path_parts("headers['X-A:b']") == ("headers", "X-A:b")
    assert _path_parts("") == ()


# ---------------------------------------------------------------------------------------
# dead-letter and event entries


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_example_satisfies_its_schema(name: str) -> None:
    _validator(_entry_kind(name)).validate(_twin(ENTRY_DIR / f"{name}.json"))


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("dead-letter-rejected", {"reason": "bounced"}),
        ("dead-letter-rejected", {"smtp_code": "55"}),
        ("dead-letter-rejected", {"attempts": "one"}),
        ("dead-letter-rejected", {"source_id": "not-an-id"}),
        ("dead-letter-rejected", {"recipients": "ann@example.org"}),
        ("dead-letter-rejected", {"data": "not bin"}),
        ("event-deferred", {"next_attempt": None}),  # deferred without next_attempt
        ("event-delivered", {"next_attempt": "1767225661.5"}),  # only deferred has it
        ("event-delivered", {"event": "bounced"}),
        ("event-failed", {"time": "yesterday"}),
    ],
)
def test_entry_schema_refuses_a_broken_entry(name: str, change: dict[str, Any]) -> None:
    entry = _twin(ENTRY_DIR / f"{name}.json")
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    assert not _validator(_entry_kind(name)).is_valid(entry)


def test_dead_letter_data_is_the_original_entry() -> None:
    # The invalid example carries the same octets as the invalid header-injection vector.
    entry = generate.from_twin(_twin(ENTRY_DIR / "dead-letter-invalid.json"))
    with pytest.raises(CodecError) as caught:
        validate_send(wire.unpack(entry["data"]))
    assert entry["error"].startswith(f"{caught.value.path}: ")


@dataclass(frozen=True)
class _Reply:
    code: int | None
    text: str


async def test_entries_mailpool_writes_satisfy_the_schemas(redis: aioredis.Redis) -> None:
    """The delivery side's own field builders, through a real Redis, against the schemas."""
    data = (VECTOR_DIR / "send-minimal.msgpack").read_bytes()
    ref = layout.MessageRef("order-42", "1767225600250-0", data)
    now = 1767225601.5
    rejected = _Reply(550, "5.1.1 <ann@example.org>: Recipient address rejected")
    dead = [
        layout.dead_letter(
            ref, reason="rejected", error="refused", recipients=["ann@example.org"],
            attempts=1, first_attempt=now, last_attempt=now, reply=rejected,
        ),
        layout.dead_letter(
            layout.MessageRef("1767225600250-1", "1767225600250-1", b"\xc1"),
            reason="invalid", error="not msgpack", recipients=[], attempts=0,
            first_attempt=now, last_attempt=now,
        ),
    ]  # fmt: skip
    events = [
        layout.event("delivered", ref, ["ann@example.org"], _Reply(250, "2.0.0 Ok"), now),
        layout.event(
            "deferred", ref, ["bob@example.org"], _Reply(451, "4.3.0"), now, next_attempt=now + 60
        ),
        layout.event("failed", ref, ["ann@example.org"], rejected, now),
        layout.event("failed", ref, ["ann@example.org"], None, now),
        layout.event(
            "deferred", ref, ["bob@example.org"], _Reply(None, "timeout"), now, next_attempt=now
        ),
    ]
    for fields in dead:
        await redis.xadd("email.send.dead", fields)  # type: ignore[arg-type]
    for fields in events:
        await redis.xadd("email.send.events", fields)  # type: ignore[arg-type]

    read: Any = [await redis.xrange(key) for key in ("email.send.dead", "email.send.events")]
    dead_entries = [_entry_twin(fields) for _, fields in read[0]]
    event_entries = [_entry_twin(fields) for _, fields in read[1]]
    assert len(dead_entries) == len(dead) and len(event_entries) == len(events)
    for entry in dead_entries:
        _validator("dead-letter").validate(entry)
    for entry in event_entries:
        _validator("event").validate(entry)
    assert generate.from_twin(dead_entries[0]["data"]) == data
    assert json.loads(dead_entries[0]["recipients"]) == ["ann@example.org"]


def test_the_auth_vector_is_what_the_verifier_writes() -> None:
    """The ``auth`` map and Authentication-Results field of the receive-auth vector are what
    :class:`workers.verify.results.Verdicts` makes of those verdicts."""
    verdicts = Verdicts(
        SpfResult("pass", "mailfrom", "example.com"),
        SpfResult("none", "helo", "fwd.example.org"),
        (DkimResult("pass", "example.com", "e1", "ed25519-sha256"),),
        DmarcResult("pass", "example.com", "reject", ("dkim",)),
        ArcResult("none"),
    )
    assert verdicts.as_extension() == generate.AUTH_VERDICTS
    assert authentication_results(verdicts, "mx.example.net") == generate.AUTH_FIELD
