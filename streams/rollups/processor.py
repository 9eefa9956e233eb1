"""S1 rollups: count, min, max, sum, avg and p95 per series (metric + labels) in hour, day, month and year
buckets of event time, cascading hour -> day -> month -> year.

State, per topic partition (see streams/runtime/processor.py), one entry per (tier, bucket start, entity): an
entity is what one record describes (a GPU, a host, a pod, a job), named by the labels every metric of its
record type carries, so one sample causes one state write per batch, however many metrics it carries, and
every series lives in exactly one entry (k8s_pod_restarts {namespace, pod} and k8s_pod_status {namespace, pod,
phase} of one pod share the pod's entry; a phase change does not split the restarts). An entry holds, per
series, an ``Aggregate`` (streams/rollups/aggregate.py; stored as ``[count, sum, min, max, zeros, bins]``):
``bins`` maps DDSketch bin keys (``ddsketch.LogarithmicMapping`` of ``relative_accuracy``, the mapping of
bus/sketch.py) to counts, and ``zeros`` counts values the mapping cannot index (zero; negative values too,
which the Avro ``Sketch`` cannot carry). Merging adds counts per key, so a month's p95 is the p95 of all its
samples within the sketch's relative accuracy (1 % by default), not an average of p95s.

Lifecycle of a bucket, driven only by event time: samples fold into their hour entry while the partition's
watermark (the largest event time seen so far, record by record in offset order) is before the hour's end
plus ``lateness``; once the watermark passes it, the hour is final: its final Rollup is emitted, it is merged
into its day (the day remembers which hours it holds, so a replayed finalisation does not merge twice), and so
on up: a day, month or year closes when its last hour does. A sample for a final hour goes to
``Result.late`` with the reason. Non-final upserts of an hour go out at most once per ``emit_interval`` of
event time; an upper tier's go out when an hour merges into it. Final rollups depend only on the records in
offset order: not on where batches end, on replays or on the wall clock (the ``watermark`` field aside,
which says how far the emitting partition's watermark was when the record went out).

Crash safety (at-least-once input, a changelog that is a prefix of the writes in order):
- every entry remembers the offset of the last record folded into it (``offset``; ``o`` in state written
  before streams/runtime/state.py gave the field one name, still read) and skips replays at or below it,
  before judging lateness, so a replayed record is neither counted twice nor dead-lettered;
- writes go parents first (year, month, day, hour: streams/runtime/state.py), so a child is never marked final
  before its parent holds it;
- a final entry keeps ``f``, the last offset of the batch that finalised it, and stays until that offset is
  committed (``PartitionBatch.committed_offset``); on a resumed partition, finals with ``f`` at or after the
  committed offset are emitted again, since their output may not have been flushed before a crash.

Series that span partitions (``Metric.spans_partitions``: job_queue_wait_seconds {queue, project} on
job.events, keyed by job_id): this partition's rollups of them are only parts, so they go to
``streams.rollup-partials`` as its partials (the same records, tagged with this topic partition), followed
by its progress whenever it closes buckets, and streams/rollups/merge.py publishes the merged rollups.

Columnar batches: when a batch comes with ``columns`` (streams/runtime/columns.py) and every metric of its
record type is a top-level scalar (GpuSample, QueueSample, PodStatus, JobEvent, CostRecord; not SystemSample,
whose disks and networks are arrays, nor JobTimings, a summary), the records are routed one by one as above
(replay, late or folded into which hour entry), then folded metric by metric from the columns into the same
aggregates, bit for bit and in the same series order, without building the per-record dicts.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import accumulate, repeat
from math import ceil, log
from typing import TYPE_CHECKING, Any

import numpy as np
from ddsketch.mapping import LogarithmicMapping

from bus.catalogue import METRICS, Metric
from bus.sketch import DEFAULT_RELATIVE_ACCURACY
from bus.topics import BY_KEY, TOPICS
from streams.rollups.aggregate import Aggregate, bins_of, quantile_of_bins
from streams.runtime.buckets import (
    HOUR_MS,
    PARENT,
    TIERS,
    Tier,
    bucket_end,
    bucket_start,
    iso,
    parse_series,
    to_ms,
)
from streams.runtime.processor import Input, Output, PartitionBatch, Result
from streams.runtime.series import series_id
from streams.runtime.state import OFFSET, BatchState

if TYPE_CHECKING:
    from streams.runtime.columns import Columns

__all__ = [
    "PARTIALS_TOPIC",
    "PARTIAL_RECORD",
    "ROLLUP_RECORD",
    "TIER_LETTER",
    "TIER_OF",
    "RollupProcessor",
    "partial_output",
    "progress_outputs",
    "quantile_of_bins",
    "rollup_topics",
]

ROLLUP_RECORD = "aima.metrics.Rollup"
PARTIAL_RECORD = "aima.metrics.RollupPartial"
PARTIALS_TOPIC = "streams.rollup-partials"
TIER_LETTER: Mapping[Tier, str] = {"hour": "h", "day": "d", "month": "m", "year": "y"}
"""A tier's letter in state keys (``<letter>|<bucket start>|...``): the changelog's key format, here and in
streams/rollups/merge.py."""
TIER_OF: Mapping[str, Tier] = {letter: tier for tier, letter in TIER_LETTER.items()}
_PARENTS_FIRST = tuple(f"{TIER_LETTER[tier]}|" for tier in reversed(TIERS))
"""The write order, parents first (``y|``, ``m|``, ``d|``, ``h|``): a child is marked final only after its
parent holds it."""
_NO_WATERMARK = -(2**62)
_LOG2 = log(2)  # the denominator of math.log(x, 2)
_OWN_SOURCES = frozenset({"cost_processor"})
"""Catalogue sources that are the stream app's own outputs."""


