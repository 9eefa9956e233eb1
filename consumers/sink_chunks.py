"""Records the sink decoded together (``bus.frames``), kept as columns until the database write.

A chunk is written with one CSV COPY per table, built by polars in native code (it releases the GIL, so it
runs beside the consumer thread): no Python tuple per row and no per-value dumping. Its rows as tuples, the
same ones ``Table.rows`` makes, are built only when a write needs them: when the batch holds part of the
chunk (a bisection after a rejected record), or for a table whose rows must be reduced first (``newest``).

Each column becomes the text PostgreSQL's CSV input reads as the value binary COPY would have written:
null as an unquoted empty field and '' quoted; arrays as array literals; jsonb as JSON text; bytea as hex.

A table with one row per item of an array field (``Table.items``, e.g. a GPU sample's processes) takes the
array exploded, one row per item, the record's columns repeated; such a table may not store message
properties (``@offset``, ...), which are one per record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from bus.frames import python_values
from consumers.tables import ORIGIN_FIELDS, Origin, Table

__all__ = ["Chunk"]


_NO_ORIGIN = Origin("", -1, -1, None)
"""Stands for the origin of a row whose tables never read it."""


class Chunk:
    """Decoded records of one topic in one batch: ``columns`` (one row per record) and ``origins``."""

    def __init__(
        self, tables: Sequence[Table], columns: pl.DataFrame, origins: Sequence[Origin] | None = None
    ) -> None:
        """``origins``: one per row; may be None when no table has a column of the message's own
        (:meth:`needs_origins`), which spares the consumer making them."""
        if origins is None:
            if self.needs_origins(tables):
                raise ValueError("these tables store message properties: origins are needed")
            origins = [_NO_ORIGIN] * columns.height
        if columns.height != len(origins):
            raise ValueError(f"{columns.height} rows but {len(origins)} origins")
        if any(table.items is not None and self.needs_origins((table,)) for table in tables):
            raise ValueError("a table with a row per item cannot store message properties as columns")
        self.tables = tuple(tables)
        self.columns = columns
        self.origins = list(origins)
        self._rows: list[list[tuple[Table, tuple[Any, ...]]]] | None = None
        self._csv: dict[str, bytes] = {}
        self._exploded: dict[str, pl.DataFrame | None] = {}

    @staticmethod
    def needs_origins(tables: Sequence[Table]) -> bool:
        return any(column.source in ORIGIN_FIELDS for table in tables for column in table.columns)

    def __len__(self) -> int:
        return len(self.origins)

    def rows(self, index: int) -> list[tuple[Table, tuple[Any, ...]]]:
        """Record ``index``'s rows, with their tables (the tuples of all records are made at first need)."""
        if self._rows is None:
            per_table = [(t, self._record_rows(t)) for t in self.tables]
            self._rows = [[(t, row) for t, rows in per_table for row in rows[i]] for i in range(len(self))]
        return self._rows[index]

    def row_count(self, table: Table) -> int:
        """How many rows of ``table`` the chunk holds: one per record, or one per item."""
        if table.items is None:
            return len(self)
        items = self._items(table)
        return 0 if items is None else items.height

    def _record_rows(self, table: Table) -> list[list[tuple[Any, ...]]]:
        """Per record, its rows of ``table`` (the tuples ``Table.rows`` makes)."""
        if table.items is None:
            return [[row] for row in table.rows_from_columns(self.columns, self.origins)]
        names = list(dict.fromkeys(c.source.partition("[].")[0] for c in table.columns))
        values = [python_values(self.columns.get_column(name)) for name in names]
        records = [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
        return [table.rows(record, origin) for record, origin in zip(records, self.origins, strict=True)]

    def _items(self, table: Table) -> pl.DataFrame | None:
        """One row per item of ``table.items`` (records without items, or a null list, have none): the
        record's columns by name, each item field as its column's source (``processes[].pid``). None when
        no record has an item."""
        assert table.items is not None
        if table.name in self._exploded:
            return self._exploded[table.name]
        array = table.items
        kind = self.columns.schema.get(array)
        result = None
        # A list of structs unless every record's list is null or empty (then polars may type it Null).
        if isinstance(kind, pl.List) and isinstance(kind.inner, pl.Struct):
            prefix = f"{array}[]."
            own = list(dict.fromkeys(c.source for c in table.columns if not c.source.startswith(prefix)))
            fields = [c.source for c in table.columns if c.source.startswith(prefix)]
            exploded = self.columns.select(*own, array).explode(array).filter(pl.col(array).is_not_null())
            result = exploded.select(
                *own, *(pl.col(array).struct.field(f.removeprefix(prefix)).alias(f) for f in fields)
            )
            if result.height == 0:
                result = None
        self._exploded[table.name] = result
        return result

    def _source(
        self, source: str, null_as_empty: bool, frame: pl.DataFrame | None = None
    ) -> tuple[pl.Expr, pl.DataType]:
        """The column's values (in ``frame``, default the records' columns) and their polars type."""
        if source == "@timestamp":
            # Origin.timestamp: the broker's time, or now when it gave none.
            now = Origin("", 0, 0, None).timestamp
            millis = pl.Series([o.timestamp_ms for o in self.origins], dtype=pl.Int64)
            stamps = millis.cast(pl.Datetime("ms", "UTC")).fill_null(now)
            return pl.lit(stamps), stamps.dtype
        if source in ORIGIN_FIELDS:
            values = pl.Series([ORIGIN_FIELDS[source](o) for o in self.origins])
            return pl.lit(values), values.dtype
        expr = pl.col(source)
        schema = (self.columns if frame is None else frame).schema
        return (expr.fill_null("") if null_as_empty else expr), schema[source]

    def prepare(self) -> None:
        """Make the CSV of every table now (it is kept), so that :meth:`csv` only hands it over."""
        for table in self.tables:
            if not table.newest:  # those tables take the rows, reduced to the newest per key
                self.csv(table)

    def csv(self, table: Table) -> bytes:
        """The chunk's rows of ``table`` as CSV (no header), columns in ``table.columns`` order."""
        payload = self._csv.get(table.name)
        if payload is None:
            if table not in self.tables:
                raise ValueError(f"{table.name} does not store these records")
            frame = self.columns if table.items is None else self._items(table)
            if frame is None:
                payload = b""  # no items in any record: no rows
            else:
                exprs = [
                    _as_text(*self._source(column.source, column.null_as_empty, frame)).alias(column.name)
                    for column in table.columns
                ]
                payload = frame.select(exprs).write_csv(include_header=False).encode()
            self._csv[table.name] = payload
        return payload


def _as_text(value: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """``value`` (of polars type ``dtype``) in the form PostgreSQL's CSV input reads for the column the
    Avro field fills (checked against the binary COPY by a test): lists of strings and of numbers are
    text[] and number arrays, lists of records and records are jsonb, bytes are bytea."""
    if isinstance(dtype, pl.List):
        inner = dtype.inner
        if isinstance(inner, pl.Struct):
            items = value.list.eval(pl.element().struct.json_encode()).list.join(",")
            return pl.lit("[") + items + pl.lit("]")
        if inner == pl.String:
            escaped = pl.element().str.replace_all("\\", "\\\\", literal=True)
            escaped = escaped.str.replace_all('"', '\\"', literal=True)
            return _array(value.list.eval(pl.lit('"') + escaped + pl.lit('"')))
        if inner.is_numeric():
            return _array(value.list.eval(pl.element().cast(pl.String)))
        raise TypeError(f"no CSV text for a list of {inner}")
    if isinstance(dtype, pl.Struct):
        return value.struct.json_encode()
    if dtype == pl.Binary:
        return pl.lit("\\x") + value.bin.encode("hex")
    if isinstance(dtype, pl.Datetime):
        return value.dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%z")
    return value


def _array(items: pl.Expr) -> pl.Expr:
    """A list of already quoted items as an array literal; a null list stays null."""
    return pl.lit("{") + items.list.join(",") + pl.lit("}")
