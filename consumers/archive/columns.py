"""Rows between PostgreSQL and Parquet: a table's columns as Arrow types, a query's rows streamed (binary
COPY) into a zstd-compressed Parquet file, and a Parquet file's rows back as Python values for a COPY.

Types with an Arrow twin keep it (timestamptz as UTC microseconds, integers, floats, booleans, text and
arrays of them as lists); every other type (jsonb, uuid, numeric, ...) travels as its text form, which
PostgreSQL parses back on restore. The manifest records each column's PostgreSQL type."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from consumers.archive.layout import Column

__all__ = [
    "BATCH_ROWS",
    "arrow_schema",
    "columns_of",
    "copy_to_parquet",
    "key_columns_of",
    "parquet_rows",
    "select_list",
]

BATCH_ROWS = 50_000
"""Rows per Parquet row group, and what a dump holds in memory at once."""

_ARROW: dict[str, pa.DataType] = {
    "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    "timestamp without time zone": pa.timestamp("us"),
    "date": pa.date32(),
    "smallint": pa.int16(),
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "real": pa.float32(),
    "double precision": pa.float64(),
    "boolean": pa.bool_(),
    "text": pa.string(),
}
_TEXT_OID = 25


def _arrow_type(pg_type: str) -> pa.DataType | None:
    """The Arrow type a column keeps; None: it travels as text."""
    if pg_type.endswith("[]"):
        element = _ARROW.get(pg_type[:-2])
        return pa.list_(element) if element is not None else None
    if pg_type.startswith("character varying") or pg_type.startswith("character("):
        return pa.string()
    return _ARROW.get(pg_type)


def columns_of(conn: psycopg.Connection, table: str) -> tuple[Column, ...]:
    """The table's columns in order (the connection's schema)."""
    rows = conn.execute(
        """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
            WHERE attrelid = to_regclass(format('%%I.%%I', current_schema(), %s::text))
              AND attnum > 0 AND NOT attisdropped
            ORDER BY attnum""",
        (table,),
    ).fetchall()
    if not rows:
        raise LookupError(f"no table {table} in schema {_schema(conn)}")
    return tuple(Column(name, pg_type) for name, pg_type in rows)


def key_columns_of(conn: psycopg.Connection, table: str) -> tuple[str, ...]:
    """The columns of the table's natural key: its primary key, else its first unique index."""
    row = conn.execute(
        """SELECT array_agg(a.attname ORDER BY k.ord)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass(format('%%I.%%I', current_schema(), %s::text)) AND i.indisunique
            GROUP BY i.indexrelid, i.indisprimary
            ORDER BY i.indisprimary DESC, i.indexrelid
            LIMIT 1""",
        (table,),
    ).fetchone()
    return tuple(row[0]) if row else ()


def arrow_schema(columns: tuple[Column, ...]) -> pa.Schema:
    fields = []
    for column in columns:
        arrow = _arrow_type(column.pg_type)
        metadata = {"pg_type": column.pg_type}
        fields.append(pa.field(column.name, arrow if arrow is not None else pa.string(), metadata=metadata))
    return pa.schema(fields)


def select_list(columns: tuple[Column, ...]) -> sql.Composable:
    """The columns as a dump selects them (the text form where Arrow has no twin)."""
    items = []
    for column in columns:
        ident = sql.Identifier(column.name)
        if _arrow_type(column.pg_type) is None:
            items.append(sql.SQL("{}::text AS {}").format(ident, ident))
        else:
            items.append(ident)
    return sql.SQL(", ").join(items)


def copy_to_parquet(
    conn: psycopg.Connection,
    query: sql.Composable,
    params: tuple[Any, ...],
    columns: tuple[Column, ...],
    path: Path,
) -> int:
    """Run ``query`` (a SELECT, or a DELETE ... RETURNING, of :func:`select_list`) as a binary COPY and
    write its rows to ``path``; returns how many. An empty result writes a file with the schema and no
    rows."""
    schema = arrow_schema(columns)
    types = [_TEXT_OID if _arrow_type(c.pg_type) is None else _type_oid(conn, c.pg_type) for c in columns]
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)
    total = 0
    with (
        pq.ParquetWriter(path, schema, compression="zstd") as writer,
        conn.cursor() as cursor,
        cursor.copy(statement, params) as copy,
    ):
        copy.set_types(types)
        batch: list[tuple[Any, ...]] = []
        for row in copy.rows():
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                writer.write_table(_table(batch, schema))
                total += len(batch)
                batch = []
        if batch or total == 0:
            writer.write_table(_table(batch, schema))
            total += len(batch)
    return total


def parquet_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[Any, ...]]:
    """The rows of a Parquet file as tuples of ``columns``, one row group at a time."""
    file = pq.ParquetFile(path)
    for index in range(file.num_row_groups):
        group = file.read_row_group(index, columns=list(columns))
        values = [group.column(name).to_pylist() for name in columns]
        yield from zip(*values, strict=True)


def _table(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    arrays = [pa.array([row[i] for row in rows], type=field.type) for i, field in enumerate(schema)]
    return pa.Table.from_arrays(arrays, schema=schema)


_OIDS: dict[str, int] = {}


def _type_oid(conn: psycopg.Connection, pg_type: str) -> int:
    if pg_type not in _OIDS:
        row = conn.execute("SELECT %s::regtype::oid::integer", (pg_type,)).fetchone()
        if row is None:
            raise LookupError(f"no type {pg_type}")
        _OIDS[pg_type] = int(row[0])
    return _OIDS[pg_type]


def _schema(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT current_schema()").fetchone()
    return str(row[0]) if row else "?"
