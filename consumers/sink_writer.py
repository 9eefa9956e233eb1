"""The sink's database side: writes one batch of records in one transaction, per table a COPY into a
temporary staging table and one ``INSERT ... SELECT ... ON CONFLICT`` on the natural key, so a record
delivered twice is stored once (D3). Tables whose stored rows never change (samples, events) first try a
COPY straight into the table, within a savepoint: it succeeds unless a row's natural key is stored
already (a redelivery), and only then does the batch take the staged upsert, at twice the cost.

Errors are told apart by SQLSTATE class, never by message text:
- the database is away (connection lost, shutting down, starting up): wait with capped exponential backoff,
  reconnect and write the same batch again, until it succeeds or the sink gives up (``abort``);
- the database rejects the data (class 22 data exception, 23 integrity, 54 limits): split the batch in
  halves until the one record it rejects is found, dead-letter that record and store the rest;
- anything else (a missing table, a bug) is raised: the sink stops without committing its offsets.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import psycopg
from psycopg import sql

from consumers.archive.metrics import ArchiveMetrics
from consumers.settings import ArchiveSettings, RetentionSettings
from consumers.sink_chunks import Chunk
from consumers.tables import BY_NAME, TABLES, Table, dead_letter_row

log = logging.getLogger(__name__)

__all__ = ["Aborted", "Entry", "WriteResult", "Writer", "is_data_error", "is_transient", "now_ms"]

_TRANSIENT_CLASSES = frozenset({"08", "53", "58"})
"""Connection exception, insufficient resources, system (I/O) error."""
_TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01", "55P03", "57014"})
"""Admin/crash shutdown, cannot connect now, serialization failure, deadlock, lock timeout, canceled."""
_DATA_CLASSES = frozenset({"22", "23", "54"})


def is_transient(exc: BaseException) -> bool:
    """True when the same write may succeed later: the database, not the data, is the problem."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:  # raised by libpq on our side: refused, reset, timed out, closed
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


def is_data_error(exc: BaseException) -> bool:
    """True when the database (or psycopg, before sending it) rejected a value: retrying will not help,
    the record is poison."""
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is None:
        return isinstance(exc, psycopg.DataError)
    return exc.sqlstate[:2] in _DATA_CLASSES


def now_ms() -> datetime:
    """Now, at the millisecond precision of Avro timestamps (what is stored equals what is sent)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Aborted(Exception):
    """The sink stopped waiting for the database; the batch was not stored (and not committed)."""


@dataclass(slots=True)
class Entry:
    """One Kafka message of a batch and the rows it becomes: ``own_rows``, or (never both) row ``index``
    of ``chunk`` (records decoded together, written as columns when the batch holds the whole chunk)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    own_rows: list[tuple[Table, tuple[Any, ...]]] | None
    chunk: Chunk | None = None
    index: int = 0

    @property
    def rows(self) -> list[tuple[Table, tuple[Any, ...]]]:
        if self.own_rows is not None:
            return self.own_rows
        if self.chunk is None:
            raise ValueError("an entry needs rows or a chunk")
        return self.chunk.rows(self.index)


@dataclass
class WriteResult:
    staged: Counter[str] = field(default_factory=Counter)
    """Rows sent per table."""
    stored: Counter[str] = field(default_factory=Counter)
    """Rows inserted or updated per table; the rest were stored already (or newer ones were)."""
    letters: list[dict[str, Any]] = field(default_factory=list)
    """Dead letters for records the database rejected; already in dead_letters, still to be published."""
    attempts: int = 0
    seconds: float = 0.0


