"""Anomaly detection on streams (S5): per series a robust z-score against an exponentially weighted baseline,
with no hand-set threshold per metric.

For each sample ``x`` of a series, with the baseline's mean ``m`` (EWMA) and mean absolute deviation ``d``
(EW MAD) before the sample::

    z = |x - m| / max(1.4826 * d, floor)

``floor`` (the eps of the formula) keeps a flat series from scoring infinity on its first wiggle: the larger
of a per-unit minimum (``min_scale``, e.g. 1 percentage point) and ``relative_floor * |m|``. During the
first ``warmup`` samples the baseline learns (as a running mean, then with weight ``alpha``) and nothing is
flagged. After it, a sample with ``z >= threshold`` is published to the anomalies topic, and
``z >= alert_threshold`` raises an AlertEvent (rule ``anomaly``) that resolves after ``resolve_after``
normal samples (``z < threshold``) in a row. The baseline learns from every sample, with the deviation
clipped to ``threshold`` scales, so a single spike barely moves it while a lasting level shift is learnt.

State: one entry per series (keyed by series id) with the offset of the last record applied, written once
per batch; replays skip what was applied. What a series published stays in its entry until the record's
offset is committed, and is sent again on a resumed partition when it may have been lost.

That is method ``ewma_mad_zscore``. It flags what is unusual for a series, and on a GPU that is every job
start and stop (utilisation, power, temperature and memory all jump between idle and busy): about two
alerts per job. The default method, ``relations`` (streams/anomaly/relations.py), scores instead the
relations that hold on a healthy GPU (temperature against lagged power, SM clock against the busy or idle
state, memory against the job holding the GPU), one entry per GPU keyed ``host/gpu_uuid``, with the same
records, fingerprints, replay offsets and re-sends; it reads GPU samples only. ``AIMA_ANOMALY_METHOD``
chooses; ``metrics`` applies to ``ewma_mad_zscore``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from operator import itemgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from bus import catalogue
from streams.anomaly import relations
from streams.runtime.buckets import from_ms, to_ms
from streams.runtime.findings import alert_event, fingerprint, format_value
from streams.runtime.processor import Input, Output, PartitionBatch, Result
from streams.runtime.series import MetricColumn, Sample, SeriesIndex, by_row, topic_of_record
from streams.runtime.state import OFFSET, BatchState, copy_entry, offset_of

if TYPE_CHECKING:
    from streams.runtime.columns import Columns

__all__ = ["ANOMALY_RECORD", "METHODS", "AnomalyConfig", "AnomalyProcessor", "default_metrics"]

ANOMALY_RECORD = "aima.metrics.Anomaly"
METHOD = "ewma_mad_zscore"
RULE = "anomaly"
DEFAULT_TOPICS = ("gpu.samples", "system.samples", "queue.samples")
METHODS = ("relations", METHOD)
"""The detectors to choose from (``AnomalyConfig.method``); the first is the default."""
DEFAULT_ALERT_THRESHOLDS = {"relations": 6.0, METHOD: 10.0}
GPU_RECORD = "aima.metrics.GpuSample"
_MAD_TO_SIGMA = 1.4826
_MAX_SENT = 16
"""Most findings a series remembers for the re-send after a restart."""
_MIN_WIDTH = 16
"""Fewest samples per step, on average, from which a batch of columns is folded across series with numpy:
a step costs some tens of numpy calls however few series it folds, about what as many samples cost in
Python."""


def default_metrics(topics: Iterable[str] = DEFAULT_TOPICS) -> tuple[str, ...]:
    """The catalogue's gauges (rows M1-M26, not the extras) carried on ``topics``."""
    wanted = set(topics)
    return tuple(
        metric.name
        for metric in catalogue.METRICS
        if metric.type == "gauge" and metric.req_id != "extra" and _topic_or_none(metric.record) in wanted
    )


def _topic_or_none(record: str) -> str | None:
    try:
        return topic_of_record(record)
    except LookupError:
        return None


