"""Columnar decoding: many Avro records of one schema into one polars DataFrame, in native code.

``Codec.decode`` reads one record at a time with fastavro, about 14 µs for a GpuSample on one core; the
sink and the stream app read tens of thousands a second, so that is their ceiling. Here the bodies of a
batch are framed as one block of an Avro object container file (header, schema, one block, sync marker)
and read by polars' Avro reader, about ten times faster.

A block has no per-record boundaries, so a record with bytes missing or left over would shift every record
after it. Each decoded row's canonical encoded size is therefore computed back from its values (with polars
expressions derived from the schema) and compared with the record's own length: a batch whose sizes all
match was read record for record at the right boundaries. Anything else, and every record this path does
not take (another writer schema, a schema with maps or wider unions, a failed check), is left to
``Codec.decode`` one by one, which knows the exact errors; so the fast path changes speed, never results.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from functools import reduce
from typing import Any

import polars as pl

from bus.codec import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, Codec

__all__ = ["Frame", "FrameDecoder", "UnsupportedSchema"]

_SINGLE_HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8
_CONFLUENT_HEADER_LEN = len(CONFLUENT_MAGIC) + 4
_MIN_ROWS = 8
"""Below this many records the container framing costs more than it saves."""


class UnsupportedSchema(ValueError):
    """The schema uses a type this path does not size (maps, unions of more than null and one type)."""


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
        values = []
        for series in self.columns.get_columns():
            if isinstance(series.dtype, pl.Datetime) and series.dtype.time_zone is not None:
                naive = series.dt.replace_time_zone(None).to_list()
                values.append([None if v is None else v.replace(tzinfo=UTC) for v in naive])
            else:
                values.append(series.to_list())
        names = self.columns.columns
        return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


class FrameDecoder:
    """Reads batches of ``record_name`` records written with the codec's own schema of that name."""

    def __init__(self, codec: Codec, record_name: str) -> None:
        self._codec = codec
        writer = codec.local_writer(record_name)
        self.record_name = writer.name
        schema = json.loads(writer.json)
        self._size = _fields_size(schema, pl.col, _names(schema))
        self._header = _container_header(writer.json)
        self._fingerprint = writer.fingerprint
        try:
            pl.read_avro(io.BytesIO(self._container([])))
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
            elif value[:2] == SINGLE_OBJECT_MAGIC and value[2:_SINGLE_HEADER_LEN] == self._fingerprint:
                bodies.append(value[_SINGLE_HEADER_LEN:])
                rows.append(position)
            elif (
                value[:1] == CONFLUENT_MAGIC
                and len(value) > _CONFLUENT_HEADER_LEN
                and int.from_bytes(value[1:_CONFLUENT_HEADER_LEN], "big") in own_ids
            ):
                bodies.append(value[_CONFLUENT_HEADER_LEN:])
                rows.append(position)
            else:
                rest.append(position)
        if len(bodies) < _MIN_ROWS:
            return Frame(self.record_name, None, [], sorted(rest + rows))
        columns = self._read(bodies)
        if columns is None:
            return Frame(self.record_name, None, [], sorted(rest + rows))
        return Frame(self.record_name, columns, rows, rest)

    def _container(self, bodies: list[bytes]) -> bytes:
        block = b"".join(bodies)
        sync = os.urandom(16)
        return b"".join((self._header, sync, _long(len(bodies)), _long(len(block)), block, sync))

    def _read(self, bodies: list[bytes]) -> pl.DataFrame | None:
        """The bodies as columns, or None when they do not read back record for record."""
        try:
            frame = pl.read_avro(io.BytesIO(self._container(bodies)))
            if frame.height != len(bodies):
                return None
            sizes = frame.select(self._size.alias("size")).to_series()
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError, ValueError, OverflowError):
            # Garbage, a truncated record or invalid UTF-8 somewhere in the batch (polars' reader panics
            # on some malformed input rather than raising).
            return None
        expected = pl.Series(values=[len(body) for body in bodies], dtype=pl.Int64)
        if sizes.null_count() or not (sizes.cast(pl.Int64) == expected).all():
            return None
        return frame


# -- canonical encoded sizes ------------------------------------------------------------------------------


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


def _varint_size(zigzag_source: pl.Expr) -> pl.Expr:
    """Bytes of the zigzag varint of an integer expression: ceil(bits(z) / 7), at least 1. With
    u = v for v >= 0, else -(v + 1), the zigzag value z = 2u + sign has bits(u) + 1 bits (u > 0), so the
    size is (bits(u) + 7) // 7, which is 1 for u = 0 as well."""
    v = zigzag_source.cast(pl.Int64)
    u = pl.when(v >= 0).then(v).otherwise(-(v + 1))
    bits = 64 - u.bitwise_leading_zeros().cast(pl.Int64)
    return (bits + 7) // 7


def _size(schema: Any, value: pl.Expr, names: dict[str, Any]) -> pl.Expr:
    if isinstance(schema, str):
        if schema in names:
            return _size(names[schema], value, names)
        return _primitive_size(schema, value)
    if isinstance(schema, list):
        branches = [branch for branch in schema if branch != "null"]
        if len(schema) != 2 or len(branches) != 1:
            raise UnsupportedSchema(f"union {schema}")
        # A union index below 64 is one varint byte; null adds nothing.
        present = _size(branches[0], value, names)
        return pl.lit(1, pl.Int64) + pl.when(value.is_null()).then(0).otherwise(present)
    kind = schema["type"]
    if kind == "record":
        return _record_size(schema, value, names)
    if kind == "array":
        item = _size(schema["items"], pl.element(), names)
        count = value.list.len()
        items = value.list.eval(item).list.sum().cast(pl.Int64)
        # One block (count, items) then the zero that ends the array; an empty array is the zero alone.
        return pl.when(count == 0).then(1).otherwise(_varint_size(count * 1) + items + 1)
    if kind == "enum":
        # polars' reader panics on enum values (it reads the schema, not the data).
        raise UnsupportedSchema(f"enum {schema['name']}")
    if kind == "fixed":
        return pl.lit(int(schema["size"]), pl.Int64)
    if kind in ("map",):
        raise UnsupportedSchema("map")
    return _primitive_size(kind, value)


def _primitive_size(kind: str, value: pl.Expr) -> pl.Expr:
    if kind == "null":
        return pl.lit(0, pl.Int64)
    if kind == "boolean":
        return pl.lit(1, pl.Int64)
    if kind in ("int", "long"):
        return _varint_size(value)
    if kind == "float":
        return pl.lit(4, pl.Int64)
    if kind == "double":
        return pl.lit(8, pl.Int64)
    if kind == "string":
        length = value.str.len_bytes().cast(pl.Int64)
        return _varint_size(length) + length
    if kind == "bytes":
        length = value.bin.size().cast(pl.Int64)
        return _varint_size(length) + length
    raise UnsupportedSchema(f"type {kind}")


def _record_size(schema: dict[str, Any], value: pl.Expr, names: dict[str, Any]) -> pl.Expr:
    return _fields_size(schema, value.struct.field, names)


def _fields_size(
    schema: dict[str, Any], field_of: Callable[[str], pl.Expr], names: dict[str, Any]
) -> pl.Expr:
    """Sum of the record's field sizes; ``field_of`` names a field (a column at the top level, a struct
    field below it)."""
    parts = [_size(f["type"], field_of(f["name"]), names) for f in schema["fields"]]
    return reduce(lambda total, part: total + part, parts, pl.lit(0, pl.Int64))


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
