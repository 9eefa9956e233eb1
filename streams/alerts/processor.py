"""The alert processor (S3, S4): evaluates rules on every sample in event time and publishes AlertEvents
(firing, resolved) to the alerts topic, keyed by fingerprint.

Per (rule, alert labels) one state entry, keyed ``<rule>/<fingerprint>``, moves through

    inactive --condition true--> pending --``for`` elapsed in event time--> firing  (emits firing)
    pending  --condition false--> inactive                                          (emits nothing)
    firing   --condition false for ``keep_firing_for``--> inactive                  (emits resolved)

``for: 0`` fires on the first matching sample; ``starts_at`` is when the condition first became true.
Transitions happen on the series' own samples; the partition watermark drives only the no-data policy
(``resolve`` ends a silent active alert, ``alert`` fires for a silent series). Samples older than the
entry's last one are ignored: the state describes the latest event time.

Replays: an entry remembers the offset of the last record applied to it, and records at or below it are
skipped, so a restart neither fires an alert twice nor forgets a firing one. Entries are written only when
they matter (active, changed, or tracked for no data): an inactive series whose condition stays false
costs no table write, and re-applying such a record from the same state changes nothing. An entry also
keeps the events it emitted until their records' offsets are committed; on a resumed partition
(``PartitionBatch.resumed``) those not provably committed are sent again (same fingerprint, N2), since a
crash may have lost them after their state write.

Ratio rules read ``streams.job-outcomes`` (one partition, so the ratio is fleet-wide), fed by
:class:`JobOutcomeForwarder` from ``job.events``; per-minute counts live in the rule's state entry, with a
short hash of each (job, outcome) so an outcome forwarded twice counts once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bus import catalogue
from streams.alerts.rules import Rule, load_rules
from streams.runtime.buckets import to_ms
from streams.runtime.columns import Columns
from streams.runtime.findings import alert_event, fingerprint
from streams.runtime.processor import Input, Output, PartitionBatch, Result
from streams.runtime.series import MetricColumn, Sample, SeriesIndex, topic_of_record
from streams.runtime.state import OFFSET, BatchState

if TYPE_CHECKING:
    from streams.alerts.settings import AlertSettings

__all__ = [
    "OUTCOMES_TOPIC",
    "AlertProcessor",
    "JobOutcomeForwarder",
    "alert_processors",
    "alert_processors_from_settings",
]

log = logging.getLogger(__name__)

OUTCOMES_TOPIC = "streams.job-outcomes"
OUTCOMES_KEY = "fleet"
_NO_DATA_INDEX = "~no-data"
"""Per partition: state key -> event time (ms) of the entry's last sample, for rules with a no-data policy.
Rule names cannot start with '~', so it never collides with an entry."""
_CORE = ("status", "since", "starts_at", "cleared_at")
_MAX_SENT = 16
_TARGETS_MAX = 1 << 16
"""Most (rule, series) pairs whose alert labels and fingerprint are kept worked out."""
"""Most outputs an entry remembers for the re-send after a restart (a flapping alert keeps the latest)."""


class JobOutcomeForwarder:
    """Forwards job outcomes from ``job.events`` (keyed by job) to ``streams.job-outcomes`` under one key,
    so ratio rules see the whole fleet on one partition. Remembers the last forwarded offset per partition
    so a replay forwards nothing twice, except, after a restart, what is not committed yet."""

    name = "job_outcomes"
    topics = ("job.events",)
    _APPLIED = "applied_offset"

    def __init__(self, events: Iterable[str] = ("finished", "failed")) -> None:
        self.events = frozenset(events)

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        work = BatchState(state)
        applied = work.get(self._APPLIED)
        applied = -1 if applied is None else applied
        floor = applied
        if batch.resumed:
            # What was forwarded but not committed may be lost: forward it again (the ratio counts each
            # job's outcome once).
            committed = batch.committed_offset
            floor = min(applied, -1 if committed is None else committed - 1)
        outputs = [
            Output(OUTCOMES_TOPIC, OUTCOMES_KEY, record.record_name, record.value)
            for record in batch.inputs
            if record.offset > floor and record.value.get("event") in self.events
        ]
        last = max((record.offset for record in batch.inputs), default=-1)
        if last > applied:
            work.put(self._APPLIED, last)
        work.flush()
        return Result(outputs)


class _Batch:
    """One call's working set: each entry read once (a copy, streams/runtime/state.py) and written at the end
    if it matters, and the outputs, each remembered in its entry until its offset is committed (for the
    re-send on resume). The no-data index is written before the entries: a restored index never misses a
    firing entry."""

    def __init__(self, state: MutableMapping[str, Any], batch: PartitionBatch) -> None:
        self.state = state
        self.work = BatchState(state, order=(_NO_DATA_INDEX,), load=dict)
        self.committed = batch.committed_offset
        self.last_offset = batch.last_offset
        self.outputs: list[Output] = []
        self.loaded: dict[str, dict[str, Any] | None] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.forced: set[str] = set()

    def get(self, key: str) -> dict[str, Any] | None:
        if key not in self.entries:
            self.loaded[key] = self.state.get(key)
            entry = self.work.get(key)
            if entry is None:
                return None
            self.entries[key] = entry
        return self.entries[key]

    def put(self, key: str, entry: dict[str, Any], *, force: bool = False) -> None:
        self.entries[key] = entry
        self.loaded.setdefault(key, None)
        if force:
            self.forced.add(key)

    def sent(self, entry: dict[str, Any], offset: int, item: dict[str, Any]) -> None:
        """Remember an output until the offset that caused it is committed."""
        kept = [
            old for old in entry.get("sent", ()) if self.committed is None or old[OFFSET] >= self.committed
        ]
        entry["sent"] = [*kept, {OFFSET: offset, **item}][-_MAX_SENT:]

    def flush(self) -> None:
        # By key (BatchState.flush): entries are independent, and a fixed order makes the writes the same
        # however the batch was walked (record by record, or series by series from columns).
        for key, entry in self.entries.items():
            before = self.loaded.get(key)
            if entry.get("sent") and self.committed is not None:
                entry["sent"] = [old for old in entry["sent"] if old[OFFSET] >= self.committed]
            if entry == before:
                continue
            if key in self.forced or entry["status"] != "inactive":
                self.work.put(key, entry)
            elif before is not None and any(before.get(f) != entry.get(f) for f in _CORE):
                self.work.put(key, entry)  # just went inactive; an entry never active is not worth a write
        self.work.flush()


class AlertProcessor:
    """Evaluates ``rules`` (see streams/alerts/rules.py) on the sample topics they need and on
    ``streams.job-outcomes`` for ratio rules."""

    name = "alerts"

    def __init__(self, rules: Iterable[Rule], *, source: str = "stream") -> None:
        self.rules = tuple(rules)
        self.source = source
        self._by_name = {rule.name: rule for rule in self.rules}
        self._by_record: dict[str, list[tuple[Rule, catalogue.Metric]]] = {}
        topics: set[str] = set()
        for rule in self.rules:
            if rule.ratio is not None:
                topics.add(OUTCOMES_TOPIC)
                continue
            assert rule.metric is not None
            metric = catalogue.get(rule.metric)
            self._by_record.setdefault(metric.record, []).append((rule, metric))
            topics.add(topic_of_record(metric.record))
        self._ratio_rules = tuple(rule for rule in self.rules if rule.ratio is not None)
        self.topics = tuple(sorted(topics))
        self._series = {
            record: SeriesIndex(dict.fromkeys(metric for _, metric in pairs))
            for record, pairs in self._by_record.items()
        }
        self._rules_of: dict[str, list[Rule]] = {}
        for pairs in self._by_record.values():
            for rule, metric in pairs:
                self._rules_of.setdefault(metric.name, []).append(rule)
        self._targets: dict[tuple[str, str], tuple[dict[str, str], str, str] | None] = {}

    def _target(
        self, rule: Rule, series: str, series_labels: dict[str, str]
    ) -> tuple[dict[str, str], str, str] | None:
        """For a series the rule matches: the alert's labels, fingerprint and state key (None when it does
        not match); worked out once per rule and series, since every sample asks again."""
        cache_key = (rule.name, series)
        if cache_key in self._targets:
            return self._targets[cache_key]
        if len(self._targets) >= _TARGETS_MAX:
            self._targets.clear()
        target = None
        if rule.matches(series_labels):
            labels = rule.alert_labels(series_labels)
            fp = fingerprint(rule.name, labels)
            target = (labels, fp, f"{rule.name}/{fp}")
        self._targets[cache_key] = target
        return target

    @property
    def outcome_events(self) -> frozenset[str]:
        """The job events the ratio rules count (what the forwarder must forward)."""
        return frozenset().union(*(rule.ratio.events for rule in self._ratio_rules if rule.ratio))

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        if batch.topic_key not in self.topics:
            raise ValueError(f"{self.name} does not consume {batch.topic_key!r}; it consumes {self.topics}")
        work = _Batch(state, batch)
        if batch.resumed:
            self._resend(work)
        if batch.topic_key == OUTCOMES_TOPIC:
            for record in batch.inputs:
                for rule in self._ratio_rules:
                    self._ratio(rule, record, work)
        else:
            index = dict(work.work.get(_NO_DATA_INDEX) or {})
            before = dict(index)
            if batch.columns is None or not self._sample_columns(batch.columns, work, index):
                for offset, t, found in self._samples(batch):
                    self._sample(offset, t, found, work, index)
            self._no_data(to_ms(batch.watermark), work, index)
            if index != before:  # written before the entries (_Batch)
                work.work.put(_NO_DATA_INDEX, index)
        work.flush()
        return Result(work.outputs)

    def _resend(self, work: _Batch) -> None:
        """After a restart or rebalance: publish again what the state says was sent for records not yet
        committed, since the crash may have lost it (duplicates carry the same fingerprint)."""
        for key in sorted(work.state):
            if key.startswith("~"):
                continue
            stored = work.state.get(key) or {}
            rule = self._by_name.get(stored.get("rule", ""))
            if rule is None:
                continue
            for item in stored.get("sent", ()):
                if work.committed is None or item[OFFSET] >= work.committed:
                    log.info(
                        "sending an alert event again: its offset is not committed",
                        extra={"key": key, "offset": item[OFFSET], "committed": work.committed},
                    )
                    work.outputs.append(
                        self._event(
                            rule,
                            {**stored, "starts_at": item["starts_at"]},
                            item["status"],
                            item["event_time"],
                            item["value"],
                            item["ends_at"],
                        )
                    )

    # -- threshold rules -----------------------------------------------------------------------------------

    def _samples(self, batch: PartitionBatch) -> Iterator[tuple[int, int, list[Sample]]]:
        """(offset, event ms, the series values the rules watch) of each record, in offset order."""
        for record in batch.inputs:
            series_index = self._series.get(record.record_name)
            if series_index is not None:
                yield record.offset, to_ms(record.event_time), series_index.series(record.value)

    def _sample_columns(self, columns: Columns, work: _Batch, index: dict[str, int]) -> bool:
        """:meth:`_sample` for every row of ``columns``, taken series by series: each (rule, series) entry
        is looked up and written once per batch, not once per sample. A series' samples keep their row
        order, and the outputs are put back in the order the record-by-record path makes them (row, metric
        within the row, rule). False, having changed nothing, when the columns cannot be read this way
        (array metrics, or several series of the batch feeding one alert)."""
        series_index = self._series.get(columns.record_name)
        if series_index is None:
            return True
        found = series_index.by_metric(columns)
        if found is None:
            return False
        # Each (rule, series) with its samples; the walk below keeps row order only within one entry, so
        # rule labels that fold several series into one alert send the batch record by record.
        plan: list[tuple[int, int, Rule, tuple[dict[str, str], str, str], list[int], MetricColumn]] = []
        keys: set[str] = set()
        for position, column in enumerate(found):
            by_series: dict[str, list[int]] = {}
            for item, (series, _) in enumerate(column.series):
                by_series.setdefault(series, []).append(item)
            for series, items in by_series.items():
                series_labels = column.series[items[0]][1]
                for rank, rule in enumerate(self._rules_of[column.metric.name]):
                    target = self._target(rule, series, series_labels)
                    if target is not None:
                        if target[2] in keys:
                            return False
                        keys.add(target[2])
                        plan.append((position, rank, rule, target, items, column))
        offsets, times, outputs = columns.offsets, columns.event_ms, work.outputs
        first_output = len(outputs)
        order: list[tuple[int, int, int]] = []
        for position, rank, rule, (labels, fp, key), items, column in plan:
            entry = work.get(key)
            applied = False
            for item in items:
                row = column.rows[item]
                offset = offsets[row]
                if entry is not None and offset <= entry[OFFSET]:
                    continue  # applied before a restart
                if entry is None:
                    entry = _new_entry(rule, fp, labels)
                entry[OFFSET] = offset
                applied = True
                t, value = times[row], column.values[item]
                if entry["last_seen"] is None or t >= entry["last_seen"]:
                    entry["last_seen"], entry["value"], entry["no_data"] = t, value, False
                    made = len(outputs)
                    self._step(rule, entry, t, value, rule.holds(value), work, offset)
                    if len(outputs) > made:
                        order += [(row, position, rank)] * (len(outputs) - made)
            if applied and entry is not None:
                self._applied(rule, key, entry, work, index)
        if order:
            ranked = sorted(zip(order, outputs[first_output:], strict=True), key=lambda pair: pair[0])
            outputs[first_output:] = [output for _, output in ranked]
        return True

    def _sample(self, offset: int, t: int, found: list[Sample], work: _Batch, index: dict[str, int]) -> None:
        for metric, series, series_labels, value in found:
            for rule in self._rules_of[metric.name]:
                target = self._target(rule, series, series_labels)
                if target is None:
                    continue
                labels, fp, key = target
                entry = work.get(key)
                if entry is not None and offset <= entry[OFFSET]:
                    continue  # applied before a restart
                if entry is None:
                    entry = _new_entry(rule, fp, labels)
                entry[OFFSET] = offset
                if entry["last_seen"] is None or t >= entry["last_seen"]:
                    entry["last_seen"], entry["value"], entry["no_data"] = t, value, False
                    self._step(rule, entry, t, value, rule.holds(value), work, offset)
                self._applied(rule, key, entry, work, index)

    @staticmethod
    def _applied(rule: Rule, key: str, entry: dict[str, Any], work: _Batch, index: dict[str, int]) -> None:
        """After samples were applied to an entry: keep it, and its place in the no-data index."""
        work.put(key, entry, force=rule.no_data == "alert")
        if rule.no_data == "alert" or (rule.no_data == "resolve" and entry["status"] != "inactive"):
            index[key] = entry["last_seen"]
        else:
            index.pop(key, None)

    def _no_data(self, watermark: int, work: _Batch, index: dict[str, int]) -> None:
        for key, last_seen in sorted(index.items()):
            rule = self._by_name.get(key.partition("/")[0])
            if rule is None or rule.no_data == "keep":
                del index[key]  # the rule is gone or changed since
                continue
            deadline = last_seen + int(rule.no_data_after.total_seconds() * 1000)
            if deadline > watermark:
                continue
            del index[key]
            entry = work.get(key)
            if entry is None:
                continue
            if rule.no_data == "resolve":
                if entry["status"] == "firing":
                    self._emit(work, rule, entry, "resolved", watermark, None, work.last_offset, deadline)
                entry.update(status="inactive", since=None, cleared_at=None)
            elif entry["status"] != "firing":
                entry.update(status="firing", since=deadline, starts_at=deadline, cleared_at=None)
                entry["no_data"] = True
                self._emit(work, rule, entry, "firing", watermark, None, work.last_offset)
            work.put(key, entry, force=True)

    # -- ratio rules ---------------------------------------------------------------------------------------

    def _ratio(self, rule: Rule, record: Input, work: _Batch) -> None:
        spec = rule.ratio
        assert spec is not None
        labels = dict(rule.labels)
        fp = fingerprint(rule.name, labels)
        key = f"{rule.name}/{fp}"
        entry = work.get(key) or _new_entry(rule, fp, labels) | {"buckets": {}}
        if record.offset <= entry[OFFSET]:
            return
        entry[OFFSET] = record.offset
        event = record.value.get("event")
        if event not in spec.events:
            work.put(key, entry)
            return
        t = to_ms(record.event_time)
        width = int(spec.bucket.total_seconds() * 1000)
        now = max(t, entry["last_seen"] or t)
        oldest = now // width * width - (int(spec.window / spec.bucket) - 1) * width
        buckets = {start: counts for start, counts in entry["buckets"].items() if int(start) >= oldest}
        bucket = str(t // width * width)
        # The forwarder may send an outcome twice (a re-send after a restart): count each (job, event) once.
        outcome = hashlib.sha256(f"{record.value.get('job_id')}\x00{event}".encode()).hexdigest()[:12]
        if int(bucket) >= oldest and not any(outcome in counts[2] for counts in buckets.values()):
            numerator, denominator, seen = buckets.get(bucket, (0, 0, []))
            buckets[bucket] = [
                numerator + (event in spec.numerator),
                denominator + (event in spec.denominator),
                [*seen, outcome],
            ]
        entry["buckets"] = {start: buckets[start] for start in sorted(buckets, key=int)}
        numerator = sum(counts[0] for counts in buckets.values())
        denominator = sum(counts[1] for counts in buckets.values())
        value = 100.0 * numerator / denominator if denominator >= spec.min_count else None
        entry["last_seen"], entry["value"] = now, value
        self._step(rule, entry, now, value, value is not None and rule.holds(value), work, record.offset)
        work.put(key, entry, force=True)

    # -- the state machine ---------------------------------------------------------------------------------

    def _step(
        self,
        rule: Rule,
        entry: dict[str, Any],
        t: int,
        value: float | None,
        holds: bool,
        work: _Batch,
        offset: int,
    ) -> None:
        status = entry["status"]
        if holds:
            entry["cleared_at"] = None
            if status == "inactive":
                entry["since"], status = t, "pending"
                entry["status"] = status
            if status == "pending" and t - entry["since"] >= _ms(rule.for_):
                entry["status"], entry["starts_at"] = "firing", entry["since"]
                self._emit(work, rule, entry, "firing", t, value, offset)
        elif status == "pending":
            entry.update(status="inactive", since=None)
        elif status == "firing":
            if entry["cleared_at"] is None:
                entry["cleared_at"] = t
            if t - entry["cleared_at"] >= _ms(rule.keep_firing_for):
                self._emit(work, rule, entry, "resolved", t, value, offset, t)
                entry.update(status="inactive", since=None, cleared_at=None)

    def _emit(
        self,
        work: _Batch,
        rule: Rule,
        entry: dict[str, Any],
        status: str,
        t: int,
        value: float | None,
        offset: int,
        ends_at: int | None = None,
    ) -> None:
        work.outputs.append(replace(self._event(rule, entry, status, t, value, ends_at), cause_offset=offset))
        item = {"status": status, "event_time": t, "value": value, "starts_at": entry["starts_at"]}
        work.sent(entry, offset, item | {"ends_at": ends_at})

    def _event(
        self,
        rule: Rule,
        entry: Mapping[str, Any],
        status: str,
        t: int,
        value: float | None,
        ends_at: int | None = None,
    ) -> Output:
        labels = entry["labels"]
        return alert_event(
            fingerprint=entry["fingerprint"],
            rule=rule.name,
            status=status,
            severity=rule.severity,
            starts_at_ms=entry["starts_at"],
            ends_at_ms=ends_at,
            event_time_ms=t,
            value=value,
            labels=labels,
            annotations=rule.render_annotations(value, labels),
            channels=rule.channels,
            source=self.source,
        )


def _ms(duration: timedelta) -> int:
    return int(duration.total_seconds() * 1000)


def _new_entry(rule: Rule, fp: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "rule": rule.name,
        "fingerprint": fp,
        "labels": dict(labels),
        "status": "inactive",
        "since": None,
        "starts_at": None,
        "cleared_at": None,
        "last_seen": None,
        "value": None,
        "no_data": False,
        OFFSET: -1,
    }


def alert_processors(
    rules: Iterable[Rule] | None = None, *, rule_paths: Iterable[str | Path] = (), defaults: bool = True
) -> list[AlertProcessor | JobOutcomeForwarder]:
    """The processors alerting needs: the alert processor and, when a rule needs job outcomes, the
    forwarder that feeds it. Without ``rules``: the default rules (unless ``defaults`` is false) plus those
    of ``rule_paths``."""
    chosen = load_rules(rule_paths, defaults=defaults) if rules is None else tuple(rules)
    alerts = AlertProcessor(chosen)
    processors: list[AlertProcessor | JobOutcomeForwarder] = [alerts]
    if alerts.outcome_events:
        processors.insert(0, JobOutcomeForwarder(alerts.outcome_events))
    return processors


def alert_processors_from_settings(settings: AlertSettings) -> list[AlertProcessor | JobOutcomeForwarder]:
    """The alert processors the worker's :class:`streams.settings.AlertSettings` ask for: the rule files
    of ``AIMA_ALERT_RULES``, with the shipped defaults unless ``AIMA_ALERT_DEFAULT_RULES`` is false."""
    return alert_processors(rule_paths=settings.rules, defaults=settings.default_rules)
