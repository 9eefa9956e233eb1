"""Series extraction: the values a decoded record carries for catalogue metrics, each with its series id and
labels (bus/catalogue.py says which field carries a metric, which records do (``where``), and its labels).

A series id is the metric name and its labels sorted by name, as in ``Rollup.series``:
``gpu_power_watts{gpu="0",host="a"}`` (label values escaped as Prometheus does). Labels whose value is null
are left out; a null value is no sample (null never means 0).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from bus import catalogue
from bus.catalogue import Metric
from bus.topics import TOPICS

if TYPE_CHECKING:
    from streams.runtime.columns import Columns

__all__ = [
    "MetricColumn",
    "Point",
    "SeriesIndex",
    "extract",
    "metrics_of",
    "points",
    "series_id",
    "series_of",
    "topic_of_record",
]


@dataclass(frozen=True, slots=True)
class Point:
    """One value of one series."""

    metric: str
    series: str
    labels: dict[str, str]
    value: float
    event_time: datetime | None = None


def topic_of_record(record_name: str) -> str:
    """The public topic carrying ``record_name`` (the first in the catalogue that is not internal): where the
    samples of a metric whose record it is come from."""
    for spec in TOPICS:
        if spec.schema == record_name and not spec.internal:
            return spec.key
    raise LookupError(f"no public topic carries {record_name}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def series_id(metric: str, labels: Mapping[str, str]) -> str:
    """``name{a="x",b="y"}`` with labels sorted by name; ``name{}`` without labels."""
    return _series_id(metric, tuple(labels.items()))


# A fleet has a bounded number of series, each seen on every sample: build each id once.
@functools.lru_cache(maxsize=1 << 16)
def _series_id(metric: str, items: tuple[tuple[str, str], ...]) -> str:
    body = ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(items))
    return f"{metric}{{{body}}}"


def _label(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@functools.cache
def _plan(metric: Metric) -> tuple[str, str, tuple[tuple[str, bool, str], ...]]:
    """Where ``metric`` lives in a record, worked out once per metric: this runs for every sample.
    (array field or "", value key, ((label, read from the array item?, key), ...))."""
    array, _, leaf = metric.field.rpartition("[].")
    labels = tuple(
        (name, bool(array) and path.startswith(f"{array}[]."), path.rpartition("[].")[2])
        for name, path in zip(metric.labels, metric.label_fields, strict=True)
    )
    return array, leaf, labels


def extract(metric: Metric, record: Mapping[str, Any]) -> list[tuple[dict[str, str], float]]:
    """(labels, value) for every series of ``metric`` in a decoded ``metric.record`` record: none when the
    record does not carry it (``where``, a null value), one per array item for an array field."""
    if metric.where and not metric.selects(record):
        return []
    array, leaf, plan = _plan(metric)
    items: Iterable[Mapping[str, Any]] = (record.get(array) or ()) if array else (record,)
    out = []
    for item in items:
        raw = item.get(leaf)
        if raw is None:
            continue
        labels = {}
        for name, from_item, key in plan:
            value = (item if from_item else record).get(key)
            if value is not None:
                labels[name] = _label(value)
        out.append((labels, float(raw)))
    return out


_KNOWN_MAX = 1 << 16
"""Most distinct label-value sets a SeriesIndex keeps worked out (a fleet's are bounded; a runaway label
is not)."""


def series_of(metric: Metric, record: Mapping[str, Any]) -> list[tuple[str, dict[str, str], float]]:
    """(series id, labels, value) for every series of ``metric`` in ``record``: :func:`extract` with the
    id."""
    return [(series_id(metric.name, labels), labels, value) for labels, value in extract(metric, record)]


class SeriesIndex:
    """The series of a fixed set of metrics in records of one kind, for processors that look at every
    metric of every sample: the label values are read once per record for all metrics that share them,
    and each distinct set of label values is turned into labels and series ids once. What it returns is
    shared between calls: read the labels, never change them."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._groups: dict[tuple[str, ...], list[Metric]] = {}
        self._arrays: list[Metric] = []
        for metric in metrics:
            array, _, plan = _plan(metric)
            if array:
                self._arrays.append(metric)
            else:
                self._groups.setdefault(tuple(field for _, _, field in plan), []).append(metric)
        self._known: dict[tuple[Any, ...], list[tuple[Metric, str, dict[str, str], str]]] = {}

    def series(self, record: Mapping[str, Any]) -> list[tuple[Metric, str, dict[str, str], float]]:
        """(metric, series id, labels, value) for every series the record carries."""
        out = []
        for fields, metrics in self._groups.items():
            key = (fields, tuple(map(record.get, fields)))
            known = self._known.get(key)
            if known is None:
                if len(self._known) >= _KNOWN_MAX:
                    self._known.clear()
                known = self._known[key] = [self._describe(metric, key[1]) for metric in metrics]
            for metric, series, labels, leaf in known:
                raw = record.get(leaf)
                if raw is not None and (not metric.where or metric.selects(record)):
                    out.append((metric, series, labels, float(raw)))
        for metric in self._arrays:
            out.extend((metric, series, labels, value) for series, labels, value in series_of(metric, record))
        return out

    def by_metric(self, columns: Columns) -> list[MetricColumn] | None:
        """What :meth:`series` gives for every row of ``columns``, metric by metric (in the order
        :meth:`series` lists them within a record); None when some metric reads an array field."""
        if self._arrays:
            return None
        out: list[MetricColumn] = []
        # Every processor with a SeriesIndex asks about the same batch: each metric's column is made once.
        memo: dict[Any, Any] = columns.memo
        for fields, metrics in self._groups.items():
            row_pairs: list[list[tuple[str, dict[str, str]]]] | None = None
            for position, metric in enumerate(metrics):
                found = memo.get(("series", metric.name))
                if found is None:
                    if row_pairs is None:
                        row_pairs = self._row_pairs(fields, metrics, columns)
                    rows, values = _present(metric, columns)
                    series = [row_pairs[row][position] for row in rows]
                    found = memo[("series", metric.name)] = MetricColumn(metric, rows, series, values)
                out.append(found)
        return out

    def _row_pairs(
        self, fields: tuple[str, ...], metrics: list[Metric], columns: Columns
    ) -> list[list[tuple[str, dict[str, str]]]]:
        """For each row, the (series id, labels) of every metric of the group: each distinct set of label
        values is described once, and its rows share the pairs."""
        keys = (
            list(zip(*(columns.values(name) for name in fields), strict=True))
            if fields
            else [()] * len(columns)
        )
        pairs: dict[tuple[Any, ...], list[tuple[str, dict[str, str]]]] = {}
        for key in set(keys):
            known = self._known.get((fields, key))
            if known is None:
                if len(self._known) >= _KNOWN_MAX:
                    self._known.clear()
                known = self._known[(fields, key)] = [self._describe(metric, key) for metric in metrics]
            pairs[key] = [(series, labels) for _, series, labels, _ in known]
        return [pairs[key] for key in keys]

    def rows(self, columns: Columns) -> list[list[Sample]] | None:
        """:meth:`series` of every row of ``columns``, row by row; None as for :meth:`by_metric`."""
        found = self.by_metric(columns)
        return None if found is None else by_row(len(columns), found)

    @staticmethod
    def _describe(metric: Metric, values: tuple[Any, ...]) -> tuple[Metric, str, dict[str, str], str]:
        _, leaf, plan = _plan(metric)
        named = zip((name for name, _, _ in plan), values, strict=True)
        labels = {name: _label(value) for name, value in named if value is not None}
        return metric, series_id(metric.name, labels), labels, leaf


