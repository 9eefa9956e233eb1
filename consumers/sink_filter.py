"""The sink's selective storage (D6): which raw rows of a batch it stores, by the deadbands and heartbeats of
``bus/selective_storage.py`` (the decision, :func:`bus.selective_storage.keeps`, and the file).

A row's source is its table's natural key without the time (gpu_samples: host, gpu_uuid, mig_instance,
interval_group; system_samples: host; system_disk_samples: host, mountpoint; system_network_samples: host,
interface). The producers key these records by ``host/gpu_uuid`` and ``host`` (bus/topics.py), so every
row of a source comes from one partition, in order, and the last stored row of each source is kept per
partition: a partition revoked or lost forgets its sources, so the first row of each after a rebalance or
a restart is stored again (never a gap, at worst one row more).

Compared: every column of the row but its source, its time and what rides along (:data:`RIDE_ALONG`); a
catalogue metric with its band (0 when the file does not list it), every other column exactly. The
per-record path (:meth:`RowFilter.rows`) and the columnar one (:meth:`RowFilter.plan` over a chunk's
columns) read the same values and make the same decisions; the columnar one is a plan applied only once
its chunk is made, so a chunk that falls back to one-by-one decoding is decided once.

State is updated when a row is decided stored, before the database has it: a row the database then
rejects (a dead letter) still counts as the last stored one of its source.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import polars as pl

from bus import catalogue
from bus.frames import python_values
from bus.selective_storage import EXACT, Band, Kept, SelectiveStorage, keeps
from consumers.tables import BY_RECORD, ORIGIN_FIELDS, TABLES, Table

__all__ = ["FILTERED_TABLES", "RIDES_WITH", "RIDE_ALONG", "Plan", "RowFilter", "TableRule"]

FILTERED_TABLES = ("gpu_samples", "system_samples", "system_disk_samples", "system_network_samples")
RIDE_ALONG = {"gpu_samples": frozenset({"processes"})}
"""Columns compared with nothing: the process list's memory moves with gpu_memory_used_bytes, which has a
deadband of its own; a row stored carries the list as it was."""
RIDES_WITH = {"gpu_process_samples": "gpu_samples"}
"""Tables whose rows of a record are stored exactly when its row of another table is, for the same reason:
a GPU sample's process rows (the list above, one row per process) go with its gpu_samples row. They are
not counted as filtered on their own: the row they go with is."""

Partition = tuple[str, int]
SourceKey = tuple[Table, tuple[Any, ...]]


@dataclass(frozen=True)
class TableRule:
    """How one table's rows are decided: column positions in the table's row tuples."""

    table: Table
    source: tuple[int, ...]
    time: int
    metrics: tuple[int, ...]
    """The catalogue metrics' columns, each compared with its band in ``bands``."""
    bands: tuple[Band, ...]
    exact: tuple[int, ...]
    """The other compared columns: any change stores the row."""
    heartbeat: timedelta | None

    @classmethod
    def build(cls, table: Table, storage: SelectiveStorage) -> TableRule | None:
        """The table's rule; None when no metric of it is listed (its rows are all stored)."""
        if table.name not in FILTERED_TABLES:
            return None
        names = table.column_names
        by_column: dict[int, Band] = {}
        heartbeats: list[timedelta] = []
        listed = False
        for metric in catalogue.METRICS:
            if metric.record != table.record:
                continue
            try:
                column = table.column_for(metric.field)
            except KeyError:  # a metric of another table of the record (disks in system_samples)
                continue
            rule = storage.rule(metric.name)
            by_column[names.index(column.name)] = rule.band if rule is not None else EXACT
            if rule is not None:
                listed = True
                if rule.heartbeat is not None:
                    heartbeats.append(rule.heartbeat)
        if not listed:
            return None
        source = tuple(names.index(c) for c in table.key if c != "time")
        skipped = {*table.key, *RIDE_ALONG.get(table.name, ())}
        exact = tuple(
            i
            for i, column in enumerate(table.columns)
            if column.name not in skipped and column.source not in ORIGIN_FIELDS and i not in by_column
        )
        metrics = tuple(sorted(by_column))
        return cls(
            table,
            source,
            names.index("time"),
            metrics,
            tuple(by_column[i] for i in metrics),
            exact,
            min(heartbeats, default=None),
        )

    @property
    def compared(self) -> tuple[int, ...]:
        return self.metrics + self.exact


@dataclass
class Plan:
    """Decisions for a chunk's rows, not yet applied: ``keep`` per row, and what the sources' last
    stored rows become once they are."""

    keep: list[bool]
    updates: dict[Partition, dict[SourceKey, Kept]] = field(default_factory=dict)
    filtered: Counter[str] = field(default_factory=Counter)


