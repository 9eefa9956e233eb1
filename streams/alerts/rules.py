"""Alert rules (S3, S4): the rule model, YAML loading with errors that name the rule and the field, label
matchers (the grammar: bus/matchers.py), annotation templates and the alert fingerprint.

A rules file is a list of rules, or a mapping with a ``rules`` list::

    rules:
      - name: GpuTemperatureHigh
        metric: gpu_temperature_celsius      # a name from bus/catalogue.py
        match: ['gpu_model=~".*H100.*"']     # optional: =, !=, =~, !~ (anchored regexes); or {label: value}
        condition: gt                        # gt ge lt le eq ne
        threshold: 85
        for: 0                               # how long the condition holds before firing: 0, 30s, 10m, 1h30m
        keep_firing_for: 0                   # how long it keeps firing after the condition stopped
        severity: critical                   # critical warning info
        channels: [webhook]
        labels: {team: platform}             # added to the alert's labels
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.host }} at {{ $value }} °C"
        no_data: keep                        # keep | resolve | alert, when a series falls silent
        no_data_after: 5m

A ratio rule replaces ``metric`` with ``ratio`` over job outcomes in a sliding event-time window; its value
is a percentage (numerator over denominator, times 100)::

        ratio: {numerator: [failed], denominator: [finished, failed], window: 5m, min_count: 20}

``{name: X, enabled: false}`` and nothing else switches off a rule loaded earlier (e.g. a default rule).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from bus import catalogue
from bus.durations import format_duration, parse_duration
from bus.matchers import Matcher, matchers_of
from streams.runtime.findings import format_value

__all__ = [
    "CONDITIONS",
    "DEFAULT_RULES_PATH",
    "RatioSpec",
    "Rule",
    "RuleError",
    "default_rules",
    "load_rules",
    "parse_rules",
    "render",
]

DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.yaml")

CONDITIONS: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {
        "gt": operator.gt,
        "ge": operator.ge,
        "lt": operator.lt,
        "le": operator.le,
        "eq": operator.eq,
        "ne": operator.ne,
    }
)
_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "==", "ne": "!="}
SEVERITIES = ("critical", "warning", "info")
NO_DATA_POLICIES = ("keep", "resolve", "alert")
JOB_OUTCOMES = ("queued", "started", "finished", "failed")
NoData = Literal["keep", "resolve", "alert"]


class RuleError(ValueError):
    """A rule that cannot be loaded; names the file, the rule and the field."""

    def __init__(self, message: str, *, rule: str | None = None, field: str | None = None, source: str = ""):
        self.rule, self.field, self.source = rule, field, source
        where = " ".join(
            part
            for part in (
                source and f"{source}:",
                rule is not None and f"rule {rule!r}",
                field is not None and f"field {field!r}:",
            )
            if part
        )
        super().__init__(f"{where} {message}" if where else message)


# -- templates ---------------------------------------------------------------------------------------------

_TEMPLATE = re.compile(
    r"\{\{-?\s*(?:printf\s+\"(?P<fmt>[^\"]*)\"\s+)?\$(?P<var>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:\.(?P<label>[A-Za-z_][A-Za-z0-9_]*))?\s*-?\}\}"
)
_TEMPLATE_VARS = ("value", "labels", "threshold", "rule", "metric", "severity")


def _template_problems(text: str, labels: Iterable[str] | None) -> list[str]:
    problems = []
    for hit in _TEMPLATE.finditer(text):
        var, label = hit["var"], hit["label"]
        if var not in _TEMPLATE_VARS:
            problems.append(f"unknown template variable ${var} (known: ${', $'.join(_TEMPLATE_VARS)})")
        elif (var == "labels") != (label is not None):
            problems.append(f"{hit[0]}: write $labels.<name>" if var == "labels" else f"{hit[0]}: no fields")
        elif label is not None and labels is not None and label not in labels:
            problems.append(f"{hit[0]}: the alert has no label {label!r} (labels: {', '.join(labels)})")
        if hit["fmt"] is not None:
            try:
                hit["fmt"] % 1.0
            except (TypeError, ValueError):
                problems.append(f"{hit[0]}: bad printf format {hit['fmt']!r}")
    leftover = _TEMPLATE.sub("", text)
    if "{{" in leftover:
        problems.append(f"cannot read template in {text!r}: use {{{{ $value }}}} or {{{{ $labels.host }}}}")
    return problems


def render(text: str, *, value: float | None, labels: Mapping[str, str], rule: Rule | None = None) -> str:
    """Expands ``{{ $value }}``, ``{{ $labels.host }}``, ``{{ printf "%.1f" $value }}``, ``{{ $threshold }}``,
    ``{{ $rule }}``, ``{{ $metric }}`` and ``{{ $severity }}``. A missing label renders empty."""

    def expand(hit: re.Match[str]) -> str:
        var, fmt = hit["var"], hit["fmt"]
        raw: Any
        if var == "labels":
            return labels.get(hit["label"], "")
        if var == "value":
            raw = value
        elif var == "threshold":
            raw = rule.threshold if rule else None
        elif var == "rule":
            return rule.name if rule else ""
        elif var == "metric":
            return (rule.metric or "") if rule else ""
        elif var == "severity":
            return rule.severity if rule else ""
        else:
            return hit[0]
        if fmt is not None and raw is not None:
            return fmt % raw
        return format_value(raw)

    return _TEMPLATE.sub(expand, text)


# -- the model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioSpec:
    """Share of job outcomes: events of ``numerator`` over events of ``denominator`` in the last
    ``window`` (event time, per-minute buckets), as a percentage; undefined below ``min_count``."""

    numerator: tuple[str, ...]
    denominator: tuple[str, ...]
    window: timedelta
    min_count: int
    bucket: timedelta = timedelta(minutes=1)

    @property
    def events(self) -> frozenset[str]:
        return frozenset(self.numerator) | frozenset(self.denominator)


@dataclass(frozen=True)
class Rule:
    name: str
    condition: str
    threshold: float
    severity: str
    metric: str | None = None
    """Catalogue metric; None for a ratio rule."""
    ratio: RatioSpec | None = None
    matchers: tuple[Matcher, ...] = ()
    for_: timedelta = timedelta(0)
    keep_firing_for: timedelta = timedelta(0)
    channels: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    no_data: NoData = "keep"
    no_data_after: timedelta = timedelta(minutes=5)

    def holds(self, value: float) -> bool:
        return CONDITIONS[self.condition](value, self.threshold)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(matcher.matches(labels) for matcher in self.matchers)

    def alert_labels(self, series_labels: Mapping[str, str]) -> dict[str, str]:
        """The alert's labels: the series' labels plus the rule's (the rule's win)."""
        return {**series_labels, **self.labels}

    def render_annotations(self, value: float | None, labels: Mapping[str, str]) -> dict[str, str]:
        return {
            key: render(text, value=value, labels=labels, rule=self) for key, text in self.annotations.items()
        }

    def describe(self) -> str:
        """E.g. ``gpu_temperature_celsius > 85 for 0s``."""
        subject = self.metric
        if self.ratio is not None:
            subject = f"ratio({'+'.join(self.ratio.numerator)} / {'+'.join(self.ratio.denominator)}) %"
        symbol = _SYMBOLS[self.condition]
        return f"{subject} {symbol} {format_value(self.threshold)} for {format_duration(self.for_)}"


# -- loading -----------------------------------------------------------------------------------------------

_FIELDS = {
    "name",
    "metric",
    "ratio",
    "match",
    "condition",
    "threshold",
    "for",
    "keep_firing_for",
    "severity",
    "channels",
    "labels",
    "annotations",
    "no_data",
    "no_data_after",
    "enabled",
}
_RATIO_FIELDS = {"numerator", "denominator", "window", "min_count"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ALIASES = {">": "gt", ">=": "ge", "<": "lt", "<=": "le", "==": "eq", "=": "eq", "!=": "ne"}


def default_rules() -> tuple[Rule, ...]:
    """The rules of S4 that ship with the package and are on unless switched off."""
    return load_rules([], defaults=True)


def load_rules(paths: Iterable[str | Path] = (), *, defaults: bool = True) -> tuple[Rule, ...]:
    """The default rules (unless ``defaults`` is false), then each file's in order. A later rule replaces
    an earlier one of the same name; ``{name: X, enabled: false}`` removes X."""
    sources: list[Path] = [DEFAULT_RULES_PATH] if defaults else []
    sources.extend(Path(path) for path in paths)
    rules: dict[str, Rule] = {}
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleError(f"cannot read rules file: {exc.strerror or exc}", source=str(path)) from None
        for name, rule in _parse(text, str(path)):
            if rule is None:
                rules.pop(name, None)
            else:
                rules[name] = rule
    return tuple(rules.values())


def parse_rules(text: str, source: str = "<rules>") -> tuple[Rule, ...]:
    """The enabled rules of one YAML document (without the defaults)."""
    return tuple(rule for _, rule in _parse(text, source) if rule is not None)


def _parse(text: str, source: str) -> list[tuple[str, Rule | None]]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"not valid YAML: {exc}", source=source) from None
    if document is None:
        return []
    if isinstance(document, Mapping):
        unknown = set(document) - {"rules"}
        if unknown:
            keys = sorted(map(str, unknown))
            raise RuleError(f"unknown top-level keys {keys}; expected 'rules'", source=source)
        document = document.get("rules") or []
    if not isinstance(document, list):
        raise RuleError("expected a list of rules, or a mapping with a 'rules' list", source=source)
    seen: set[str] = set()
    parsed = []
    for index, entry in enumerate(document):
        if not isinstance(entry, Mapping):
            raise RuleError(f"rule #{index + 1} is not a mapping", source=source)
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            message = f"rule #{index + 1}: 'name' must be a name like GpuTemperatureHigh, got {name!r}"
            raise RuleError(message, source=source)
        if name in seen:
            raise RuleError("defined twice in the same file", rule=name, source=source)
        seen.add(name)
        parsed.append((name, _rule(name, entry, source)))
    return parsed


def _rule(name: str, entry: Mapping[str, Any], source: str) -> Rule | None:
    def fail(field: str, message: str) -> RuleError:
        return RuleError(message, rule=name, field=field, source=source)

    unknown = sorted(str(key) for key in set(entry) - _FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field; known fields: {', '.join(sorted(_FIELDS))}")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("enabled", f"must be true or false, got {enabled!r}")
    if not enabled:
        return None

    metric: catalogue.Metric | None = None
    ratio: RatioSpec | None = None
    if ("metric" in entry) == ("ratio" in entry):
        raise fail("metric", "give exactly one of 'metric' (a catalogue metric) or 'ratio'")
    if "metric" in entry:
        try:
            metric = catalogue.get(str(entry["metric"]))
        except catalogue.UnknownMetric as exc:
            raise fail("metric", str(exc)) from None
    else:
        ratio = _ratio(entry["ratio"], fail)

    for required in ("condition", "threshold", "severity"):
        if required not in entry:
            raise fail(required, "missing")
    condition = str(entry["condition"]).strip()
    condition = _ALIASES.get(condition, condition)
    if condition not in CONDITIONS:
        known = ", ".join(CONDITIONS)
        raise fail("condition", f"unknown condition {entry['condition']!r}; use one of {known}")
    threshold = entry["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise fail("threshold", f"must be a finite number, got {threshold!r}")
    severity = entry["severity"]
    if severity not in SEVERITIES:
        raise fail("severity", f"unknown severity {severity!r}; use one of {', '.join(SEVERITIES)}")

    durations = {}
    for key, default in (("for", "0"), ("keep_firing_for", "0"), ("no_data_after", "5m")):
        try:
            durations[key] = parse_duration(entry.get(key, default))
        except ValueError as exc:
            raise fail(key, str(exc)) from None
    if durations["no_data_after"] <= timedelta(0):
        raise fail("no_data_after", "must be longer than 0")

    no_data = entry.get("no_data", "keep")
    if no_data not in NO_DATA_POLICIES:
        raise fail("no_data", f"unknown policy {no_data!r}; use one of {', '.join(NO_DATA_POLICIES)}")
    if ratio is not None and no_data != "keep":
        raise fail("no_data", "a ratio rule has no series to fall silent; leave no_data at keep")

    channels = entry.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
        raise fail("channels", f"must be a list of channel names, got {channels!r}")

    labels = _string_map(entry.get("labels", {}), fail, "labels")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise fail("labels", f"bad label name {label!r}")
    annotations = _string_map(entry.get("annotations", {}), fail, "annotations")

    matchers = _matchers(entry.get("match", []), fail)
    series_labels = metric.labels if metric is not None else ()
    for matcher in matchers:
        if matcher.name not in series_labels:
            raise fail(
                "match",
                f"{matcher}: the series have no label {matcher.name!r}"
                + (f" (labels: {', '.join(series_labels)})" if series_labels else " (a ratio rule has none)"),
            )
    known_labels = (*series_labels, *labels)
    for key, text in annotations.items():
        problems = _template_problems(text, known_labels)
        if problems:
            raise fail(f"annotations.{key}", "; ".join(problems))

    return Rule(
        name=name,
        condition=condition,
        threshold=float(threshold),
        severity=severity,
        metric=metric.name if metric else None,
        ratio=ratio,
        matchers=matchers,
        for_=durations["for"],
        keep_firing_for=durations["keep_firing_for"],
        channels=tuple(channels),
        labels=MappingProxyType(labels),
        annotations=MappingProxyType(annotations),
        no_data=no_data,
        no_data_after=durations["no_data_after"],
    )


def _string_map(value: Any, fail: Callable[[str, str], RuleError], field: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise fail(field, f"must be a mapping of names to strings, got {value!r}")
    out = {}
    for key, text in value.items():
        if not isinstance(key, str) or isinstance(text, Mapping | list) or text is None:
            raise fail(field, f"{key!r}: must map a name to a string, got {text!r}")
        out[key] = text if isinstance(text, str) else str(text)
    return out


def _matchers(value: Any, fail: Callable[[str, str], RuleError]) -> tuple[Matcher, ...]:
    try:
        if isinstance(value, Mapping):
            return tuple(Matcher(str(label), "=", str(wanted)) for label, wanted in value.items())
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"must be a list like ['host=a', 'gpu_model=~\".*H100.*\"'], got {value!r}")
        return matchers_of(value)
    except ValueError as exc:
        raise fail("match", str(exc)) from None


def _ratio(value: Any, fail: Callable[[str, str], RuleError]) -> RatioSpec:
    if not isinstance(value, Mapping):
        raise fail("ratio", "must be a mapping with numerator, denominator, window and min_count")
    unknown = sorted(str(key) for key in set(value) - _RATIO_FIELDS)
    if unknown:
        raise fail(f"ratio.{unknown[0]}", f"unknown field; known: {', '.join(sorted(_RATIO_FIELDS))}")
    sides = {}
    for side in ("numerator", "denominator"):
        events = value.get(side)
        if isinstance(events, str):
            events = [events]
        if not events or not isinstance(events, list) or not set(events) <= set(JOB_OUTCOMES):
            known = ", ".join(JOB_OUTCOMES)
            raise fail(f"ratio.{side}", f"must list job events out of {known}, got {events!r}")
        sides[side] = tuple(events)
    if not set(sides["numerator"]) <= set(sides["denominator"]):
        raise fail("ratio.numerator", "every numerator event must also count in the denominator")
    try:
        window = parse_duration(value.get("window", "5m"))
    except ValueError as exc:
        raise fail("ratio.window", str(exc)) from None
    if window < timedelta(minutes=1) or window.total_seconds() % 60:
        raise fail("ratio.window", "must be a whole number of minutes (the window slides by the minute)")
    min_count = value.get("min_count", 1)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise fail("ratio.min_count", f"must be a whole number >= 1, got {min_count!r}")
    return RatioSpec(sides["numerator"], sides["denominator"], window, min_count)