@dataclass(frozen=True)
class AnomalyConfig:
    method: str = METHODS[0]
    """``relations`` (per GPU, streams/anomaly/relations.py) or ``ewma_mad_zscore`` (per series)."""
    alpha: float = 0.1
    """Weight of a new sample in the baseline after the warm-up."""
    warmup: int = 30
    """Samples a series learns from before it can be flagged."""
    threshold: float = 6.0
    """Score from which a sample is published as an Anomaly."""
    alert_threshold: float | None = None
    """Score from which it also raises an alert; None: the method's own (:attr:`alert_from`)."""
    resolve_after: int = 5
    """Normal samples in a row that resolve the alert."""
    min_scale: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"%": 2.0, "°C": 1.0, "W": 5.0, "count": 1.0})
    )
    """Smallest scale per metric unit (the metric's unit in bus/catalogue.py)."""
    relative_floor: float = 0.02
    """Smallest scale as a share of the baseline's magnitude."""
    eps: float = 1e-9
    metrics: tuple[str, ...] | None = None
    """Metrics to watch; None: :func:`default_metrics`."""
    severity: str = "warning"
    channels: tuple[str, ...] = ("webhook",)
    # Method ``relations`` only (module doc of streams/anomaly/relations.py):
    alert_after: int = 3
    """Samples in a row scoring the alert threshold or more before a check's alert fires."""
    thermal_lag_s: float = 90.0
    """Time constant of the first-order lag through which temperature follows power."""
    relation_alpha: float = 0.02
    """Weight of a new sample in the anchors and baselines after their warm-up."""
    memory_alpha: float = 0.005
    """How fast a job's memory baseline follows a lasting change, per sample."""
    job_warmup: int = 6
    """Samples of a job that set its memory baseline before it is scored."""
    memory_floor_share: float = 0.01
    """Smallest memory scale as a share of the GPU's memory."""
    min_power_spread_w: float = 1.0
    """Least power between the busy and idle anchors for the temperature line to be drawn."""
    busy_percent: float = 10.0
    """Utilisation from which a GPU whose processes are not readable counts as busy."""

    @property
    def alert_from(self) -> float:
        """The alert threshold in force: ``alert_threshold``, or the method's default. A relation's alert
        also needs ``alert_after`` samples in a row, which no transient of a healthy GPU gives, so it can
        start lower than a single sample's alert of the z-score."""
        if self.alert_threshold is not None:
            return self.alert_threshold
        return DEFAULT_ALERT_THRESHOLDS[self.method]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != METHOD and self.metrics is not None:
            raise ValueError(f"metrics choose the series of method {METHOD}; method {self.method} reads GPUs")
        if self.alert_after < 1 or self.job_warmup < 1:
            raise ValueError("alert_after and job_warmup must be at least 1")
        if not self.thermal_lag_s > 0:
            raise ValueError(f"thermal_lag_s must be positive, got {self.thermal_lag_s}")
        for name in ("relation_alpha", "memory_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.warmup < 1 or self.resolve_after < 1:
            raise ValueError("warmup and resolve_after must be at least 1")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive (the scale divides), got {self.eps}")
        if not 0 < self.threshold <= self.alert_from:
            raise ValueError(
                f"need 0 < threshold <= alert_threshold, got {self.threshold} and {self.alert_from}"
            )
        for name in self.metrics or ():
            catalogue.get(name)


class AnomalyProcessor:
    name = "anomalies"

    def __init__(self, config: AnomalyConfig | None = None, *, source: str = "stream") -> None:
        self.config = config or AnomalyConfig()
        self.source = source
        self._relations = self.config.method == "relations"
        names = self.config.metrics if self.config.metrics is not None else default_metrics()
        if self._relations:
            names = ()
        self._by_record: dict[str, list[catalogue.Metric]] = {}
        for name in names:
            metric = catalogue.get(name)
            self._by_record.setdefault(metric.record, []).append(metric)
        self.topics = tuple(sorted({topic_of_record(record) for record in self._by_record}))
        if self._relations:
            self.topics = (topic_of_record(GPU_RECORD),)
        self._index = {record: SeriesIndex(metrics) for record, metrics in self._by_record.items()}

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        committed = batch.committed_offset
        outputs: list[Output] = []
        if batch.resumed:
            outputs.extend(self._resend(state, committed))
        if self._relations:
            return self._process_relations(batch, state, committed, outputs)
        work = BatchState(state)
        columns = batch.columns
        if columns is None:
            touched = self._fold(self._records(batch.inputs), work, committed, outputs)
        elif (index := self._index.get(columns.record_name)) is None:
            touched = {}  # a kind of record it watches no metric of
        elif (found := index.by_metric(columns)) is None:  # an array field: read per record
            touched = self._fold(self._records(batch.inputs), work, committed, outputs)
        else:
            touched = self._fold_columns(columns, found, work, committed, outputs)
        _keep(work, touched, committed)
        return Result(outputs)

    def _process_relations(
        self,
        batch: PartitionBatch,
        state: MutableMapping[str, Any],
        committed: int | None,
        outputs: list[Output],
    ) -> Result:
        """Method ``relations``: each GPU sample folded into its GPU's entry (streams/anomaly/relations)."""
        work = BatchState(state, load=copy_entry)  # entries are nested: never change the stored one
        touched: dict[str, dict[str, Any]] = {}
        for offset, t, value in _gpu_rows(batch):
            key = f"{value['host']}/{value['gpu_uuid']}"
            entry = touched.get(key) or work.get(key) or {**relations.new_entry(), OFFSET: -1}
            if offset <= entry[OFFSET]:
                continue  # a replay of what the entry holds
            entry[OFFSET] = offset
            touched[key] = entry
            findings = relations.observe(entry, value, t, self.config)
            if findings:
                outputs.extend(self._publish(key, entry, offset, findings, committed))
        _keep(work, touched, committed)
        return Result(outputs)

    def _records(self, inputs: Iterable[Input]) -> Iterator[tuple[int, int, list[Sample]]]:
        for record in inputs:
            index = self._index.get(record.record_name)
            if index is not None:
                yield record.offset, to_ms(record.event_time), index.series(record.value)

    def _fold(
        self,
        records: Iterable[tuple[int, int, list[Sample]]],
        state: BatchState,
        committed: int | None,
        outputs: list[Output],
    ) -> dict[str, dict[str, Any]]:
        """Folds (offset, event ms, samples) record by record; returns the entries it changed, in the
        order it first changed them."""
        touched: dict[str, dict[str, Any]] = {}
        for offset, t, samples in records:
            for metric, key, labels, value in samples:
                entry = touched.get(key)
                if entry is None:
                    entry = _open(state, key)
                if offset <= entry[OFFSET]:
                    continue
                entry[OFFSET] = offset
                touched[key] = entry
                findings = self._observe(metric, labels, value, t, entry)
                if findings:
                    outputs.extend(self._publish(key, entry, offset, findings, committed))
        return touched

    def _fold_columns(
        self,
        columns: Columns,
        found: list[MetricColumn],
        state: BatchState,
        committed: int | None,
        outputs: list[Output],
    ) -> dict[str, dict[str, Any]]:
        """:meth:`_fold` over columns, without the per-record dicts."""
        steps = _Steps(columns, found, state)
        if steps.samples < _MIN_WIDTH * steps.depth:  # few series, many samples each: numpy would lose
            return self._fold(_by_row(columns, found), state, committed, outputs)
        return steps.fold(self, committed, outputs)

    def _publish(
        self,
        key: str,
        entry: dict[str, Any],
        offset: int,
        findings: list[dict[str, Any]],
        committed: int | None,
    ) -> list[Output]:
        """The outputs of a sample's findings, remembered in ``entry`` for the re-send until committed."""
        published = []
        for finding in findings:
            published.append(self._output(key, finding))
            kept = [old for old in entry.get("sent", ()) if committed is None or offset_of(old) >= committed]
            entry["sent"] = [*kept, {OFFSET: offset, **finding}][-_MAX_SENT:]
        return published

    def _resend(self, state: MutableMapping[str, Any], committed: int | None) -> list[Output]:
        """After a restart or rebalance: what was published for records not yet committed, again (the
        crash may have lost it)."""
        return [
            self._output(key, finding)
            for key in sorted(state)
            for finding in (state.get(key) or {}).get("sent", ())
            if committed is None or offset_of(finding) >= committed
        ]

    def score(self, metric: catalogue.Metric, value: float, entry: Mapping[str, Any]) -> float:
        """The robust z-score of ``value`` against the baseline in ``entry``."""
        return abs(value - entry["mean"]) / self._scale(metric, entry)

    def _scale(self, metric: catalogue.Metric, entry: Mapping[str, Any]) -> float:
        """max(1.4826 * MAD, floor, eps), floor the larger of the unit's minimum and relative_floor * |mean|;
        written with comparisons rather than max(), since it runs for every metric of every sample."""
        config = self.config
        floor = config.min_scale.get(metric.unit, 0.0)
        relative = config.relative_floor * abs(entry["mean"])
        if relative > floor:
            floor = relative
        scale = _MAD_TO_SIGMA * entry["mad"]
        if floor > scale:
            scale = floor
        return scale if scale > config.eps else config.eps

    def _observe(
        self, metric: catalogue.Metric, labels: dict[str, str], value: float, t: int, entry: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Scores ``value``, updates the baseline and returns the findings to publish: each a JSON-able
        dict (``kind`` anomaly, firing or resolved) that :meth:`_output` turns into a record."""
        config = self.config
        n = entry["n"]
        if n == 0:
            entry.update(n=1, mean=value, mad=0.0)
            return []
        expected, mad = entry["mean"], entry["mad"]
        scale = self._scale(metric, entry)
        deviation = value - expected
        z = abs(deviation) / scale
        warm = n >= config.warmup
        findings: list[dict[str, Any]] = []
        if warm:
            alert = entry.get("alert")
            if z >= config.threshold or alert is not None:
                findings = self._findings(metric, labels, value, t, entry, expected, z, alert)
            limit = config.threshold * scale
            deviation = max(-limit, min(limit, deviation))
            alpha = config.alpha
        else:
            alpha = max(config.alpha, 1.0 / (n + 1))
        entry["mean"] = expected + alpha * deviation
        entry["mad"] = mad + alpha * (abs(deviation) - mad)
        entry["n"] = n + 1
        return findings

    def _findings(
        self,
        metric: catalogue.Metric,
        labels: dict[str, str],
        value: float,
        t: int,
        entry: dict[str, Any],
        expected: float,
        z: float,
        alert: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """What a warm series' sample publishes: an anomaly from ``threshold``, and its alert's changes."""
        config = self.config
        base = {"t": t, "metric": metric.name, "labels": labels, "value": value, "expected": expected, "z": z}
        findings = []
        if z >= config.threshold:
            findings.append({"kind": "anomaly", **base})
        if alert is None and z >= config.alert_from:
            fp = fingerprint(RULE, {**labels, "metric": metric.name})
            entry["alert"] = {"fingerprint": fp, "starts_at": t, "normal": 0}
            findings.append({"kind": "firing", "fingerprint": fp, "starts_at": t, **base})
        elif alert is not None:
            alert["normal"] = 0 if z >= config.threshold else alert["normal"] + 1
            if alert["normal"] >= config.resolve_after:
                entry["alert"] = None
                findings.append(
                    {"kind": "resolved", "fingerprint": alert["fingerprint"], "starts_at": alert["starts_at"]}
                    | base
                )
        return findings

    def _output(self, series: str, finding: Mapping[str, Any]) -> Output:
        metric = catalogue.get(finding["metric"])
        labels, value, expected, z, t = (finding[k] for k in ("labels", "value", "expected", "z", "t"))
        series = finding.get("series", series)  # method relations: one entry per GPU, a series per check
        method = finding.get("method", METHOD)
        if finding["kind"] == "anomaly":
            return Output(
                "anomalies",
                series,
                ANOMALY_RECORD,
                {
                    "time": from_ms(t),
                    "series": series,
                    "metric": metric.name,
                    "labels": dict(labels),
                    "value": value,
                    "expected": expected,
                    "score": z,
                    "method": method,
                    "source": self.source,
                },
            )
        unit = f" {metric.unit}" if metric.unit not in ("count", "state") else ""
        return alert_event(
            fingerprint=finding["fingerprint"],
            rule=RULE,
            status=finding["kind"],
            severity=self.config.severity,
            starts_at_ms=finding["starts_at"],
            ends_at_ms=t if finding["kind"] == "resolved" else None,
            event_time_ms=t,
            value=value,
            labels={**labels, "metric": metric.name},
            annotations={
                "summary": f"Unusual {metric.name}: {format_value(value)}{unit} "
                f"(expected about {format_value(expected)}{unit})",
                "description": f"{series} scored {z:.1f} on the {method} detector "
                f"(alert from {format_value(self.config.alert_from)})."
                + (f" {finding['note']}." if finding.get("note") else ""),
            },
            channels=self.config.channels,
            source=self.source,
        )


def _keep(work: BatchState, touched: Mapping[str, dict[str, Any]], committed: int | None) -> None:
    """Write the batch's entries once, each forgetting the findings it sent before the committed offset
    (those are durable and never re-sent)."""
    for key, entry in touched.items():
        if entry.get("sent") and committed is not None:
            entry["sent"] = [old for old in entry["sent"] if offset_of(old) >= committed]
        work.put(key, entry)
    work.flush()


def _gpu_rows(batch: PartitionBatch) -> Iterator[tuple[int, int, Mapping[str, Any]]]:
    """(offset, event ms, fields) of each GPU sample: from the columns when the batch has them, only the
    fields the relations read (building every record's whole dict costs more than the detector)."""
    columns = batch.columns
    if (
        columns is None
        or columns.record_name != GPU_RECORD
        or not set(relations.FIELDS) <= set(columns.names)
    ):
        for record in batch.inputs:
            if record.record_name == GPU_RECORD:
                yield record.offset, to_ms(record.event_time), record.value
        return
    names = relations.FIELDS
    values = [columns.values(name) for name in names]
    for offset, t, row in zip(columns.offsets, columns.event_ms, zip(*values, strict=True), strict=True):
        yield offset, t, dict(zip(names, row, strict=True))


def _open(state: BatchState, key: str) -> dict[str, Any]:
    """A series' entry to change: a copy of the stored one, or a new one."""
    stored = state.get(key)
    entry = dict(stored) if stored else {"n": 0, "mean": 0.0, "mad": 0.0, OFFSET: -1}
    if entry.get("alert"):
        entry["alert"] = dict(entry["alert"])  # never change the stored value in place
    return entry


def _by_row(columns: Columns, found: list[MetricColumn]) -> Iterator[tuple[int, int, list[Sample]]]:
    """(offset, event ms, samples) of every row, as :meth:`AnomalyProcessor._records` gives them."""
    return zip(columns.offsets, columns.event_ms, by_row(len(columns), found), strict=True)


class _Steps:
    """A batch of columns laid out to fold every series at once. The recurrence is sequential within a
    series, so step ``k`` folds the ``k``-th new sample of every series. Slots hold the series by sample
    count, most first, so the series still folding at step ``k`` are the first ``widths[k]`` slots and a
    step works on slices; ``value`` and ``row`` are (step, slot) matrices."""

    def __init__(self, columns: Columns, found: list[MetricColumn], state: BatchState) -> None:
        self.columns = columns
        self.metrics_per_row = len(found)
        keys: list[str] = []
        labels: list[dict[str, str]] = []
        metrics: list[catalogue.Metric] = []
        positions: list[int] = []
        codes: list[int] = []
        rows: list[int] = []
        values: list[float] = []
        for position, column in enumerate(found):
            described = dict(column.series)  # series id -> labels, in order of first sample
            number = {key: code for code, key in enumerate(described, len(keys))}
            keys.extend(described)
            labels.extend(described.values())
            metrics.extend([column.metric] * len(described))
            positions.extend([position] * len(described))
            codes.extend([number[key] for key, _ in column.series])
            rows.extend(column.rows)
            values.extend(column.values)
        entries = [_open(state, key) for key in keys]
        code = np.fromiter(codes, np.intp, len(codes))
        row = np.fromiter(rows, np.intp, len(rows))
        value = np.fromiter(values, np.float64, len(values))
        # Replays: what a series has already folded is a prefix of its samples here (offsets ascend).
        done = np.array([entry[OFFSET] for entry in entries], dtype=np.int64)
        if len(done) and done.max() >= columns.offsets[0]:
            new = np.asarray(columns.offsets, dtype=np.int64)[row] > done[code]
            code, row, value = code[new], row[new], value[new]
        # A stable sort by series keeps each series' samples in row order (rows ascend per metric).
        order = np.argsort(code, kind="stable")
        code, row, value = code[order], row[order], value[order]
        counts = np.bincount(code, minlength=len(keys))
        series = np.argsort(-counts, kind="stable")[: np.count_nonzero(counts)]
        self.samples = len(code)
        self.depth = int(counts[series[0]]) if len(series) else 0
        slot = np.empty(len(keys), np.intp)
        slot[series] = np.arange(len(series))
        step = np.arange(len(code)) - (np.cumsum(counts) - counts)[code]
        self.value = np.empty((self.depth, len(series)))
        self.value[step, slot[code]] = value
        self.row = np.empty((self.depth, len(series)), np.intp)
        self.row[step, slot[code]] = row
        self.counts = counts[series]
        self.widths: list[int] = np.searchsorted(-self.counts, -np.arange(self.depth)).tolist()
        order = series.tolist()
        self.keys = [keys[s] for s in order]
        self.labels = [labels[s] for s in order]
        self.metrics = [metrics[s] for s in order]
        self.positions = [positions[s] for s in order]
        self.entries = [entries[s] for s in order]

    def fold(
        self, processor: AnomalyProcessor, committed: int | None, outputs: list[Output]
    ) -> dict[str, dict[str, Any]]:
        """What :meth:`AnomalyProcessor._fold` does with these samples: :meth:`AnomalyProcessor._observe`
        in numpy, with the same float operations in the same order, so every value comes out bit for bit
        (samples are finite: validation refuses NaN and infinity). Where ``_scale`` and the clip compare,
        np.maximum and np.minimum pick the same operand, or an equal one: a tie between a zero and a
        negative zero can only happen below eps, which the last maximum replaces by eps."""
        config = processor.config
        entries = self.entries
        before = np.array([entry["n"] for entry in entries], dtype=np.int64)
        mean = np.array([entry["mean"] for entry in entries], dtype=np.float64)
        mad = np.array([entry["mad"] for entry in entries], dtype=np.float64)
        alert = np.array([entry.get("alert") is not None for entry in entries], dtype=bool)
        minimum = np.array([config.min_scale.get(metric.unit, 0.0) for metric in self.metrics])
        # A series' n at step k is its n before the batch plus k: the first m slots are all warm from
        # the step where the coldest of them is.
        coldest = np.minimum.accumulate(before) if len(before) else before
        threshold, alpha, eps = config.threshold, config.alpha, config.eps
        published: list[tuple[int, list[Output]]] = []
        for k, m in enumerate(self.widths):
            value, expected, spread = self.value[k, :m], mean[:m], mad[:m]
            relative = np.abs(expected)
            relative *= config.relative_floor
            scale = spread * _MAD_TO_SIGMA
            np.maximum(scale, np.maximum(minimum[:m], relative), out=scale)
            np.maximum(scale, eps, out=scale)
            deviation = value - expected
            magnitude = np.abs(deviation)
            z = magnitude / scale
            # max(-limit, min(limit, deviation)) is min(|deviation|, limit) with the deviation's sign.
            bounded = np.minimum(magnitude, scale * threshold)
            rate: float | np.ndarray
            if coldest[m - 1] + k >= config.warmup:
                flagged = z >= threshold
                flagged |= alert[:m]
                deviation, magnitude, rate = np.copysign(bounded, deviation), bounded, alpha
            else:
                n = before[:m] + k
                warm = n >= config.warmup
                flagged = warm & ((z >= threshold) | alert[:m])
                deviation = np.where(warm, np.copysign(bounded, deviation), deviation)
                magnitude = np.where(warm, bounded, magnitude)
                rate = np.where(warm, alpha, np.maximum(alpha, 1.0 / (n + 1)))
            hits = np.flatnonzero(flagged)
            if hits.size:
                published.extend(self._flagged(processor, k, hits, value, expected, z, alert, committed))
            change = magnitude - spread
            change *= rate
            np.add(spread, change, out=spread)
            np.add(expected, deviation * rate, out=expected)
            if k == 0 and coldest[m - 1] == 0:
                first = before[:m] == 0  # a new series starts at its first value, without a spread
                expected[first] = value[first]
                spread[first] = 0.0
        published.sort(key=itemgetter(0))
        outputs.extend(output for _, found in published for output in found)
        return self._touched((before + self.counts).tolist(), mean.tolist(), mad.tolist())

    def _flagged(
        self,
        processor: AnomalyProcessor,
        k: int,
        hits: np.ndarray,
        value: np.ndarray,
        expected: np.ndarray,
        z: np.ndarray,
        alert: np.ndarray,
        committed: int | None,
    ) -> Iterator[tuple[int, list[Output]]]:
        """What the flagged samples of step ``k`` publish, each with its place in the per-record order (by
        row, then by metric within the row); a finding can open or close the series' alert."""
        event_ms, offsets, entries = self.columns.event_ms, self.columns.offsets, self.entries
        rows = self.row[k, hits].tolist()
        values, expecteds, zs = value[hits].tolist(), expected[hits].tolist(), z[hits].tolist()
        for slot, row, x, mean, score in zip(hits.tolist(), rows, values, expecteds, zs, strict=True):
            entry = entries[slot]
            metric, labels = self.metrics[slot], self.labels[slot]
            findings = processor._findings(
                metric, labels, x, event_ms[row], entry, mean, score, entry.get("alert")
            )
            alert[slot] = entry.get("alert") is not None
            if findings:
                place = row * self.metrics_per_row + self.positions[slot]
                yield place, processor._publish(self.keys[slot], entry, offsets[row], findings, committed)

    def _touched(self, n: list[int], mean: list[float], mad: list[float]) -> dict[str, dict[str, Any]]:
        """The entries with their new baselines, in the order the per-record fold first changes them (by
        row, then by metric within the row): the order it writes them in."""
        if not self.entries:
            return {}
        offsets = self.columns.offsets
        first = self.row[0] * self.metrics_per_row + np.array(self.positions, dtype=np.intp)
        last = self.row[self.counts - 1, np.arange(len(self.counts))].tolist()
        touched: dict[str, dict[str, Any]] = {}
        for slot in np.argsort(first, kind="stable").tolist():
            entry = self.entries[slot]
            entry.update(n=n[slot], mean=mean[slot], mad=mad[slot], offset=offsets[last[slot]])
            touched[self.keys[slot]] = entry
        return touched
