"""Where each Avro record lands in the database: its tables, their columns, their natural keys, and how a
decoded record becomes rows. The sink writes with these; ``gen_views`` finds each catalogue metric's
column here. The DDL is in ``migrations/``; an integration test checks the two agree.

A column's ``source`` is the Avro field it comes from (``host``; ``disks[].used_bytes`` for a field of each
item of an array, one row per item) or a property of the Kafka message (``@timestamp``, ``@topic``,
``@partition``, ``@offset``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import polars as pl

__all__ = ["BY_NAME", "BY_RECORD", "TABLES", "Column", "Origin", "Table", "rows_for"]

NS = "aima.metrics"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record was read: the Kafka message's coordinates and timestamp (milliseconds since the
    epoch, None when the broker gave none)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None

    @property
    def timestamp(self) -> datetime:
        if self.timestamp_ms is None:
            return datetime.now(UTC)
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)


@dataclass(frozen=True)
class Column:
    name: str
    source: str
    null_as_empty: bool = False
    """A natural-key column for an optional field: stores '' for null (a unique index treats nulls as
    distinct, which would let a redelivered row in twice)."""


ORIGIN_FIELDS: Mapping[str, Callable[[Origin], Any]] = {
    "@timestamp": lambda origin: origin.timestamp,
    "@topic": lambda origin: origin.topic,
    "@partition": lambda origin: origin.partition,
    "@offset": lambda origin: origin.offset,
}


@dataclass(frozen=True, eq=False)  # one object per table: identity hashing, which the writer does per row
class Table:
    name: str
    record: str
    """Full name of the Avro record whose values fill the table."""
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    """Natural key: a redelivered record hits the same key. Empty: any unique index of the table."""
    newest: tuple[str, ...] = ()
    """Empty: a row whose key is already stored is ignored (samples and events never change). Otherwise
    it replaces the stored row when these columns, compared in order, are at least as great."""
    items: str | None = None
    """Array field whose items become the rows (one per item); other columns repeat the record's."""
    _make: Callable[[Mapping[str, Any], Origin], list[tuple[Any, ...]]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        for column in (*self.key, *self.newest):
            if column not in names:
                raise ValueError(f"{self.name}: key column {column!r} is not a column")
        object.__setattr__(self, "_make", _row_maker(self))

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column_for(self, source: str) -> Column:
        """The column filled from an Avro field path; KeyError when the table has none."""
        for column in self.columns:
            if column.source == source:
                return column
        raise KeyError(f"{self.name} has no column for {source!r}")

    def rows(self, record: Mapping[str, Any], origin: Origin) -> list[tuple[Any, ...]]:
        return self._make(record, origin)

    def rows_from_columns(self, columns: pl.DataFrame, origins: Sequence[Origin]) -> list[tuple[Any, ...]]:
        """The rows of decoded records given as columns (one row per record, ``origins`` alike): the
        same tuples :meth:`rows` makes one record at a time. Tables with ``items`` are not columnar."""
        if self.items is not None:
            raise ValueError(f"{self.name}: one row per item of {self.items}; use rows()")
        values: list[Sequence[Any]] = []
        for column in self.columns:
            if column.source in ORIGIN_FIELDS:
                get = ORIGIN_FIELDS[column.source]
                values.append([get(origin) for origin in origins])
            else:
                series = columns.get_column(column.source)
                if column.null_as_empty:
                    series = series.fill_null("")
                values.append(series.to_list())
        return list(zip(*values, strict=True))


def _row_maker(table: Table) -> Callable[[Mapping[str, Any], Origin], list[tuple[Any, ...]]]:
    """A fast record-to-rows function: a row is the record's fields (one C-level itemgetter), then the
    item's, then the message's, so columns must come in that order; '' for null only where needed."""
    prefix = f"{table.items}[]." if table.items else None
    kinds = []
    for column in table.columns:
        if column.source in ORIGIN_FIELDS:
            kinds.append(2)
        elif prefix and column.source.startswith(prefix):
            kinds.append(1)
        elif "[]." in column.source:
            raise ValueError(f"{table.name}.{column.name}: {column.source} is not an item of {table.items}")
        else:
            kinds.append(0)
    if kinds != sorted(kinds):
        raise ValueError(f"{table.name}: columns must list record fields, then item fields, then @ ones")
    get_record = _getter([c.source for c, k in zip(table.columns, kinds, strict=True) if k == 0])
    get_item = _getter(
        [c.source.removeprefix(prefix or "") for c, k in zip(table.columns, kinds, strict=True) if k == 1]
    )
    get_origin = [ORIGIN_FIELDS[c.source] for c, k in zip(table.columns, kinds, strict=True) if k == 2]
    empty = [i for i, column in enumerate(table.columns) if column.null_as_empty]

    def finish(row: tuple[Any, ...]) -> tuple[Any, ...]:
        values = None
        for i in empty:
            if row[i] is None:
                values = values or list(row)
                values[i] = ""
        return row if values is None else tuple(values)

    def make(record: Mapping[str, Any], origin: Origin) -> list[tuple[Any, ...]]:
        head = get_record(record)
        tail = tuple(get(origin) for get in get_origin) if get_origin else ()
        if table.items is None:
            row = head + tail if tail else head
            return [finish(row) if empty else row]
        return [finish(head + get_item(item) + tail) for item in record[table.items] or ()]

    return make


def _getter(names: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """itemgetter that always returns a tuple (itemgetter of one name returns the bare value)."""
    if not names:
        return lambda _: ()
    if len(names) == 1:
        only = names[0]
        return lambda mapping: (mapping[only],)
    return itemgetter(*names)


def _columns(spec: str, empty: str = "", renamed: Mapping[str, str] | None = None) -> tuple[Column, ...]:
    """Columns from a space-separated list, each filled from the field of the same name unless renamed
    (column -> source); ``empty`` names the columns storing '' for null."""
    renamed = renamed or {}
    blanks = set(empty.split())
    return tuple(Column(name, renamed.get(name, name), name in blanks) for name in spec.split())


_GPU_COLUMNS = """time host gpu gpu_uuid gpu_model mig_instance parent_gpu_uuid source interval_group
    utilization_percent memory_used_bytes memory_total_bytes memory_utilization_percent
    memory_bandwidth_utilization_percent temperature_celsius power_watts tensor_core_utilization_percent
    pcie_tx_bytes_per_second pcie_rx_bytes_per_second energy_joules sm_clock_hz memory_clock_hz
    throttle_reasons ecc_corrected_errors ecc_uncorrected_errors xid_errors processes"""
_COST_KEY = "project gpu_model provider pricing job_id budget"

TABLES: tuple[Table, ...] = (
    Table(
        "gpu_samples",
        f"{NS}.GpuSample",
        _columns(_GPU_COLUMNS, empty="mig_instance"),
        ("host", "gpu_uuid", "mig_instance", "interval_group", "time"),
    ),
    # GpuSample.processes[]: one row per process of a sample (gpu_process_memory_used_bytes), the same
    # list gpu_samples keeps as JSON; without interval_group, since one read lists a GPU's processes.
    Table(
        "gpu_process_samples",
        f"{NS}.GpuSample",
        _columns(
            "time host gpu gpu_uuid gpu_model mig_instance pid process_name used_memory_bytes",
            empty="mig_instance",
            renamed={
                "pid": "processes[].pid",
                "process_name": "processes[].name",
                "used_memory_bytes": "processes[].used_memory_bytes",
            },
        ),
        ("host", "gpu_uuid", "mig_instance", "pid", "time"),
        items="processes",
    ),
    Table(
        "system_samples",
        f"{NS}.SystemSample",
        _columns(
            "time host source cpu_utilization_percent memory_used_bytes memory_total_bytes containers_running"
        ),
        ("host", "time"),
    ),
    Table(
        "system_disk_samples",
        f"{NS}.SystemSample",
        _columns(
            "time host mountpoint used_bytes total_bytes",
            renamed={c: f"disks[].{c}" for c in ("mountpoint", "used_bytes", "total_bytes")},
        ),
        ("host", "mountpoint", "time"),
        items="disks",
    ),
    Table(
        "system_network_samples",
        f"{NS}.SystemSample",
        _columns(
            "time host interface receive_bytes_per_second transmit_bytes_per_second",
            renamed={
                c: f"networks[].{c}"
                for c in ("interface", "receive_bytes_per_second", "transmit_bytes_per_second")
            },
        ),
        ("host", "interface", "time"),
        items="networks",
    ),
    Table(
        "job_timings",
        f"{NS}.JobTimings",
        _columns(
            "time interval_start job_id project model host kind kernel direction bytes count sum_seconds "
            "min_seconds max_seconds sketch source",
            empty="host kernel direction",
        ),
        ("job_id", "kind", "kernel", "direction", "host", "time"),
    ),
    Table(
        "job_events",
        f"{NS}.JobEvent",
        _columns(
            "time job_id event project user_pseudonym service queue model host gpu_count gpu_uuids gpu_model "
            "provider pricing media_minutes queue_wait_seconds error source",
            renamed={"user_pseudonym": "user"},
        ),
        ("job_id", "event", "time"),
    ),
    Table(
        "queue_samples",
        f"{NS}.QueueSample",
        _columns("time queue length_jobs source"),
        ("queue", "time"),
    ),
    Table(
        "pod_status",
        f"{NS}.PodStatus",
        _columns("time namespace pod host phase ready restarts source cpu_usage_cores memory_usage_bytes"),
        ("namespace", "pod", "time"),
    ),
    Table(
        "rollups",
        f"{NS}.Rollup",
        _columns(
            "series metric labels tier bucket_start bucket_end count min max sum avg p95 sketch final "
            "watermark source emitted_at",
            renamed={"emitted_at": "@timestamp"},
        ),
        ("series", "tier", "bucket_start"),
        newest=("final", "watermark", "emitted_at"),
    ),
    Table(
        "costs",
        f"{NS}.CostRecord",
        _columns(
            f"time period_end kind {_COST_KEY} gpu_hours device_hours idle_gpu_hours cost_estimated_eur "
            "job_cost_eur job_cost_per_media_minute_eur budget_eur budget_utilization_percent forecast_eur "
            "energy_kwh energy_cost_eur "
            "currency source emitted_at",
            empty=_COST_KEY,
            renamed={"emitted_at": "@timestamp"},
        ),
        ("kind", *_COST_KEY.split(), "time"),
        newest=("emitted_at",),
    ),
    # GpuEnergy: each GPU's hour, re-sent with its total so far as the hour grows (the latest wins).
    Table(
        "gpu_energy",
        f"{NS}.GpuEnergy",
        _columns(
            "time period_end gpu_uuid gpu_model device_hours energy_kwh energy_cost_eur currency source "
            "emitted_at",
            renamed={"emitted_at": "@timestamp"},
        ),
        ("gpu_uuid", "time"),
        newest=("emitted_at",),
    ),
    Table(
        "alert_history",
        f"{NS}.AlertEvent",
        _columns(
            "fingerprint rule status severity starts_at ends_at event_time value labels annotations channels "
            "source"
        ),
        ("fingerprint", "status", "starts_at"),
    ),
    Table(
        "anomalies",
        f"{NS}.Anomaly",
        _columns("time series metric labels value expected score method source"),
        ("series", "method", "time"),
    ),
    # Letters read back from the dead-letter topic; one table, several unique indexes (see 0004).
    Table(
        "dead_letters",
        f"{NS}.DeadLetter",
        _columns(
            "time stage origin_topic origin_partition origin_offset key value reason error_type source "
            "letter_topic letter_partition letter_offset",
            renamed={"letter_topic": "@topic", "letter_partition": "@partition", "letter_offset": "@offset"},
        ),
        (),
    ),
)
BY_NAME: Mapping[str, Table] = {table.name: table for table in TABLES}
BY_RECORD: Mapping[str, tuple[Table, ...]] = {
    record: tuple(t for t in TABLES if t.record == record)
    for record in dict.fromkeys(t.record for t in TABLES)
}


def rows_for(
    record_name: str, record: Mapping[str, Any], origin: Origin
) -> list[tuple[Table, tuple[Any, ...]]]:
    """Every row a decoded record becomes, with its table. KeyError for a record no table stores."""
    try:
        tables = BY_RECORD[record_name]
    except KeyError:
        raise KeyError(f"no table stores {record_name!r} records") from None
    return [(table, row) for table in tables for row in table.rows(record, origin)]


def dead_letter_row(letter: Mapping[str, Any]) -> tuple[Any, ...]:
    """A dead_letters row for a letter the sink writes itself rather than reads from the dead-letter topic:
    the letter's own topic coordinates stay null."""
    columns = BY_NAME["dead_letters"].columns
    return tuple(None if c.source in ORIGIN_FIELDS else letter[c.source] for c in columns)