def partial_output(sender: tuple[str, int], rollup: dict[str, Any], watermark: int, source: str) -> Output:
    """``rollup`` as the partial of the topic partition ``sender``, for the merge (streams/rollups/merge.py):
    keyed by series, so that one merge partition holds every partial of a series."""
    value = {
        "time": watermark,
        "sender_topic": sender[0],
        "sender_partition": sender[1],
        "closed_before": None,
        "rollup": rollup,
        "source": source,
    }
    return Output(PARTIALS_TOPIC, rollup["series"], PARTIAL_RECORD, value)


def progress_outputs(
    sender: tuple[str, int], closed_before: int, watermark: int, source: str
) -> list[Output]:
    """The progress of ``sender``, one record to every partition of the partials topic: every bucket of
    that sender ending at or before ``closed_before`` is final, and its partials were listed earlier."""
    value = {
        "time": watermark,
        "sender_topic": sender[0],
        "sender_partition": sender[1],
        "closed_before": closed_before,
        "rollup": None,
        "source": source,
    }
    key = f"{sender[0]}/{sender[1]}"
    return [
        Output(PARTIALS_TOPIC, key, PARTIAL_RECORD, value, partition=partition)
        for partition in range(BY_KEY[PARTIALS_TOPIC].partitions)
    ]


def rollup_topics() -> tuple[str, ...]:
    """Every public catalogue topic whose records carry a catalogue metric measured outside the stream app.
    The app's own cost figures (costs topic) are not rolled up again: each is already a figure per period
    (hour, job, month), re-sent as an upsert while it changes and stamped with its period's start, so
    folding them by event time would count every re-send and judge a month's budget record late."""
    records = {metric.record for metric in METRICS if metric.source not in _OWN_SOURCES}
    return tuple(spec.key for spec in TOPICS if spec.schema in records and not spec.internal)


@dataclass(slots=True)
class _Group:
    """The metrics of an entity that share one ``where`` selector."""

    scalars: list[tuple[str, str]] = field(default_factory=list)
    """(field, series id) of every top-level metric."""
    arrays: list[tuple[str, str, str, dict[str, str], tuple[str, ...]]] = field(default_factory=list)
    """(metric, array field, item field, record-level labels, item label names) of every array metric."""
    summaries: list[str] = field(default_factory=list)
    """Series id of every summary metric."""


@dataclass(slots=True)
class _Entity:
    """What the records of one source share: the entity's state-key part and its metrics' series."""

    key: str
    always: _Group
    """Metrics without a selector."""
    selected: dict[Any, _Group]
    """Metrics selected by the plan's selector field, by the value that selects them."""
    other: list[tuple[tuple[tuple[str, Any], ...], _Group]]
    """Metrics with any other selector."""
    item_series: dict[tuple[str, tuple[str | None, ...]], str] = field(default_factory=dict)
    hour_keys: dict[int, str] = field(default_factory=dict)
    scalar_series: list[str | None] = field(default_factory=list)
    """Series id of every metric of the plan, by its position in ``_RecordPlan.metrics``; None for an array
    or summary metric."""


