"""Columnar decoding: many Avro records of one schema into one polars DataFrame, in native code.

``Codec.decode`` reads one record at a time with fastavro, about 14 µs for a GpuSample on one core; the
sink and the stream app read tens of thousands a second, so that is their ceiling. Here the bodies of a
batch are framed as one block of an Avro object container file (header, schema, one block, sync marker)
and read by polars' Avro reader, about ten times faster.

A block has no per-record boundaries, so a record with bytes missing or left over would shift every record
after it (and polars ignores what is left at the end of a block). So each record is followed, inside the
block, by a marker: 8 random bytes drawn for the batch, read as one more field (an Avro ``fixed``) of the
record. A batch whose markers all read back was read record for record at the right boundaries (a
misaligned read matching 64 random bits by chance is as good as impossible). Anything else, and every
record this path does not take (another writer schema, a schema with maps, enums or wider unions, a failed
check), is left to ``Codec.decode`` one by one, which knows the exact errors; so the fast path changes
speed, never results.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import polars as pl

from bus.codec import (
    CONFLUENT_HEADER_LEN,
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_HEADER_LEN,
    SINGLE_OBJECT_MAGIC,
    Codec,
)

__all__ = ["Frame", "FrameDecoder", "FrameDecoders", "UnsupportedSchema", "python_values"]

_MIN_ROWS = 8
"""Below this many records the container framing costs more than it saves."""
_MARKER = "__aima_frame_end"
_MARKER_TYPE = {"type": "fixed", "name": "AimaFrameEnd", "namespace": "aima.frames", "size": 8}


class UnsupportedSchema(ValueError):
    """The schema uses a type polars cannot read (maps, enums) or this path does not vouch for (unions of
    more than null and one type)."""


@dataclass
class Frame:
    """What :meth:`FrameDecoder.decode` made of a batch."""

    record_name: str
    columns: pl.DataFrame | None
    """One row per record read here, in input order; None when none was."""
    rows: list[int] = field(default_factory=list)
    """For each row of ``columns``, the position of its record in the input."""
    rest: list[int] = field(default_factory=list)
    """Positions this path did not read: decode them one by one with ``Codec.decode``."""

    def records(self) -> list[dict[str, Any]]:
        """The rows as the values ``Codec.decode`` returns for them (timestamps UTC-aware with
        ``datetime.UTC``), in the order of :attr:`rows`."""
        if self.columns is None:
            return []
        values = [python_values(series) for series in self.columns.get_columns()]
        names = self.columns.columns
        return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


def python_values(series: pl.Series) -> list[Any]:
    """A column's values as ``Codec.decode`` gives them (timestamps UTC-aware with ``datetime.UTC``)."""
    if isinstance(series.dtype, pl.Datetime) and series.dtype.time_zone is not None:
        naive = series.dt.replace_time_zone(None).to_list()
        return [None if v is None else v.replace(tzinfo=UTC) for v in naive]
    return series.to_list()


class FrameDecoder:
    """Reads batches of ``record_name`` records written with the codec's own schema of that name."""

    def __init__(self, codec: Codec, record_name: str) -> None:
        self._codec = codec
        writer = codec.local_writer(record_name)
        self.record_name = writer.name
        schema = json.loads(writer.json)
        self._enums = _enums_as_ints(schema)
        _check_supported(schema, _names(schema))
        fields = [f["name"] for f in schema["fields"]]
        schema["fields"] = [*schema["fields"], {"name": _MARKER, "type": _MARKER_TYPE}]
        self._header = _container_header(json.dumps(schema))
        self._fields = fields
        self._fingerprint = writer.fingerprint
        try:
            pl.read_avro(io.BytesIO(self._container([], b"\0" * 8)))
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
            raise UnsupportedSchema(f"polars cannot read {self.record_name}: {exc}") from exc

    def decode(self, values: Sequence[bytes | None]) -> Frame:
        """Read every value whose framing names the codec's own writer schema; list the others in
        ``rest``. Never raises for bad records: those end up in ``rest``."""
        bodies: list[bytes] = []
        rows: list[int] = []
        rest: list[int] = []
        own_ids = self._codec.schema_ids_of(self.record_name)
        for position, value in enumerate(values):
            if not value:
                rest.append(position)
            elif value[:2] == SINGLE_OBJECT_MAGIC and value[2:SINGLE_OBJECT_HEADER_LEN] == self._fingerprint:
                bodies.append(value[SINGLE_OBJECT_HEADER_LEN:])
                rows.append(position)
            elif (
                value[:1] == CONFLUENT_MAGIC
                and len(value) > CONFLUENT_HEADER_LEN
                and int.from_bytes(value[1:CONFLUENT_HEADER_LEN], "big") in own_ids
            ):
                bodies.append(value[CONFLUENT_HEADER_LEN:])
                rows.append(position)
            else:
                rest.append(position)
        if len(bodies) < _MIN_ROWS:
            return Frame(self.record_name, None, [], sorted(rest + rows))
        columns = self._read(bodies)
        if columns is None:
            return Frame(self.record_name, None, [], sorted(rest + rows))
        return Frame(self.record_name, columns, rows, rest)

    def _container(self, bodies: list[bytes], marker: bytes) -> bytes:
        block = marker.join(bodies) + marker if bodies else b""
        sync = os.urandom(16)
        return b"".join((self._header, sync, _long(len(bodies)), _long(len(block)), block, sync))

    def _read(self, bodies: list[bytes]) -> pl.DataFrame | None:
        """The bodies as columns, or None when they do not read back record for record."""
        marker = os.urandom(8)
        try:
            frame = pl.read_avro(io.BytesIO(self._container(bodies, marker)))
            if frame.height != len(bodies):
                return None
            if not frame.select((pl.col(_MARKER) == pl.lit(marker)).all()).item():
                return None
            frame = frame.select(self._fields)
            if self._enums:
                # Back from each enum's index to its symbol; an index out of range is a bad record.
                frame = frame.with_columns(
                    pl.col(name).replace_strict(list(range(len(symbols))), symbols, return_dtype=pl.String)
                    for name, symbols in self._enums
                )
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError, ValueError, OverflowError):
            # Garbage, a truncated record, invalid UTF-8 or an enum index out of range somewhere in the
            # batch (polars' reader panics on some malformed input rather than raising).
            return None
        return frame