class RowFilter:
    """The last stored row of every source, per partition, and the decisions made against them."""

    def __init__(self, storage: SelectiveStorage) -> None:
        self.storage = storage
        rules = {table: TableRule.build(table, storage) for table in TABLES} if storage.active else {}
        self._rules: dict[Table, TableRule] = {t: r for t, r in rules.items() if r is not None}
        self._records = frozenset(table.record for table in self._rules)
        self._last: dict[Partition, dict[SourceKey, Kept]] = {}

    @property
    def active(self) -> bool:
        return bool(self._rules)

    def filters(self, record_name: str) -> bool:
        """Whether some table of ``record_name`` is filtered."""
        return record_name in self._records

    def columnar(self, record_name: str) -> bool:
        """Whether :meth:`plan` can decide this record's chunks: its first table filtered, and any other
        riding along with it (:data:`RIDES_WITH`); otherwise the sink decodes the records one by one."""
        tables = BY_RECORD.get(record_name, ())
        if not tables or tables[0] not in self._rules:
            return False
        return all(RIDES_WITH.get(table.name) == tables[0].name for table in tables[1:])

    def rule(self, table: Table) -> TableRule | None:
        return self._rules.get(table)

    # -- one record at a time ----------------------------------------------------------------------------

    def rows(
        self, partition: Partition, rows: list[tuple[Table, tuple[Any, ...]]]
    ) -> tuple[list[tuple[Table, tuple[Any, ...]]], Counter[str]]:
        """The rows of one record to store (in order), and how many of each table were left out."""
        filtered: Counter[str] = Counter()
        if not self._rules:
            return rows, filtered
        last = self._last.setdefault(partition, {})
        kept = []
        decided: dict[str, bool] = {}
        for table, row in rows:
            leader = RIDES_WITH.get(table.name)
            if leader is not None and leader in decided:
                if decided[leader]:
                    kept.append((table, row))
                continue
            rule = self._rules.get(table)
            if rule is None:
                kept.append((table, row))
                continue
            key = (table, tuple([row[i] for i in rule.source]))
            values = tuple([row[i] for i in rule.metrics])
            exact = tuple([row[i] for i in rule.exact])
            decided[table.name] = self._decide(rule, last.get(key), row[rule.time], values, exact, last, key)
            if decided[table.name]:
                kept.append((table, row))
            else:
                filtered[table.name] += 1
        return kept, filtered

    # -- a chunk of columns ------------------------------------------------------------------------------

    def plan(self, table: Table, columns: pl.DataFrame, partitions: Sequence[Partition]) -> Plan:
        """Decisions for rows decoded together (one row per record, ``partitions`` alike, in the order
        read): the same as :meth:`rows` would make record by record. Apply it with :meth:`apply`."""
        rule = self._rules[table]
        needed = sorted({*rule.source, rule.time, *rule.metrics, *rule.exact})
        values = {i: _column_values(table, i, columns) for i in needed}
        # Row tuples made by zip, in C: the same tuples rows() builds from a record's row.
        sources = zip(*(values[i] for i in rule.source), strict=True)
        metrics = zip(*(values[i] for i in rule.metrics), strict=True)
        exact = zip(*(values[i] for i in rule.exact), strict=True) if rule.exact else _empty(len(partitions))
        plan = Plan([])
        for partition, source, time, row_values, row_exact in zip(
            partitions, sources, values[rule.time], metrics, exact, strict=True
        ):
            pending = plan.updates.setdefault(partition, {})
            key = (table, source)
            last = pending.get(key) or self._last.get(partition, {}).get(key)
            kept = self._decide(rule, last, time, row_values, row_exact, pending, key)
            plan.keep.append(kept)
            if not kept:
                plan.filtered[table.name] += 1
        return plan

    def apply(self, plan: Plan) -> None:
        for partition, updates in plan.updates.items():
            self._last.setdefault(partition, {}).update(updates)

    # -- partitions --------------------------------------------------------------------------------------

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions no longer ours: their sources start afresh (the first row of each is stored)."""
        for partition in partitions:
            self._last.pop(partition, None)

    @staticmethod
    def _decide(
        rule: TableRule,
        last: Kept | None,
        time: Any,
        values: tuple[Any, ...],
        exact: tuple[Any, ...],
        into: dict[SourceKey, Kept],
        key: SourceKey,
    ) -> bool:
        if not keeps(last, time, values, rule.bands, rule.heartbeat, exact):
            return False
        if last is None or time > last.time:  # the newest stored row stays the reference
            into[key] = Kept(time, values, exact)
        return True


def _empty(rows: int) -> list[tuple[()]]:
    return [()] * rows


def _column_values(table: Table, index: int, columns: pl.DataFrame) -> list[Any]:
    """Column ``index`` of ``table`` for every row, as the values its row tuples hold (Table.rows)."""
    column = table.columns[index]
    series = columns.get_column(column.source)
    if column.null_as_empty:
        series = series.fill_null("")
    return python_values(series)