class _RecordPlan:
    """How to read one record type: which fields name its entity, and its metrics."""

    def __init__(self, record: str, metrics: Iterable[Metric]) -> None:
        self.record = record
        self.metrics = tuple(metrics)
        own = [{path for path in metric.label_fields if "[]." not in path} for metric in self.metrics]
        self.entity_fields = tuple(sorted(set().union(*own)))
        # A state entry holds every series of the fields all the metrics are labelled with, so that each
        # series lives in one entry: k8s_pod_restarts {namespace, pod} of a pod that changes phase is one
        # aggregate, while the entity (the cache of series ids) also tells k8s_pod_status's phases apart.
        self.key_fields = tuple(sorted(set.intersection(*own))) if own else ()
        self.varying = frozenset(
            index for index, fields in enumerate(own) if len(fields) > len(self.key_fields)
        )
        """Metrics (by position) whose series differ between the entities of one state entry."""
        self.signature: Callable[[Mapping[str, Any]], Any] = (
            operator.itemgetter(*self.entity_fields) if self.entity_fields else (lambda value: ())
        )
        self.always = any(not metric.where for metric in self.metrics)
        # The catalogue selects by one field per record type (JobTimings.kind, JobEvent.event,
        # CostRecord.kind): index those selectors by value instead of testing each per record.
        fields = {metric.where[0][0] for metric in self.metrics if len(metric.where) == 1}
        self.selector = fields.pop() if len(fields) == 1 else None
        self.selected_values = frozenset(
            metric.where[0][1] for metric in self.metrics if self._indexed(metric.where)
        )
        self._other = tuple(
            metric.where for metric in self.metrics if metric.where and not self._indexed(metric.where)
        )
        self.entities: dict[Any, _Entity] = {}
        # The columnar path (RollupProcessor._fold_columns) folds metric by metric: it serves plans whose
        # metrics are all top-level scalars of distinct names (so of distinct series per entity).
        self.columnar = len({metric.name for metric in self.metrics}) == len(self.metrics) and all(
            metric.type != "summary" and "[]." not in metric.field for metric in self.metrics
        )
        # The order _fold visits the metrics of a record: no selector, the indexed selector, then the
        # other selectors in order of first appearance (ties in metric order).
        others = list(dict.fromkeys(self._other))
        rank = [
            0 if not metric.where else 1 if self._indexed(metric.where) else 2 + others.index(metric.where)
            for metric in self.metrics
        ]
        self.fold_order = sorted(range(len(self.metrics)), key=lambda index: (rank[index], index))

    def _indexed(self, where: tuple[tuple[str, Any], ...]) -> bool:
        return len(where) == 1 and where[0][0] == self.selector

    def relevant(self, value: Mapping[str, Any]) -> bool:
        """Whether the record may carry any of the metrics (``where`` selectors)."""
        if self.always or (self.selector is not None and value.get(self.selector) in self.selected_values):
            return True
        return any(all(value.get(k) == v for k, v in where) for where in self._other)

    def relevant_rows(self, columns: Columns) -> Iterable[bool]:
        """:meth:`relevant` of every row of ``columns``."""
        if self.always:
            return repeat(True, len(columns))
        found = [False] * len(columns)
        if self.selector is not None:
            chosen = self.selected_values
            found = [value in chosen for value in _column(columns, self.selector)]
        for where in dict.fromkeys(self._other):
            found = [a or b for a, b in zip(found, _matches(columns, where), strict=True)]
        return found

    def signatures(self, columns: Columns) -> Iterable[Any]:
        """``signature`` of every row of ``columns``: the keys of :attr:`entities`."""
        fields = self.entity_fields
        if not fields:
            return repeat((), len(columns))
        if len(fields) == 1:  # itemgetter of one field gives the value, not a tuple
            return columns.values(fields[0])
        return zip(*(columns.values(name) for name in fields), strict=True)

    def entity_of(self, signature: Any) -> _Entity:
        """The entity of a row with this ``signature`` (:meth:`signatures`)."""
        found = self.entities.get(signature)
        if found is None:
            values = (signature,) if len(self.entity_fields) == 1 else signature
            found = self.entity(dict(zip(self.entity_fields, values, strict=True)))
        return found

    def entity(self, value: Mapping[str, Any]) -> _Entity:
        signature = self.signature(value)
        found = self.entities.get(signature)
        if found is None:
            if len(self.entities) > 100_000:  # a cache, bounded; rebuilding an entry is cheap
                self.entities.clear()
            found = self.entities[signature] = self._new_entity(value)
        return found

    def _new_entity(self, value: Mapping[str, Any]) -> _Entity:
        record_labels = {name: _label(value.get(name)) for name in self.entity_fields}
        key_labels = [record_labels[name] for name in self.key_fields]
        key = json.dumps([self.record.rsplit(".", 1)[-1], *key_labels], separators=(",", ":"))
        entity = _Entity(key, _Group(), {}, [])
        others: dict[tuple[tuple[str, Any], ...], _Group] = {}
        series: str | None
        for metric in self.metrics:
            if not metric.where:
                group = entity.always
            elif self._indexed(metric.where):
                group = entity.selected.setdefault(metric.where[0][1], _Group())
            else:
                group = others.setdefault(metric.where, _Group())
            own = {
                name: record_labels[path]
                for name, path in zip(metric.labels, metric.label_fields, strict=True)
                if "[]." not in path and record_labels[path] is not None
            }
            array, _, leaf = metric.field.rpartition("[].")
            series = None
            if metric.type == "summary":
                group.summaries.append(series_id(metric.name, own))
            elif array:
                item_labels = tuple(
                    name
                    for name, path in zip(metric.labels, metric.label_fields, strict=True)
                    if "[]." in path
                )
                group.arrays.append((metric.name, array, leaf, own, item_labels))
            else:
                series = series_id(metric.name, own)
                group.scalars.append((metric.field, series))
            entity.scalar_series.append(series)
        entity.other = list(others.items())
        return entity


