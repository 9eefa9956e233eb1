"""Selective storage (requirement D6): a per-metric deadband and heartbeat that decide which raw sample
rows the database sink keeps. The configuration is one YAML file beside the metric catalogue,
``bus/selective_storage.yaml`` (its comments show the format; AIMA_SINK_SELECTIVE_STORAGE names another
file); :func:`load` reads and checks it. As shipped it is off (``enabled: false``).

The rule, per source (one GPU's sampling group, one host, one disk or interface of a host): a row is stored
when one of its metrics moved beyond its deadband since the last row stored of that source, or when the
heartbeat has elapsed (in event time) since then. :func:`keeps` is that decision; the sink
(consumers/sink_filter.py) and the bench (bench/deadband.py) both call it.

- deadband ``abs: 2.0``: moved when ``|value - last| > 2.0``; ``rel: 0.05``: when it exceeds 5 % of
  ``|last|``; both given, the wider of the two (a relative band with an absolute floor near zero). A metric
  of a filtered row that the file does not list has a deadband of 0: any change stores the row.
- null against a value (either way) is a change; null against null is none.
- heartbeat: per metric (``heartbeat: 5m``) or one default for every listed metric; a row's heartbeat is
  the shortest of its listed metrics'. None at all: a flat source stores only its changes.
- the first row of a source (after a start or a partition reassignment) is always stored, and so is a row
  not newer than the last stored one (a replay or a clock step back: the filter never guesses).

Which records: GpuSample and SystemSample, the raw samples that dominate the volume (gpu_samples,
system_samples, system_disk_samples, system_network_samples). Job timings and events, queue samples,
pod states, rollups, costs, alerts and anomalies are always stored in full. Only the sink's raw rows are
filtered: the stream app (rollups, alerts, anomalies) reads every sample from Kafka.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from bus import catalogue
from bus.durations import InvalidDuration, parse_duration

__all__ = [
    "DEFAULT_FILE",
    "EXACT",
    "FILTERED_RECORDS",
    "Band",
    "Kept",
    "MetricRule",
    "SelectiveStorage",
    "SelectiveStorageError",
    "keeps",
    "load",
    "parse",
]

DEFAULT_FILE = Path(__file__).with_name("selective_storage.yaml")
FILTERED_RECORDS = (f"{catalogue.NS}.GpuSample", f"{catalogue.NS}.SystemSample")
"""The records whose raw rows may be filtered; a metric of another record cannot be listed."""


class SelectiveStorageError(ValueError):
    """The file cannot be read or breaks the format; the message names the file and the place in it."""


@dataclass(frozen=True, slots=True)
class Band:
    """A deadband: how far a value may move from the last stored one before its row is stored again."""

    abs: float = 0.0
    rel: float = 0.0
    """A share of ``|last|`` (0.05: 5 %)."""

    def moved(self, last: Any, value: Any) -> bool:
        """Whether ``value`` moved beyond the band around ``last``."""
        if value == last:  # both null, equal values, the same infinity
            return False
        if value is None or last is None:
            return True
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True  # not a number (and not equal): a change
        if math.isnan(value) or math.isnan(last):
            return not (math.isnan(value) and math.isnan(last))
        return abs(value - last) > max(self.abs, self.rel * abs(last))


EXACT = Band()
"""Any change at all: the band of a metric the file does not list."""


@dataclass(frozen=True, slots=True)
class MetricRule:
    metric: str
    """Catalogue name (bus/catalogue.py)."""
    band: Band
    heartbeat: timedelta | None


@dataclass(frozen=True, slots=True)
class Kept:
    """The last stored row of a source: its event time, its metrics' values and its other compared
    values."""

    time: datetime
    values: tuple[Any, ...]
    exact: tuple[Any, ...] = ()


def keeps(
    last: Kept | None,
    time: datetime,
    values: Sequence[Any],
    bands: Sequence[Band],
    heartbeat: timedelta | None,
    exact: tuple[Any, ...] = (),
) -> bool:
    """Whether a source's row of event time ``time`` is stored, given ``last``, the source's last stored
    row (None: none yet). ``values`` and ``last.values``: the metrics' values in the order of ``bands``;
    ``exact`` and ``last.exact``: values any change of which stores the row (the row's other columns,
    compared as one tuple); ``heartbeat``: the row's, None for none."""
    if last is None or time <= last.time:
        return True
    if heartbeat is not None and time - last.time >= heartbeat:
        return True
    if exact != last.exact:
        return True
    return any(band.moved(old, new) for band, old, new in zip(bands, last.values, values, strict=True))