class Writer:
    """Owns one connection; use it from one thread. ``retrying`` is True while the database is away, for
    the consumer to pause its partitions."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        on_retry: Callable[[str], None] | None = None,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        connect_timeout_s: int = 5,
        maintenance_every_s: float | None = 3600.0,
        retention_every_s: float | None = None,
        retention: RetentionSettings | None = None,
        archive: ArchiveSettings | None = None,
        archive_metrics: ArchiveMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._on_retry = on_retry or (lambda reason: None)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._connect_timeout_s = connect_timeout_s
        self._maintenance_every_s = maintenance_every_s
        self._retention_every_s = retention_every_s
        self._retention = retention
        self._archive = archive
        self._archive_metrics = archive_metrics
        self._clock = clock
        self._conn: psycopg.Connection | None = None
        self._types: dict[str, list[int]] = {}
        self._last_maintenance = float("-inf")
        self._last_retention = float("-inf")
        self.abort = threading.Event()
        """Set it to make a write that waits for the database give up with :class:`Aborted`."""
        self.retrying = False

    # -- public ------------------------------------------------------------------------------------------

    def write(self, entries: Sequence[Entry]) -> WriteResult:
        """Store every entry's rows; returns once they are committed. Raises Aborted or a fatal error."""
        result = WriteResult()
        started = self._clock()
        if entries or self.upkeep_due():  # no entries: the upkeep alone (the sink asks while idle)
            self._write_or_bisect(list(entries), result)
        result.seconds = self._clock() - started
        return result

    def upkeep_due(self) -> bool:
        """Whether partition upkeep or retention is due: the sink hands an idle writer an empty write then,
        so retention runs on schedule also while no record comes."""
        now = self._clock()
        return any(
            every is not None and now - last >= every
            for every, last in (
                (self._maintenance_every_s, self._last_maintenance),
                (self._retention_every_s, self._last_retention),
            )
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- batches -----------------------------------------------------------------------------------------

    def _write_or_bisect(self, entries: list[Entry], result: WriteResult) -> None:
        try:
            self._write_retrying(entries, result)
        except psycopg.Error as exc:
            if not is_data_error(exc):
                raise
            if len(entries) > 1:
                middle = len(entries) // 2
                self._write_or_bisect(entries[:middle], result)
                self._write_or_bisect(entries[middle:], result)
                return
            entry = entries[0]
            letter = {
                "time": now_ms(),
                "stage": "sink",
                "origin_topic": entry.topic,
                "origin_partition": entry.partition,
                "origin_offset": entry.offset,
                "key": entry.key,
                "value": entry.value,
                "reason": f"the database rejected the record ({exc.sqlstate}): {exc}".strip(),
                "error_type": type(exc).__name__,
                "source": "sink",
            }
            log.warning(
                "record rejected by the database, dead-lettered",
                extra={
                    "topic": entry.topic,
                    "partition": entry.partition,
                    "offset": entry.offset,
                    "sqlstate": exc.sqlstate,
                },
            )
            poison = Entry(
                entry.topic,
                entry.partition,
                entry.offset,
                entry.key,
                entry.value,
                [(BY_NAME["dead_letters"], dead_letter_row(letter))],
            )
            self._write_retrying([poison], result)
            result.letters.append(letter)

    def _write_retrying(self, entries: list[Entry], result: WriteResult) -> None:
        delay = self._retry_initial_s
        while True:
            result.attempts += 1
            try:
                conn = self._connection()
                self._maintain(conn)
                staged, stored = self._transaction(conn, entries)
            except psycopg.Error as exc:
                if not is_transient(exc):
                    raise
                reason = exc.sqlstate or "connection"
                self.retrying = True
                self._on_retry(reason)
                log.warning(
                    "database unavailable, retrying the batch",
                    extra={
                        "sqlstate": reason,
                        "error": str(exc).strip()[:200],
                        "retry_in_s": round(delay, 2),
                    },
                )
                self.close()
                if self.abort.wait(delay * random.uniform(0.8, 1.2)):
                    raise Aborted("stopped waiting for the database") from exc
                delay = min(delay * 2, self._retry_max_s)
                continue
            if self.retrying:
                log.info("database back; batch stored", extra={"attempts": result.attempts})
            self.retrying = False
            result.staged.update(staged)
            result.stored.update(stored)
            return

    def _transaction(
        self, conn: psycopg.Connection, entries: list[Entry]
    ) -> tuple[Counter[str], Counter[str]]:
        by_table: dict[Table, list[tuple[Any, ...] | Chunk]] = {}
        chunks, single = _whole_chunks(entries)
        for chunk in chunks:
            for table in chunk.tables:
                if table.newest:  # rows must be reduced to the newest per key first
                    rows = by_table.setdefault(table, [])
                    for index in range(len(chunk)):
                        rows.extend(row for t, row in chunk.rows(index) if t is table)
                else:
                    by_table.setdefault(table, []).append(chunk)
        for entry in single:
            for table, row in entry.rows:
                by_table.setdefault(table, []).append(row)
        staged: Counter[str] = Counter()
        stored: Counter[str] = Counter()
        with conn.transaction(), conn.cursor() as cursor:
            for table, parts in by_table.items():
                whole = [part for part in parts if isinstance(part, Chunk)]
                rows = [part for part in parts if not isinstance(part, Chunk)]
                if table.newest:
                    rows = _newest_per_key(table, rows)
                payload = b"".join(chunk.csv(table) for chunk in whole)
                staged[table.name] += len(rows) + sum(chunk.row_count(table) for chunk in whole)
                if table.key and not table.newest:
                    # Most batches hold no row stored before: COPY straight into the table, and take the
                    # staged upsert only when the natural key says some row is there already.
                    try:
                        with conn.transaction():
                            stored[table.name] += self._copy(cursor, table, rows, payload, stage=False)
                        continue
                    except psycopg.errors.UniqueViolation:
                        pass
                self._copy(cursor, table, rows, payload, stage=True)
                cursor.execute(_UPSERT[table.name])
                stored[table.name] += max(cursor.rowcount, 0)
        return staged, stored

    def _copy(
        self,
        cursor: psycopg.Cursor[Any],
        table: Table,
        rows: list[tuple[Any, ...]],
        csv: bytes,
        *,
        stage: bool,
    ) -> int:
        """COPY the rows (binary) and the CSV rows into the table or its staging table; rows copied."""
        copied = 0
        if rows:
            statement = (_COPY_STAGE if stage else _COPY_DIRECT)[table.name]
            with cursor.copy(statement) as copy:
                copy.set_types(self._types[table.name])
                for row in rows:
                    copy.write_row(row)
            copied += max(cursor.rowcount, 0)
        if csv:
            statement = (_COPY_STAGE_CSV if stage else _COPY_DIRECT_CSV)[table.name]
            with cursor.copy(statement) as copy:
                copy.write(csv)
            copied += max(cursor.rowcount, 0)
        return copied

    # -- connection --------------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            application_name="aima-sink",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            if self._schema:
                conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self._schema)))
            for table in TABLES:  # the columns the sink writes, their types, no constraints
                conn.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE {} ON COMMIT DELETE ROWS AS SELECT {} FROM {} WITH NO DATA"
                    ).format(_stage(table), _column_list(table), sql.Identifier(table.name))
                )
            if not self._types:
                self._types = {table.name: _column_types(conn, table) for table in TABLES}
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _maintain(self, conn: psycopg.Connection) -> None:
        """Daily partitions ahead of time (plain PostgreSQL; a no-op with TimescaleDB), and retention when
        the sink is asked to run it."""
        now = self._clock()
        if (
            self._maintenance_every_s is not None
            and now - self._last_maintenance >= self._maintenance_every_s
        ):
            self._best_effort(
                conn, "ensure partitions", lambda: conn.execute("SELECT aima_ensure_partitions()")
            )
            self._last_maintenance = now
        if self._retention_every_s is not None and now - self._last_retention >= self._retention_every_s:
            from consumers.retention import apply_retention

            # scheduled: what TimescaleDB's own policies trim is left to them.
            self._best_effort(
                conn,
                "retention",
                lambda: apply_retention(
                    conn,
                    settings=self._retention,
                    scheduled=True,
                    archive=self._archive,
                    archive_metrics=self._archive_metrics,
                ),
            )
            self._last_retention = now

    def _best_effort(self, conn: psycopg.Connection, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except psycopg.Error as exc:
            if is_transient(exc):
                raise
            log.warning(f"{what} failed; storing anyway", extra={"sqlstate": exc.sqlstate, "error": str(exc)})


def _stage(table: Table) -> sql.Identifier:
    return sql.Identifier(f"aima_stage_{table.name}")


def _column_types(conn: psycopg.Connection, table: Table) -> list[int]:
    rows = conn.execute(
        """SELECT attname, atttypid::integer FROM pg_attribute
            WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped""",
        (f"pg_temp.aima_stage_{table.name}",),
    ).fetchall()
    types = dict(rows)
    missing = [c for c in table.column_names if c not in types]
    if missing:
        raise RuntimeError(f"table {table.name} lacks columns {missing}; are the migrations applied?")
    return [types[c] for c in table.column_names]


def _newest_per_key(table: Table, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per key (ON CONFLICT DO UPDATE may touch a row once per statement): the newest, the later
    one among equals."""
    names = table.column_names
    key = [names.index(c) for c in table.key]
    newest = [names.index(c) for c in table.newest]
    best: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for row in rows:
        k = tuple(row[i] for i in key)
        kept = best.get(k)
        if kept is None or [row[i] for i in newest] >= [kept[i] for i in newest]:
            best[k] = row
    return list(best.values())


def _column_list(table: Table) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, table.column_names))


def _copy_sql(table: Table, target: sql.Identifier, form: str = "BINARY") -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(target, _column_list(table), sql.SQL(form))


def _whole_chunks(entries: Sequence[Entry]) -> tuple[list[Chunk], list[Entry]]:
    """The chunks ``entries`` hold all of (written as columns), and the other entries (one by one).
    Runs per batch over every entry, so the loops are the C-level ones of Counter and comprehensions."""
    counts = Counter(map(_chunk_of, entries))
    counts.pop(None, None)
    whole = [chunk for chunk, held in counts.items() if held == len(chunk)]
    if not whole:
        return [], list(entries)
    done = set(whole)
    return whole, [entry for entry in entries if entry.chunk not in done]


_chunk_of = attrgetter("chunk")


def _upsert_sql(table: Table) -> sql.Composed:
    name = sql.Identifier(table.name)
    columns = _column_list(table)
    insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ").format(name, columns, columns, _stage(table))
    if not table.key:
        return insert + sql.SQL("ON CONFLICT DO NOTHING")
    key = sql.SQL(", ").join(map(sql.Identifier, table.key))
    if not table.newest:
        return insert + sql.SQL("ON CONFLICT ({}) DO NOTHING").format(key)
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
        for c in table.column_names
        if c not in table.key
    )

    def row(prefix: sql.Composable) -> sql.Composed:
        return sql.SQL("({})").format(
            sql.SQL(", ").join(sql.SQL("{}.{}").format(prefix, sql.Identifier(c)) for c in table.newest)
        )

    return insert + sql.SQL("ON CONFLICT ({}) DO UPDATE SET {}, updated_at = now() WHERE {} >= {}").format(
        key, updates, row(sql.SQL("EXCLUDED")), row(name)
    )


_COPY_STAGE = {table.name: _copy_sql(table, _stage(table)) for table in TABLES}
_COPY_DIRECT = {table.name: _copy_sql(table, sql.Identifier(table.name)) for table in TABLES}
_COPY_STAGE_CSV = {table.name: _copy_sql(table, _stage(table), "CSV") for table in TABLES}
_COPY_DIRECT_CSV = {table.name: _copy_sql(table, sql.Identifier(table.name), "CSV") for table in TABLES}
_UPSERT = {table.name: _upsert_sql(table) for table in TABLES}
