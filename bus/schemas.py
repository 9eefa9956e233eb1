"""The Avro contract as loaded from ``avro/*.avsc``: parsed schemas by full name, their JSON, and their
CRC-64-AVRO fingerprints. Each ``.avsc`` file stands alone (named types used by several records are defined
again in each file), so every file parses on its own.

Single-object records carry only their writer's fingerprint, so a reader must still know a schema after it
changed: every released version of ``avro/X.avsc`` is kept as ``avro/history/X.<fingerprint hex>.avsc``
(the current one too; copy it there when it is released), the codec accepts every schema found there as a
writer, and tests/unit/test_schema_history.py fails when a schema changed incompatibly with one of them or
its previous version is missing there. Readers deployed before a change learn the new schema from the
schemas topic (bus/schema_log.py) instead. ``AIMA_SCHEMA_DIR`` points a process at another folder of
schemas (tests, tools that work with another version of the contract)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint as _fingerprint_hex
from fastavro.schema import to_parsing_canonical_form

import bus
from bus.errors import UnknownSchema

__all__ = [
    "NAMESPACE",
    "all_schemas",
    "canonical_form",
    "fingerprint",
    "fingerprint_of",
    "full_name",
    "history",
    "history_files",
    "load",
    "names",
    "raw",
    "schema_dir",
    "schema_json",
]

NAMESPACE = "aima.metrics"


def schema_dir() -> Path:
    """Where the ``.avsc`` files are: ``AIMA_SCHEMA_DIR`` when set, else inside the installed package (the
    wheel force-includes ``avro/`` as ``bus/avro``), else the repository's top-level ``avro/`` (source
    checkout, editable install). Read once per process, as the schemas themselves are."""
    return _schema_dir()


@cache
def _schema_dir() -> Path:
    from bus.settings import Settings

    configured = Settings().schema_dir
    if configured is not None:
        return configured
    packaged = Path(bus.__file__).resolve().parent / "avro"
    if packaged.is_dir():
        return packaged
    return Path(bus.__file__).resolve().parent.parent / "avro"


@cache
def _raw_by_name() -> dict[str, dict[str, Any]]:
    folder = schema_dir()
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.avsc")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        name = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
        if path.stem != schema["name"]:
            raise ValueError(f"{path} defines {name}; the file must be named {schema['name']}.avsc")
        found[name] = schema
    if not found:
        raise FileNotFoundError(f"no Avro schemas (*.avsc) in {folder}")
    return found


@cache
def history() -> tuple[dict[str, Any], ...]:
    """Every released version of the schemas (``avro/history/*.avsc``), still decodable as writers."""
    return tuple(schema for _, schema in history_files())


@cache
def history_files() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """``avro/history/*.avsc`` with their schemas; ValueError for a file not named
    ``<Name>.<fingerprint hex>.avsc`` after what it holds."""
    found = []
    for path in sorted((schema_dir() / "history").glob("*.avsc")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        expected = f"{schema['name']}.{fingerprint_of(schema).hex()}.avsc"
        if path.name != expected:
            raise ValueError(f"{path} holds {schema['name']} with that fingerprint: name it {expected}")
        found.append((path, schema))
    return tuple(found)


def full_name(name: str) -> str:
    """``GpuSample`` or ``aima.metrics.GpuSample`` -> ``aima.metrics.GpuSample``; UnknownSchema otherwise."""
    known = _raw_by_name()
    if name in known:
        return name
    qualified = f"{NAMESPACE}.{name}"
    if qualified in known:
        return qualified
    raise UnknownSchema(f"unknown Avro record {name!r}; known: {', '.join(sorted(known))}")


def names() -> tuple[str, ...]:
    """Full names of every schema in ``avro/``."""
    return tuple(sorted(_raw_by_name()))


def raw(name: str) -> dict[str, Any]:
    """The schema as written in its file (a copy: callers may not change the cached one)."""
    return json.loads(schema_json(name))


def schema_json(name: str) -> str:
    """The schema's JSON text with its docs, as registered in a Schema Registry."""
    return _schema_json(full_name(name))


@cache
def _schema_json(name: str) -> str:
    return json.dumps(_raw_by_name()[name], ensure_ascii=False, separators=(",", ":"))


def load(name: str) -> dict[str, Any]:
    """The schema parsed by fastavro, ready for its readers and writers (one shared object per schema)."""
    return _load(full_name(name))


@cache
def _load(name: str) -> dict[str, Any]:
    return fastavro.parse_schema(json.loads(_schema_json(name)))


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every parsed schema by full name."""
    return {name: load(name) for name in names()}


def canonical_form(schema: dict[str, Any] | str) -> str:
    """Avro's Parsing Canonical Form, the text fingerprints are computed over."""
    return to_parsing_canonical_form(schema)


def fingerprint_of(schema: dict[str, Any] | str) -> bytes:
    """CRC-64-AVRO (Rabin) fingerprint of any schema's canonical form, as the 8 little-endian bytes the
    single-object encoding carries (fastavro's hex is already little-endian, like the Java library)."""
    return bytes.fromhex(_fingerprint_hex(canonical_form(schema), "CRC-64-AVRO"))


def fingerprint(name: str) -> bytes:
    """Fingerprint of a schema in ``avro/`` by name."""
    return _fingerprint(full_name(name))


@cache
def _fingerprint(name: str) -> bytes:
    return fingerprint_of(_raw_by_name()[name])