@dataclass(frozen=True)
class SelectiveStorage:
    """A loaded configuration. ``enabled`` False (or no metric listed): every row is stored."""

    enabled: bool = False
    metrics: Mapping[str, MetricRule] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<none>"
    """The file it came from, for logs."""

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.metrics)

    def rule(self, metric: str) -> MetricRule | None:
        """The rule of a catalogue metric; None when the file does not list it (or storage is off)."""
        return self.metrics.get(metric) if self.enabled else None


def load(path: Path | None = None) -> SelectiveStorage:
    """The configuration in ``path`` (default :data:`DEFAULT_FILE`)."""
    path = DEFAULT_FILE if path is None else Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SelectiveStorageError(f"cannot read selective storage file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SelectiveStorageError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, source=str(path))


def parse(data: Any, source: str = "<config>") -> SelectiveStorage:
    """A configuration from the YAML's data; every error names ``source`` and the place in it."""
    try:
        return _parse(data if data is not None else {}, source)
    except SelectiveStorageError as exc:
        raise SelectiveStorageError(f"{source}: {exc}") from None


def _parse(data: Any, source: str) -> SelectiveStorage:
    top = _mapping(data, "top level")
    _known(top, {"enabled", "heartbeat", "metrics"}, "top level")
    enabled = top.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SelectiveStorageError(f"enabled: must be true or false, not {enabled!r}")
    default_heartbeat = _heartbeat(top.get("heartbeat"), "heartbeat")
    rules: dict[str, MetricRule] = {}
    for name, raw in _mapping(top.get("metrics") or {}, "metrics").items():
        where = f"metrics.{name}"
        try:
            metric = catalogue.get(str(name))
        except catalogue.UnknownMetric as exc:
            raise SelectiveStorageError(f"{where}: {exc}") from None
        if metric.record not in FILTERED_RECORDS:
            short = metric.record.rsplit(".", 1)[-1]
            raise SelectiveStorageError(
                f"{where}: only GpuSample and SystemSample rows are filtered; {name} comes in {short} records"
            )
        spec = _mapping(raw if raw is not None else {}, where)
        _known(spec, {"abs", "rel", "heartbeat"}, where)
        band = Band(
            _amount(spec.get("abs", 0.0), f"{where}.abs"), _amount(spec.get("rel", 0.0), f"{where}.rel")
        )
        own = _heartbeat(spec.get("heartbeat"), f"{where}.heartbeat")
        rules[metric.name] = MetricRule(metric.name, band, own if own is not None else default_heartbeat)
    return SelectiveStorage(enabled, MappingProxyType(rules), source)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SelectiveStorageError(f"{where}: must be a mapping, not {type(value).__name__}")
    return value


def _known(value: Mapping[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        known = ", ".join(sorted(keys))
        raise SelectiveStorageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {known}")


def _amount(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise SelectiveStorageError(f"{where}: must be a finite number >= 0, not {value!r}")
    return float(value)


def _heartbeat(value: Any, where: str) -> timedelta | None:
    if value is None:
        return None
    try:
        every = parse_duration(value)
    except InvalidDuration as exc:
        raise SelectiveStorageError(f"{where}: {exc}") from None
    if every <= timedelta(0):
        raise SelectiveStorageError(f"{where}: must be longer than 0")
    return every
