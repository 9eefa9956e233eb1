"""Every released schema version is kept in avro/history/, and avro/ stays compatible with all of them (T3,
T6): a new reader reads old records, and a reader deployed before a change reads the new ones.

Two checks per pair (current schema, history version), each in both directions: Avro's resolution rules
checked on the schemas themselves (fields a reader lacks in the writer need defaults, enum symbols a writer
may use must be known or defaulted, types must match or promote), and records generated from the writer
schema written with it and read with the other as reader schema by fastavro."""

from __future__ import annotations

import copy
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many

from bus import schemas
from bus.settings import REPO_ROOT

_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}
_GENERATED = 200


def _named(schema: Any, found: dict[str, Any]) -> dict[str, Any]:
    """Named types of a schema by short and full name (references like ``"GpuProcess"``)."""
    if isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            found[schema["name"]] = schema
            if schema.get("namespace"):
                found[f"{schema['namespace']}.{schema['name']}"] = schema
        for value in schema.values():
            _named(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _named(value, found)
    return found


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return schema["type"] if isinstance(schema["type"], str) else _kind(schema["type"])
    return schema


def resolution_problems(writer: Any, reader: Any, path: str = "") -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader`` under Avro's schema resolution;
    empty when it can."""
    return _problems(writer, reader, path, _named(writer, {}), _named(reader, {}))


def _problems(w: Any, r: Any, path: str, wn: dict[str, Any], rn: dict[str, Any]) -> list[str]:
    w = wn.get(w, w) if isinstance(w, str) else w
    r = rn.get(r, r) if isinstance(r, str) else r
    wk, rk = _kind(w), _kind(r)
    here = path or "<top>"
    if wk == "union":
        # Every branch the writer may take must resolve against the reader.
        return [p for branch in w for p in _problems(branch, r, path, wn, rn)]
    if rk == "union":
        if any(not _problems(w, branch, path, wn, rn) for branch in r):
            return []
        return [f"{here}: writer type {wk} matches no branch of the reader's union"]
    if wk != rk:
        if rk in _PROMOTIONS.get(wk, set()):
            return []
        return [f"{here}: writer type {wk} cannot be read as {rk}"]
    if isinstance(w, dict) and isinstance(r, dict) and isinstance(w.get("type"), dict | list):
        return _problems(w["type"], r["type"], path, wn, rn)
    if wk == "record":
        found = []
        if w["name"] != r["name"]:
            found.append(f"{here}: record {w['name']} read as {r['name']}")
        written = {field["name"]: field for field in w["fields"]}
        for field in r["fields"]:
            inner = f"{path}.{field['name']}" if path else field["name"]
            if field["name"] in written:
                found += _problems(written[field["name"]]["type"], field["type"], inner, wn, rn)
            elif "default" not in field:
                found.append(f"{inner}: the reader needs it, the writer lacks it and it has no default")
        return found
    if wk == "enum":
        missing = set(w["symbols"]) - set(r["symbols"])
        if missing and "default" not in r:
            return [f"{here}: the reader's enum lacks {sorted(missing)} and has no default"]
        return []
    if wk == "array":
        return _problems(w["items"], r["items"], f"{path}[]", wn, rn)
    if wk == "map":
        return _problems(w["values"], r["values"], f"{path}{{}}", wn, rn)
    if wk == "fixed" and w.get("size") != r.get("size"):
        return [f"{here}: fixed size {w.get('size')} read as {r.get('size')}"]
    if isinstance(w, dict) and isinstance(r, dict) and w.get("logicalType") != r.get("logicalType"):
        return [f"{here}: logical type {w.get('logicalType')} read as {r.get('logicalType')}"]
    return []


def records_unreadable(writer: dict[str, Any], reader: dict[str, Any], count: int = _GENERATED) -> str | None:
    """Records generated from ``writer``, written with it and read as ``reader`` by fastavro; the first
    failure, or None when every one reads."""
    parsed_writer, parsed_reader = (
        fastavro.parse_schema(copy.deepcopy(writer)),
        fastavro.parse_schema(copy.deepcopy(reader)),
    )
    for record in generate_many(copy.deepcopy(writer), count):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed_writer, record)
        out.seek(0)
        try:
            fastavro.schemaless_reader(out, parsed_writer, parsed_reader)
        except Exception as exc:  # fastavro's resolution errors and what bad reads raise alike
            return f"{type(exc).__name__}: {exc}"
    return None


def _pairs() -> list[tuple[str, Path, dict[str, Any], dict[str, Any]]]:
    current = {name.rsplit(".", 1)[-1]: schemas.raw(name) for name in schemas.names()}
    return [
        (schema["name"], path, current[schema["name"]], schema)
        for path, schema in schemas.history_files()
        if schema["name"] in current
    ]


# -- the history folder ----------------------------------------------------------------------------------


def test_every_current_schema_is_in_the_history() -> None:
    kept = {schemas.fingerprint_of(schema) for schema in schemas.history()}
    for name in schemas.names():
        short = name.rsplit(".", 1)[-1]
        expected = f"avro/history/{short}.{schemas.fingerprint(name).hex()}.avsc"
        assert schemas.fingerprint(name) in kept, (
            f"avro/{short}.avsc is not in the history: copy it to {expected} (see avro/README.md)"
        )


def test_history_files_are_named_after_their_fingerprint() -> None:
    files = schemas.history_files()  # raises for a misnamed file
    assert files
    for path, schema in files:
        assert path.read_text(encoding="utf-8").strip(), path
        assert schemas.fingerprint_of(schema).hex() in path.name


def _committed_versions(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every version of ``path`` git has committed (newest first); empty outside a git checkout."""
    try:
        commits = subprocess.run(
            ["git", "log", "--format=%H", "--", path],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    versions = []
    for commit in commits:
        shown = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        if shown.returncode == 0:
            versions.append((commit[:10], json.loads(shown.stdout)))
    return versions


@pytest.mark.skipif(schemas.schema_dir() != REPO_ROOT / "avro", reason="not the repository's avro/")
def test_every_committed_version_is_in_the_history() -> None:
    """An avro/X.avsc that changed without its previous version copied to the history fails here."""
    kept = {schemas.fingerprint_of(schema) for schema in schemas.history()}
    for name in schemas.names():
        short = name.rsplit(".", 1)[-1]
        for commit, schema in _committed_versions(f"avro/{short}.avsc"):
            fingerprint = schemas.fingerprint_of(schema).hex()
            assert schemas.fingerprint_of(schema) in kept, (
                f"avro/{short}.avsc as of {commit} is missing from the history: restore it as "
                f"avro/history/{short}.{fingerprint}.avsc"
            )


# -- compatibility with every kept version --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path", "current", "kept"), _pairs(), ids=[path.name for _, path, _, _ in _pairs()]
)
def test_current_schema_is_compatible_with_every_kept_version(
    name: str, path: Path, current: dict[str, Any], kept: dict[str, Any]
) -> None:
    new_reads_old = resolution_problems(kept, current)
    old_reads_new = resolution_problems(current, kept)
    assert not new_reads_old, (
        f"avro/{name}.avsc cannot read records written with {path.name}: {new_reads_old}"
    )
    assert not old_reads_new, (
        f"readers of {path.name} cannot read records of avro/{name}.avsc: {old_reads_new}"
    )
    assert records_unreadable(kept, current) is None, f"avro/{name}.avsc reading {path.name} records"
    assert records_unreadable(current, kept) is None, f"{path.name} reading avro/{name}.avsc records"


# -- the checks catch what they must --------------------------------------------------------------------


def _queue() -> dict[str, Any]:
    return schemas.raw("QueueSample")


def _with_field(schema: dict[str, Any], field: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(schema)
    changed["fields"].append(field)
    return changed


def test_an_optional_field_with_a_default_is_compatible_both_ways() -> None:
    new = _with_field(_queue(), {"name": "priority", "type": ["null", "string"], "default": None})
    for writer, reader in ((_queue(), new), (new, _queue())):
        assert resolution_problems(writer, reader) == []
        assert records_unreadable(writer, reader) is None


def test_a_field_without_a_default_is_caught() -> None:
    new = _with_field(_queue(), {"name": "priority", "type": "string"})
    assert resolution_problems(_queue(), new)  # a new reader cannot read old records
    assert records_unreadable(_queue(), new) is not None
    removed = copy.deepcopy(_queue())
    removed["fields"] = [f for f in removed["fields"] if f["name"] != "queue"]
    assert resolution_problems(removed, _queue())  # an old reader needs the removed field
    assert records_unreadable(removed, _queue()) is not None


def test_a_changed_type_or_a_removed_enum_symbol_is_caught() -> None:
    retyped = copy.deepcopy(_queue())
    for field in retyped["fields"]:
        if field["name"] == "length_jobs":
            field["type"] = "string"
    assert resolution_problems(_queue(), retyped) and resolution_problems(retyped, _queue())
    assert records_unreadable(_queue(), retyped) is not None

    event = schemas.raw("JobEvent")
    fewer = copy.deepcopy(event)
    for field in fewer["fields"]:
        if field["name"] == "event":
            field["type"]["symbols"] = field["type"]["symbols"][:1]
    assert resolution_problems(event, fewer)  # an old writer may send a symbol the new reader lacks
    assert resolution_problems(fewer, event) == []
    widened = copy.deepcopy(_queue())
    for field in widened["fields"]:
        if field["name"] == "length_jobs":
            field["type"] = "long"
    assert resolution_problems(_queue(), widened) == []  # int -> long promotes
    assert resolution_problems(widened, _queue())  # long -> int does not