class FrameDecoders:
    """One :class:`FrameDecoder` per record name, made at first need; None for a schema this path does
    not read (its records are decoded one by one)."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._made: dict[str, FrameDecoder | None] = {}

    def get(self, record_name: str) -> FrameDecoder | None:
        if record_name not in self._made:
            try:
                self._made[record_name] = FrameDecoder(self._codec, record_name)
            except UnsupportedSchema:
                self._made[record_name] = None
        return self._made[record_name]


# -- what this path reads ---------------------------------------------------------------------------------


def _names(schema: Any, found: dict[str, Any] | None = None) -> dict[str, Any]:
    """Named types (records, enums, fixed) by full and short name, for references like ``"GpuProcess"``."""
    found = {} if found is None else found
    if isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed") and "name" in schema:
            namespace = schema.get("namespace")
            name = schema["name"]
            found[name] = schema
            if namespace and "." not in name:
                found[f"{namespace}.{name}"] = schema
        for value in schema.values():
            _names(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _names(value, found)
    return found


def _enums_as_ints(schema: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Make the record's own enum fields (or null-or-enum) read as ints: polars' reader panics on enums,
    and an enum is written as its symbol's index, exactly as an int. Returns (field, symbols) of each, to
    map the indexes back. Enums deeper down stay, and make the schema unsupported."""
    found = []
    for spec in schema["fields"]:
        kind = spec["type"]
        branches = kind if isinstance(kind, list) else [kind]
        for index, branch in enumerate(branches):
            if isinstance(branch, dict) and branch.get("type") == "enum":
                found.append((spec["name"], list(branch["symbols"])))
                branches[index] = "int"
        spec["type"] = branches if isinstance(kind, list) else branches[0]
        spec.pop("default", None)  # the writer's schema reads no defaults; an enum's is not an int
    return found


def _check_supported(schema: Any, names: dict[str, Any]) -> None:
    """UnsupportedSchema for what polars' Avro reader cannot read (maps; enums, on which it panics) or
    this path does not vouch for (unions other than null and one type)."""
    if isinstance(schema, str):
        if schema in names:
            _check_supported(names[schema], {k: v for k, v in names.items() if v is not names[schema]})
        return
    if isinstance(schema, list):
        branches = [branch for branch in schema if branch != "null"]
        if len(schema) != 2 or len(branches) != 1:
            raise UnsupportedSchema(f"union {schema}")
        _check_supported(branches[0], names)
        return
    kind = schema["type"]
    if kind in ("map", "enum"):
        raise UnsupportedSchema(kind)
    if kind == "record":
        for f in schema["fields"]:
            _check_supported(f["type"], names)
    elif kind == "array":
        _check_supported(schema["items"], names)
    elif isinstance(kind, dict | list):
        _check_supported(kind, names)


# -- container framing -----------------------------------------------------------------------------------


def _long(n: int) -> bytes:
    zigzag = (n << 1) ^ (n >> 63)
    out = bytearray()
    while zigzag & ~0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def _bytes(data: bytes) -> bytes:
    return _long(len(data)) + data


def _container_header(schema_json: str) -> bytes:
    """The object container file's header up to (without) the sync marker: magic and metadata map."""
    meta = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}
    entries = b"".join(_bytes(key) + _bytes(value) for key, value in meta.items())
    return b"Obj\x01" + _long(len(meta)) + entries + _long(0)
