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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from bus import catalogue
from streams.alerts import alert_event, topic_of_record
from streams.buckets import from_ms, to_ms
from streams.processor import Output, PartitionBatch, Result
from streams.rules import fingerprint, format_value
from streams.series import SeriesIndex

__all__ = ["ANOMALY_RECORD", "AnomalyConfig", "AnomalyProcessor", "default_metrics"]

ANOMALY_RECORD = "aima.metrics.Anomaly"
METHOD = "ewma_mad_zscore"
RULE = "anomaly"
DEFAULT_TOPICS = ("gpu.samples", "system.samples", "queue.samples")
_MAD_TO_SIGMA = 1.4826
_MAX_SENT = 16
"""Most findings a series remembers for the re-send after a restart."""


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
    alpha: float = 0.1
    """Weight of a new sample in the baseline after the warm-up."""
    warmup: int = 30
    """Samples a series learns from before it can be flagged."""
    threshold: float = 6.0
    """Score from which a sample is published as an Anomaly."""
    alert_threshold: float = 10.0
    """Score from which it also raises an alert."""
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

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.warmup < 1 or self.resolve_after < 1:
            raise ValueError("warmup and resolve_after must be at least 1")
        if not 0 < self.threshold <= self.alert_threshold:
            raise ValueError(
                f"need 0 < threshold <= alert_threshold, got {self.threshold} and {self.alert_threshold}"
            )
        for name in self.metrics or ():
            catalogue.get(name)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> AnomalyConfig:
        """``AIMA_ANOMALY_ALPHA``, ``_WARMUP``, ``_THRESHOLD``, ``_ALERT_THRESHOLD``, ``_RESOLVE_AFTER`` and
        ``_METRICS`` (comma-separated names); unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        config = cls()
        casts = {
            "alpha": float,
            "warmup": int,
            "threshold": float,
            "alert_threshold": float,
            "resolve_after": int,
        }
        changes: dict[str, Any] = {}
        for name, cast in casts.items():
            raw = env.get(f"AIMA_ANOMALY_{name.upper()}")
            if raw is not None and raw.strip():
                try:
                    changes[name] = cast(raw)
                except ValueError:
                    raise ValueError(f"AIMA_ANOMALY_{name.upper()}: not a number: {raw!r}") from None
        metrics = env.get("AIMA_ANOMALY_METRICS", "").strip()
        if metrics:
            changes["metrics"] = tuple(name.strip() for name in metrics.split(",") if name.strip())
        return replace(config, **changes)


class AnomalyProcessor:
    name = "anomalies"

    def __init__(self, config: AnomalyConfig | None = None, *, source: str = "stream") -> None:
        self.config = config or AnomalyConfig()
        self.source = source
        names = self.config.metrics if self.config.metrics is not None else default_metrics()
        self._by_record: dict[str, list[catalogue.Metric]] = {}
        for name in names:
            metric = catalogue.get(name)
            self._by_record.setdefault(metric.record, []).append(metric)
        self.topics = tuple(sorted({topic_of_record(record) for record in self._by_record}))
        self._index = {record: SeriesIndex(metrics) for record, metrics in self._by_record.items()}

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        committed = batch.committed_offset
        outputs: list[Output] = []
        if batch.resumed:
            outputs.extend(self._resend(state, committed))
        touched: dict[str, dict[str, Any]] = {}
        for record in batch.inputs:
            t = to_ms(record.event_time)
            index = self._index.get(record.record_name)
            if index is None:
                continue
            for metric, key, labels, value in index.series(record.value):
                entry = touched.get(key)
                if entry is None:
                    stored = state.get(key)
                    entry = dict(stored) if stored else {"n": 0, "mean": 0.0, "mad": 0.0, "offset": -1}
                    if entry.get("alert"):
                        entry["alert"] = dict(entry["alert"])  # never change the stored value in place
                if record.offset <= entry["offset"]:
                    continue
                entry["offset"] = record.offset
                touched[key] = entry
                for finding in self._observe(metric, labels, value, t, entry):
                    outputs.append(self._output(key, finding))
                    kept = [
                        old for old in entry.get("sent", ()) if committed is None or old["o"] >= committed
                    ]
                    entry["sent"] = [*kept, {"o": record.offset, **finding}][-_MAX_SENT:]
        for key, entry in touched.items():
            if entry.get("sent") and committed is not None:
                entry["sent"] = [old for old in entry["sent"] if old["o"] >= committed]
            state[key] = entry
        return Result(outputs)

    def _resend(self, state: MutableMapping[str, Any], committed: int | None) -> list[Output]:
        """After a restart or rebalance: what was published for records not yet committed, again (the
        crash may have lost it)."""
        return [
            self._output(key, finding)
            for key in sorted(state)
            for finding in (state.get(key) or {}).get("sent", ())
            if committed is None or finding["o"] >= committed
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
        if alert is None and z >= config.alert_threshold:
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
                    "method": METHOD,
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
                "description": f"{series} scored {z:.1f} on the {METHOD} detector "
                f"(alert from {format_value(self.config.alert_threshold)}).",
            },
            channels=self.config.channels,
            source=self.source,
        )