def _column(columns: Columns, name: str) -> list[Any]:
    """A field's values, as ``value.get(name)`` gives them per record."""
    return columns.values(name) if name in columns.names else [None] * len(columns)


def _matches(columns: Columns, where: tuple[tuple[str, Any], ...]) -> list[bool]:
    """Whether each row satisfies a metric's ``where`` selector (as ``_fold`` tests it per record)."""
    found = [True] * len(columns)
    for name, wanted in where:
        found = [ok and value == wanted for ok, value in zip(found, _column(columns, name), strict=True)]
    return found


def _cumulative(mask: np.ndarray) -> np.ndarray:
    """How many of ``mask`` are set before each position (``len(mask) + 1`` counts)."""
    counts = np.zeros(len(mask) + 1, dtype=np.int64)
    np.cumsum(mask, out=counts[1:])
    return counts


def _loaded(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored entry as the processor works on it, its series' aggregates as :class:`Aggregate`; the
    stored entry itself is left as it was (its bins aside, which the aggregates take over)."""
    entry = dict(stored)
    entry["s"] = {series: Aggregate.from_state(agg) for series, agg in stored["s"].items()}
    return entry


def _stored(entry: dict[str, Any]) -> dict[str, Any]:
    """The stored (JSON) form of a working entry (:func:`_loaded`)."""
    stored = dict(entry)
    stored["s"] = {series: agg.to_state() for series, agg in entry["s"].items()}
    return stored


def _label(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class RollupProcessor:
    """The rollup processor of S1 (see the module doc)."""

    name = "rollups"

    def __init__(
        self,
        *,
        topics: Iterable[str] | None = None,
        lateness: timedelta = timedelta(minutes=10),
        emit_interval: timedelta = timedelta(seconds=60),
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        source: str = "stream",
    ) -> None:
        if lateness < timedelta(0) or emit_interval < timedelta(0):
            raise ValueError("lateness and emit_interval must not be negative")
        self.topics = tuple(topics) if topics is not None else rollup_topics()
        self.lateness = lateness
        self.emit_interval = emit_interval
        self.source = source
        self._lateness_ms = int(lateness.total_seconds() * 1000)
        self._emit_ms = int(emit_interval.total_seconds() * 1000)
        self.mapping = LogarithmicMapping(relative_accuracy)
        # ddsketch's own key, inlined for speed: ceil(log(x, 2) * multiplier), the same float operations as
        # LogarithmicMapping.key, so every bin matches what bus/sketch.py would produce.
        self._multiplier = self.mapping._multiplier
        self._min_indexable = self.mapping.min_possible
        self._accuracy = float(relative_accuracy)
        by_record: dict[str, list[Metric]] = {}
        for metric in METRICS:
            if not metric.per_process:  # kept raw only (bus/catalogue.py): a series per pid ever run
                by_record.setdefault(metric.record, []).append(metric)
        self._plans = {record: _RecordPlan(record, metrics) for record, metrics in by_record.items()}
        self.merged_metrics = frozenset(metric.name for metric in METRICS if metric.spans_partitions)
        """Metrics whose rollups go out as this partition's partials, to be merged across partitions
        (streams/rollups/merge.py): those the catalogue marks ``spans_partitions``."""
        spanning_records = {metric.record for metric in METRICS if metric.spans_partitions}
        self._progress_topics = frozenset(
            key for key in self.topics if key in BY_KEY and BY_KEY[key].schema in spanning_records
        )
        """Topics whose partitions send partials, and so tell the merge how far they have closed."""
        self._parsed: dict[str, tuple[str, dict[str, str]]] = {}

    # -- the batch ------------------------------------------------------------------------------------------

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        result = Result()
        columns = batch.columns
        plan = None
        if columns is not None:
            plan = self._plans.get(columns.record_name)
            if plan is not None and not plan.columnar:
                columns = None  # array or summary metrics: folded record by record
        if (len(columns) if columns is not None else len(batch.inputs)) == 0:
            return result
        previous = to_ms(batch.previous_watermark) if batch.previous_watermark is not None else None
        watermark = previous if previous is not None else _NO_WATERMARK
        work = BatchState(state, order=_PARENTS_FIRST, load=_loaded, dump=_stored)
        folded: set[str] = set()

        if columns is None:
            watermark = self._route(
                self._records(batch.inputs), work, folded, result.late, watermark, self._fold
            )
        else:
            targets: dict[str, tuple[_Entity, dict[str, Any], list[int]]] = {}

            def collect(plan: Any, entity: _Entity, row: int, entry: dict[str, Any], key: str) -> None:
                found = targets.get(key)
                if found is None:
                    targets[key] = (entity, entry, [row])
                else:
                    found[2].append(row)

            late: list[tuple[int, str]] = []
            entities = self._row_entities(plan, columns)
            rows = zip(
                columns.offsets,
                columns.event_ms,
                repeat(plan, len(columns)),
                entities,
                range(len(columns)),
                strict=True,
            )
            watermark = self._route(rows, work, folded, late, watermark, collect)
            if plan is not None:
                self._fold_columns(plan, columns, list(targets.values()), entities)
            topic, partition = batch.topic_key, batch.partition
            result.late = [(columns.input(topic, partition, row), reason) for row, reason in late]

        outputs = result.outputs
        sender = (batch.topic_key, batch.partition)
        closed = batch.resumed or previous is None or self._deadline_crossed(previous, watermark)
        if closed:
            self._close(batch, work, outputs, watermark)
        for key in folded:
            entry = work.get(key)
            last = entry["e"]
            if "f" not in entry and (last is None or watermark - last >= self._emit_ms):
                entry["e"] = watermark
                _, start, _ = key.split("|", 2)
                self._emit(
                    outputs, "hour", int(start), entry, final=False, watermark=watermark, sender=sender
                )
        if closed and batch.topic_key in self._progress_topics:
            # Last: every partial this partition has finalised so far is listed before its progress.
            outputs.extend(progress_outputs(sender, watermark - self._lateness_ms, watermark, self.source))
        work.flush()
        return result

    def _route(
        self,
        rows: Iterable[tuple[int, int, Any, _Entity | None, Any]],
        work: BatchState,
        folded: set[str],
        late: list[Any],
        watermark: int,
        fold: Callable[[Any, _Entity, Any, dict[str, Any], str], None],
    ) -> int:
        """Decide, record by record in offset order, what becomes of each: skipped as a replay, late (its
        ``item`` and the reason appended to ``late``) or handed to ``fold`` with its hour entry, which is
        then put in ``work`` and enters ``folded``. ``rows`` gives (offset, event ms, plan, entity or None
        when the record carries no metric, item). Returns the watermark after the last record."""
        hour_span = HOUR_MS + self._lateness_ms
        get = work.get
        for offset, event_ms, plan, entity, item in rows:
            if entity is not None:
                hour = event_ms - event_ms % HOUR_MS
                key = entity.hour_keys.get(hour)
                if key is None:
                    if len(entity.hour_keys) > 8:
                        entity.hour_keys.clear()
                    key = entity.hour_keys[hour] = f"h|{hour}|{entity.key}"
                entry = get(key)
                if entry is not None and offset <= entry[OFFSET]:
                    pass  # a replay of a record already folded in
                elif hour + hour_span <= watermark or (entry is not None and "f" in entry):
                    late.append((item, self._late_reason(event_ms, watermark, hour)))
                else:
                    if entry is None:
                        entry = {OFFSET: -1, "s": {}, "e": None}
                    if key not in folded:
                        work.put(key, entry)
                        folded.add(key)
                    fold(plan, entity, item, entry, key)
                    entry[OFFSET] = offset
            if event_ms > watermark:
                watermark = event_ms
        return watermark

    def _records(self, inputs: Iterable[Input]) -> Iterator[tuple[int, int, Any, _Entity | None, Input]]:
        """``_route``'s rows of the per-record path."""
        records = list(inputs)
        plans = [self._plans.get(record.record_name) for record in records]
        entities = [
            plan.entity(record.value) if plan is not None and plan.relevant(record.value) else None
            for plan, record in zip(plans, records, strict=True)
        ]
        return zip(
            [record.offset for record in records],
            [to_ms(record.event_time) for record in records],
            plans,
            entities,
            records,
            strict=True,
        )

    @staticmethod
    def _row_entities(plan: _RecordPlan | None, columns: Columns) -> list[_Entity | None]:
        """The entity of every row of the columnar path; None where the row carries no metric."""
        if plan is None:
            return [None] * len(columns)
        get, make = plan.entities.get, plan.entity_of
        return [
            (get(signature) or make(signature)) if relevant else None
            for relevant, signature in zip(plan.relevant_rows(columns), plan.signatures(columns), strict=True)
        ]

    # -- folding --------------------------------------------------------------------------------------------

    def _fold(
        self, plan: _RecordPlan, entity: _Entity, record: Input, entry: dict[str, Any], key: str
    ) -> None:
        value = record.value
        aggs = entry["s"]
        self._fold_group(entity, entity.always, value, aggs)
        if plan.selector is not None:
            group = entity.selected.get(value.get(plan.selector))
            if group is not None:
                self._fold_group(entity, group, value, aggs)
        for where, group in entity.other:
            if all(value.get(k) == v for k, v in where):
                self._fold_group(entity, group, value, aggs)

    def _fold_columns(
        self,
        plan: _RecordPlan,
        columns: Columns,
        targets: list[tuple[_Entity, dict[str, Any], list[int]]],
        entities: Sequence[_Entity | None],
    ) -> None:
        """Fold the rows ``_route`` gave each hour entry (``targets``: entity, entry, rows), metric by
        metric, into exactly the aggregates ``_fold`` makes record by record: sums added in row order, min
        and max kept as its comparisons keep them, bins by ``math.log`` (``_bin_keys``), and new series
        inserted in the order the records bring them (record by record, in ``_fold``'s metric order).
        An entry may hold the rows of several entities (``entities``, by row): a metric whose series is
        the same for all of them is folded as one chunk, the others (``plan.varying``) value by value."""
        if not targets:
            return
        order = np.array([row for _, _, rows in targets for row in rows], dtype=np.int64)
        size = len(order)
        # One row per metric (in _fold's order), one column per folded record (grouped by entry, in row
        # order within each); flattened row-major, the present values of metric m for target t are
        # xs[edges[m][t]:edges[m][t + 1]].
        metrics = [plan.metrics[index] for index in plan.fold_order]
        values = np.stack([columns.numbers(metric.field) for metric in metrics])[:, order]
        present = ~np.isnan(values)
        selected: dict[tuple[tuple[str, Any], ...], np.ndarray] = {}
        for position, metric in enumerate(metrics):
            if metric.where:
                mask = selected.get(metric.where)
                if mask is None:
                    mask = np.array(_matches(columns, metric.where), dtype=bool)[order]
                    selected[metric.where] = mask
                present[position] &= mask
        found = values[present]
        indexable = found > self._min_indexable
        keys = self._bin_keys(found[indexable])
        starts = np.fromiter(accumulate((len(rows) for _, _, rows in targets), initial=0), np.int64)
        edges = _cumulative(present.ravel())[np.arange(len(metrics))[:, None] * size + starts]
        key_edges = _cumulative(indexable)[edges].tolist()
        edges_of = edges.tolist()
        xs = found.tolist()
        aggs_of = [entry["s"] for _, entry, _ in targets]
        rows_present: list[int] | None = None
        added: dict[int, list[tuple[int, int, str]]] = {}
        for position, index in enumerate(plan.fold_order):
            bounds, key_bounds = edges_of[position], key_edges[position]
            if bounds[0] == bounds[-1]:
                continue
            varying = index in plan.varying
            for number, (entity, _, _) in enumerate(targets):
                low, high = bounds[number], bounds[number + 1]
                if low == high:
                    continue
                if varying:
                    if rows_present is None:
                        rows_present = np.broadcast_to(order, values.shape)[present].tolist()
                    aggs = aggs_of[number]
                    for at in range(low, high):
                        row = rows_present[at]
                        series = entities[row].scalar_series[index]  # type: ignore[union-attr]
                        if series not in aggs:
                            added.setdefault(number, []).append((row, position, series))
                        self._add(aggs, series, xs[at])  # type: ignore[arg-type]
                    continue
                chunk = xs[low:high]
                series = entity.scalar_series[index]
                aggs = aggs_of[number]
                agg = aggs.get(series)
                if agg is None:
                    aggs[series] = agg = Aggregate.starting_at(chunk[0])
                    if rows_present is None:
                        rows_present = np.broadcast_to(order, values.shape)[present].tolist()
                    added.setdefault(number, []).append((rows_present[low], position, series))
                agg.add_column(chunk, keys[key_bounds[number] : key_bounds[number + 1]])
        for number, new in added.items():
            if len(new) > 1:  # inserted metric by metric: reinsert them as the records brought them
                new.sort()
                aggs = targets[number][1]["s"]
                aggs.update([(series, aggs.pop(series)) for _, _, series in new])

    def _bin_keys(self, xs: np.ndarray) -> list[int]:
        """``ceil(log(x, 2) * multiplier)`` of every x (each above ``min_indexable``), as ``_fold_group``
        computes it. numpy's log may differ from ``math.log`` in the last bits, which moves a key only when
        the product lies that close to an integer: those are computed again with ``math.log``."""
        multiplier = self._multiplier
        with np.errstate(all="ignore"):
            scaled = np.log(xs) / _LOG2 * multiplier
            keys = np.ceil(scaled).astype(np.int64).tolist()
            clear = np.abs(scaled - np.rint(scaled)) > 1e-6 + 1e-9 * np.abs(scaled)
        for number in np.flatnonzero(~clear).tolist():  # also NaN and infinities: math raises as _fold does
            keys[number] = ceil(log(float(xs[number]), 2) * multiplier)
        return keys

    def _fold_group(
        self, entity: _Entity, group: _Group, value: Mapping[str, Any], aggs: dict[str, Aggregate]
    ) -> None:
        multiplier, smallest = self._multiplier, self._min_indexable
        for name, series in group.scalars:
            raw = value[name]
            if raw is None:
                continue
            x = float(raw)
            agg = aggs.get(series)
            if agg is None:
                aggs[series] = agg = Aggregate.starting_at(x)
            agg.add(x, multiplier, smallest)
        for metric, array, leaf, own, item_labels in group.arrays:
            items = value.get(array)
            if not items:
                continue
            for item in items:
                raw = item.get(leaf)
                if raw is None:
                    continue
                labels_key = (metric, tuple(_label(item.get(name)) for name in item_labels))
                series = entity.item_series.get(labels_key)
                if series is None:
                    labels = dict(own)
                    for name, label in zip(item_labels, labels_key[1], strict=True):
                        if label is not None:
                            labels[name] = label
                    series = entity.item_series[labels_key] = series_id(metric, labels)
                self._add(aggs, series, float(raw))
        for series in group.summaries:
            if value["count"] > 0:
                self._add_summary(aggs, series, value)

    def _add(self, aggs: dict[str, Aggregate], series: str, x: float) -> None:
        agg = aggs.get(series)
        if agg is None:
            aggs[series] = agg = Aggregate.starting_at(x)
        agg.add(x, self._multiplier, self._min_indexable)

    def _add_summary(self, aggs: dict[str, Aggregate], series: str, value: Mapping[str, Any]) -> None:
        """A JobTimings summary: its count, sum, min and max merge directly, its sketch by bins."""
        low, high = float(value["min_seconds"]), float(value["max_seconds"])
        sketch = value["sketch"]
        summary = Aggregate(
            int(value["count"]),
            float(value["sum_seconds"]),
            low,
            high,
            sketch["zero_count"],
            bins_of(sketch["keys"], sketch["counts"]),  # equal lengths: validated
        )
        agg = aggs.get(series)
        if agg is None:
            agg = aggs[series] = Aggregate(0, 0.0, low, high, 0, {})
        if sketch["relative_accuracy"] == self._accuracy:
            agg.merge(summary)
        else:
            # Bins of another width do not line up: re-bin each at its representative value, which adds
            # that sketch's own error to ours (documented; the SDK writes our accuracy).
            other = LogarithmicMapping(float(sketch["relative_accuracy"]))
            agg.merge(summary, lambda key: self.mapping.key(other.value(key)))

    @staticmethod
    def _merge(into: dict[str, Aggregate], aggs: Mapping[str, Aggregate]) -> None:
        for series, agg in aggs.items():
            target = into.get(series)
            if target is None:
                into[series] = agg.copy()
            else:
                target.merge(agg)

    # -- closing buckets ------------------------------------------------------------------------------------

    def _deadline_crossed(self, previous: int, watermark: int) -> bool:
        """Whether the watermark passed an hour end plus the lateness (every tier's deadline is one)."""
        return (watermark - self._lateness_ms) // HOUR_MS > (previous - self._lateness_ms) // HOUR_MS

    def _close(
        self,
        batch: PartitionBatch,
        work: BatchState,
        outputs: list[Output],
        watermark: int,
    ) -> None:
        """Finalise every open bucket whose deadline the watermark passed, tier by tier; on a resumed
        partition emit again the finals that may not have been flushed; drop finals whose offset is
        committed."""
        last_offset = batch.last_offset
        committed = batch.committed_offset
        sender = (batch.topic_key, batch.partition)
        # Finals at or after the committed position may have been lost with the outputs of a crash.
        unproven = committed if committed is not None else -1
        by_tier: dict[str, set[tuple[int, str]]] = {letter: set() for letter in "hdmy"}
        deletes: list[str] = []
        for key in work.live_keys():
            letter, start, _ = key.split("|", 2)
            if letter in by_tier:
                by_tier[letter].add((int(start), key))
        for tier in TIERS:
            letter = TIER_LETTER[tier]
            # Parents land in a later tier's set, which is sorted only when its turn comes.
            for start, key in sorted(by_tier[letter]):
                entry = work.get(key)
                if entry is None:
                    continue
                final_offset = entry.get("f")
                if final_offset is not None:
                    if batch.resumed and final_offset >= unproven:
                        self._emit(
                            outputs, tier, start, entry, final=True, watermark=watermark, sender=sender
                        )
                    if committed is not None and final_offset < committed and not work.written(key):
                        deletes.append(key)
                    continue
                if bucket_end(tier, start) + self._lateness_ms > watermark:
                    continue
                parent = PARENT[tier]
                if parent is not None:
                    parent_key = self._merge_into_parent(work, key, parent, start, entry)
                    by_tier[TIER_LETTER[parent]].add((int(parent_key.split("|", 2)[1]), parent_key))
                entry["f"] = last_offset
                work.put(key, entry)
                self._emit(outputs, tier, start, entry, final=True, watermark=watermark, sender=sender)
        for key in deletes:
            work.delete(key)
        for letter in "dmy":
            for key in work.written_keys():
                if key[0] == letter and "f" not in work.get(key):
                    _, start, _ = key.split("|", 2)
                    self._emit(
                        outputs,
                        TIER_OF[letter],
                        int(start),
                        work.get(key),
                        final=False,
                        watermark=watermark,
                        sender=sender,
                    )

    def _merge_into_parent(
        self, work: BatchState, key: str, parent: Tier, start: int, entry: dict[str, Any]
    ) -> str:
        """Merge the hour, day or month ``entry`` (key ``key``, starting at ``start``) into its ``parent``
        entry, once (the parent lists the children it holds), and put the parent; returns its key."""
        _, _, entity = key.split("|", 2)
        parent_start = bucket_start(parent, start)
        parent_key = f"{TIER_LETTER[parent]}|{parent_start}|{entity}"
        target = work.get(parent_key) or {OFFSET: -1, "s": {}, "c": []}
        if start not in target["c"]:
            self._merge(target["s"], entry["s"])
            target["c"].append(start)
            target[OFFSET] = max(target[OFFSET], entry[OFFSET])
        work.put(parent_key, target)
        return parent_key

    # -- state and outputs ----------------------------------------------------------------------------------

    def _emit(
        self,
        outputs: list[Output],
        tier: Tier,
        start: int,
        entry: dict[str, Any],
        *,
        final: bool,
        watermark: int,
        sender: tuple[str, int],
    ) -> None:
        """One Rollup per series of ``entry``; a series whose metric spans partitions goes instead as this
        partition's partial (streams/rollups/merge.py), to be merged with the other partitions' first."""
        end = bucket_end(tier, start)
        start_iso = iso(start)
        for series, agg in entry["s"].items():
            count, total = agg.count, agg.sum
            parsed = self._parsed.get(series)
            if parsed is None:
                if len(self._parsed) > 200_000:
                    self._parsed.clear()
                parsed = self._parsed[series] = parse_series(series)
            keys, counts, p95 = agg.sketch_and_p95(self.mapping)
            value = {
                "series": series,
                "metric": parsed[0],
                "labels": parsed[1],
                "tier": tier,
                "bucket_start": start,
                "bucket_end": end,
                "count": int(count),
                "min": float(agg.min),
                "max": float(agg.max),
                "sum": float(total),
                "avg": float(total) / count if count else 0.0,
                "p95": p95,
                "sketch": {
                    "relative_accuracy": self._accuracy,
                    "zero_count": float(agg.zeros),
                    "keys": keys,
                    "counts": counts,
                },
                "final": final,
                "watermark": watermark,
                "source": self.source,
            }
            if parsed[0] in self.merged_metrics:
                outputs.append(partial_output(sender, value, watermark, self.source))
            else:
                outputs.append(Output("rollups", f"{series}|{tier}|{start_iso}", ROLLUP_RECORD, value))

    def _late_reason(self, event_ms: int, watermark: int, hour: int) -> str:
        behind = timedelta(milliseconds=watermark - event_ms)
        return (
            f"rollups: event time {iso(event_ms)} is {behind} behind the watermark {iso(watermark)}; "
            f"allowed lateness {self.lateness} (AIMA_STREAMS_LATENESS_S) (hour bucket {iso(hour)} is final)"
        )
