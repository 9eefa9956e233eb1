"""Archiving one day of a table, listing what the archive holds, and restoring it (D5).

:meth:`Archiver.archive_day` is called by retention (consumers/retention.py) inside the transaction that
then drops or deletes those rows: the rows are dumped to a local Parquet file, uploaded, the day's manifest
written, and only then does retention drop; any archive failure raises :class:`ArchiveError` and the
transaction rolls back, so nothing is dropped that the archive does not hold.

Idempotent: a day whose manifest already counts as many rows as the database holds for it is not written
again (a run that archived it but did not get to commit its drop, rows restored and expired again). A day
archived before that now holds other rows (late rows that arrived after its partition was dropped) is
merged: the archived rows and the database's (the database's version wins on a natural key) become one new
part, the manifest is replaced, the old part deleted.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from consumers.archive.columns import columns_of, copy_to_parquet, key_columns_of, parquet_rows, select_list
from consumers.archive.layout import DayKey, Manifest, Part, day_bounds, parse_manifest_key
from consumers.archive.metrics import ArchiveMetrics
from consumers.archive.store import ArchiveError, Store

log = logging.getLogger(__name__)

__all__ = ["ArchiveMetrics", "Archived", "Archiver", "RestoreResult", "list_manifests", "restore"]


@dataclass(frozen=True)
class Archived:
    key: DayKey
    rows: int
    written: bool
    """False: the archive held these rows already."""
    url: str


class Archiver:
    """Writes days of the connection's schema into ``store``."""

    def __init__(self, store: Store, metrics: ArchiveMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics

    def day_key(self, table: str, tier: str, day: date) -> DayKey:
        return DayKey(table, tier, day, self.store.prefix)

    def archive_day(
        self,
        conn: psycopg.Connection,
        *,
        table: str,
        tier: str,
        time_column: str,
        day: date,
        source: sql.Composable,
        where: sql.Composable,
        params: tuple[Any, ...],
    ) -> Archived:
        """Make the archive hold the rows ``SELECT ... FROM <source> WHERE <where>`` (``params``) as day
        ``day`` of ``table`` (``tier``). Raises ArchiveError when the store fails or the rows cannot be
        written as Parquet; the caller then keeps the rows. Database errors pass through."""
        try:
            return self._archive_day(conn, table, tier, time_column, day, source, where, params)
        except (psycopg.Error, ArchiveError):
            raise
        except Exception as exc:  # pyarrow, the local temporary file: the drop must wait all the same
            raise ArchiveError(f"archiving {table} {tier} {day}: {exc}", type(exc).__name__) from exc

    def _archive_day(
        self,
        conn: psycopg.Connection,
        table: str,
        tier: str,
        time_column: str,
        day: date,
        source: sql.Composable,
        where: sql.Composable,
        params: tuple[Any, ...],
    ) -> Archived:
        key = self.day_key(table, tier, day)
        columns = columns_of(conn, table)
        with tempfile.TemporaryDirectory(prefix="aima-archive-") as folder:
            path = Path(folder, "day.parquet")
            query = sql.SQL("SELECT {} FROM {} WHERE {}").format(select_list(columns), source, where)
            rows = copy_to_parquet(conn, query, params, columns, path)
            old = self._manifest(key)
            if rows == 0 or (old is not None and old.rows == rows):
                return Archived(key, rows, False, self.store.url(key.manifest_key()))
            keys = key_columns_of(conn, table)
            if old is not None:
                rows = self._merge(path, old, keys)
            part = self._put_part(key, path, rows)
            low, high = _time_range(path, time_column)
            manifest = Manifest(
                table=table,
                tier=tier,
                day=day,
                time_column=time_column,
                rows=rows,
                min_time=low,
                max_time=high,
                columns=columns,
                parts=(part,),
                archived_at=datetime.now(UTC),
                key_columns=keys,
                source=_current_schema(conn),
            )
            self.store.put_bytes(key.manifest_key(), manifest.to_json())
        for stale in old.parts if old is not None else ():
            try:
                self.store.delete(stale.key)
            except ArchiveError as exc:  # an unreferenced part only costs space
                log.warning("archive: stale part left", extra={"key": stale.key, "error": str(exc)})
        if self.metrics is not None:
            self.metrics.objects.labels(table, tier).inc()
            self.metrics.rows.labels(table, tier).inc(rows)
        log.info(
            "archived",
            extra={
                "table": table,
                "tier": tier,
                "day": day.isoformat(),
                "rows": rows,
                "merged": old is not None,
            },
        )
        return Archived(key, rows, True, self.store.url(part.key))

    def failed(self, table: str, tier: str, exc: ArchiveError) -> None:
        if self.metrics is not None:
            self.metrics.failures.labels(table, tier, exc.reason).inc()

    def held_back(self, table: str, tier: str, days: int) -> None:
        if self.metrics is not None:
            self.metrics.held_back.labels(table, tier).set(days)

    # -- steps -------------------------------------------------------------------------------------------

    def _manifest(self, key: DayKey) -> Manifest | None:
        data = self.store.get_bytes(key.manifest_key())
        return Manifest.from_json(data) if data is not None else None

    def _put_part(self, key: DayKey, path: Path, rows: int) -> Part:
        part_key = key.part_key(uuid.uuid4().hex)
        self.store.put_file(part_key, path)
        return Part(part_key, rows, path.stat().st_size, _sha256(path))

    def _merge(self, path: Path, old: Manifest, keys: tuple[str, ...]) -> int:
        """Rewrite ``path`` as the database's rows plus the archived ones it lacks (by natural key)."""
        fresh = pq.read_table(path)
        tables = [fresh]
        for part in old.parts:
            archived = _fetch(self.store, part, path.with_name(f"old-{uuid.uuid4().hex}.parquet"))
            tables.append(archived.select(fresh.schema.names).cast(fresh.schema))
        merged = pa.concat_tables(tables)
        if keys:
            import polars as pl

            frame = pl.from_arrow(merged)
            if isinstance(frame, pl.DataFrame):
                # The database's rows come first: keep="first" lets them win.
                merged = frame.unique(subset=list(keys), keep="first", maintain_order=True).to_arrow()
                merged = merged.cast(fresh.schema)
        pq.write_table(merged, path, compression="zstd")
        return merged.num_rows


def _fetch(store: Store, part: Part, path: Path) -> pa.Table:
    store.get_file(part.key, path)
    digest = _sha256(path)
    if digest != part.sha256:
        raise ArchiveError(f"{store.url(part.key)}: checksum {digest} is not the manifest's {part.sha256}")
    return pq.read_table(path)


def _time_range(path: Path, time_column: str) -> tuple[datetime | None, datetime | None]:
    column = pq.read_table(path, columns=[time_column]).column(time_column)
    if len(column) == 0:
        return None, None
    bounds = pc.min_max(column)
    return bounds["min"].as_py(), bounds["max"].as_py()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _current_schema(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT current_schema()").fetchone()
    return str(row[0]) if row else ""


# -- list and restore -----------------------------------------------------------------------------------


def list_manifests(
    store: Store,
    table: str | None = None,
    tier: str | None = None,
    start: date | None = None,
    end: date | None = None,
) -> Iterator[Manifest]:
    """The manifests of the archive (of ``table``, ``tier``, days in [start, end]), in key order."""
    if table:
        prefix = DayKey.table_prefix(store.prefix, table, tier or "")
    else:
        prefix = f"{store.prefix}/" if store.prefix else ""
    for key in store.keys(prefix):
        day_key = parse_manifest_key(key)
        if day_key is None or (table and day_key.table != table) or (tier and day_key.tier != tier):
            continue
        if (start and day_key.day < start) or (end and day_key.day > end):
            continue
        data = store.get_bytes(key)
        if data is not None:
            yield Manifest.from_json(data)


@dataclass
class RestoreResult:
    target: str
    days: int = 0
    read: int = 0
    """Rows in the archive within the range."""
    inserted: int = 0
    """Rows the target did not hold yet (the rest were there: ON CONFLICT DO NOTHING)."""


def restore(
    conn: psycopg.Connection,
    store: Store,
    *,
    table: str,
    start: datetime,
    end: datetime,
    tier: str | None = None,
    into_schema: str | None = None,
) -> RestoreResult:
    """Insert the archived rows of ``table`` (of ``tier``; every tier when None) whose time lies in
    [start, end) into the table of the connection's schema, or into ``into_schema``.<table> (created
    LIKE the original, with its natural key, when missing). Rows the target holds already are kept."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    source = sql.Identifier(table)
    target = source
    if into_schema:
        target = sql.Identifier(into_schema, table)
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(into_schema)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                    "INCLUDING INDEXES)"
                ).format(target, source)
            )
    result = RestoreResult(f"{into_schema or _current_schema(conn)}.{table}")
    first, last = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    columns = columns_of(conn, table)
    names = tuple(c.name for c in columns)
    for manifest in list_manifests(store, table, tier, first, last):
        missing = [c.name for c in manifest.columns if c.name not in names]
        if missing:
            raise ArchiveError(f"{table} has no columns {missing} that the archive of {manifest.day} holds")
        wanted = tuple(c.name for c in manifest.columns)
        day_start, day_end = day_bounds(manifest.day)
        if day_start >= end or day_end <= start:
            continue  # the range touches the day only at its edge
        whole_day = start <= day_start and day_end <= end
        with tempfile.TemporaryDirectory(prefix="aima-restore-") as folder, conn.transaction():
            conn.execute(
                sql.SQL("CREATE TEMP TABLE aima_restore (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
                    target
                )
            )
            copy_sql = sql.SQL("COPY aima_restore ({}) FROM STDIN").format(
                sql.SQL(", ").join(map(sql.Identifier, wanted))
            )
            time_index = wanted.index(manifest.time_column)
            with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
                for part in manifest.parts:
                    path = Path(folder, f"{uuid.uuid4().hex}.parquet")
                    _fetch(store, part, path)
                    for row in parquet_rows(path, wanted):
                        if not whole_day and not (start <= row[time_index] < end):
                            continue
                        copy.write_row(row)
                        result.read += 1
            cursor = conn.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM aima_restore ON CONFLICT DO NOTHING").format(
                    target,
                    sql.SQL(", ").join(map(sql.Identifier, wanted)),
                    sql.SQL(", ").join(map(sql.Identifier, wanted)),
                )
            )
            result.inserted += max(cursor.rowcount, 0)
        result.days += 1
    return result