Sample = tuple[Metric, str, dict[str, str], float]
"""(metric, series id, labels, value): one entry of what :meth:`SeriesIndex.series` lists."""


@dataclass(frozen=True, slots=True)
class MetricColumn:
    """One metric's samples in a batch of columns (:meth:`SeriesIndex.by_metric`)."""

    metric: Metric
    rows: list[int]
    """The rows that carry a value, ascending."""
    series: list[tuple[str, dict[str, str]]]
    """Each such row's series id and labels (shared: read them, never change them)."""
    values: list[float]


def by_row(size: int, found: list[MetricColumn]) -> list[list[Sample]]:
    """:meth:`SeriesIndex.by_metric`'s columns turned back into each row's samples, in the order
    :meth:`SeriesIndex.series` lists them."""
    out: list[list[Sample]] = [[] for _ in range(size)]
    for column in found:
        metric = column.metric
        for row, (series, labels), value in zip(column.rows, column.series, column.values, strict=True):
            out[row].append((metric, series, labels, value))
    return out


def _present(metric: Metric, columns: Columns) -> tuple[list[int], list[float]]:
    """The rows of ``columns`` that carry ``metric`` (a value, and its ``where`` selector holds), and
    those values as floats."""
    leaf = _plan(metric)[1]
    if leaf not in columns.names:
        return [], []
    if not metric.where:
        # Native for the common case: a few polars calls instead of Python loops over every row.
        column = columns.frame.get_column(leaf)
        rows = column.is_not_null().arg_true().to_list()
        return rows, column.drop_nulls().cast(pl.Float64).to_list()
    raw = columns.values(leaf)
    selected = _selected(metric, columns, len(columns))
    rows = [row for row, value in enumerate(raw) if value is not None and (selected is None or selected[row])]
    return rows, [float(raw[row]) for row in rows]


def _selected(metric: Metric, columns: Columns, size: int) -> list[bool] | None:
    """Per row whether the metric's ``where`` selector holds; None when it has none."""
    if not metric.where:
        return None
    tests = [
        (columns.values(name) if name in columns.names else [None] * size, wanted)
        for name, wanted in metric.where
    ]
    return [all(values[row] == wanted for values, wanted in tests) for row in range(size)]


def metrics_of(record_name: str, names: Iterable[str] | None = None) -> tuple[Metric, ...]:
    """The catalogue metrics a record of ``record_name`` (full Avro name) may carry, optionally only those
    named."""
    chosen = catalogue.METRICS if names is None else tuple(catalogue.get(name) for name in names)
    return tuple(metric for metric in chosen if metric.record == record_name)


def points(
    record_name: str,
    record: Mapping[str, Any],
    metrics: Iterable[Metric] | None = None,
    event_time: datetime | None = None,
) -> Iterator[Point]:
    """Every value of the record for ``metrics`` (default: all catalogue metrics of its record)."""
    for metric in metrics_of(record_name) if metrics is None else metrics:
        if metric.record != record_name:
            continue
        for labels, value in extract(metric, record):
            yield Point(metric.name, series_id(metric.name, labels), labels, value, event_time)
