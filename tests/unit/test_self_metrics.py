"""The self-metric catalogue (bus/self_metrics.py) and what each component registers cannot drift apart:
every bundle, started in a fresh registry, registers exactly its catalogue entries (name, type, help) and
exposes them under the catalogued names; names follow Prometheus' conventions; no module builds a metric
but through the catalogue."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import get_args

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bus import self_metrics
from bus.runtime import Service
from bus.self_metrics import CATALOGUE, Component, MetricDef, UndefinedMetric
from bus.settings import REPO_ROOT, Settings

PACKAGES = ("bus", "producers", "streams", "consumers", "api", "aima_metrics")
CONSTRUCTORS = {
    "Counter",
    "Gauge",
    "Histogram",
    "Summary",
    "Info",
    "Enum",
    "CounterMetricFamily",
    "GaugeMetricFamily",
    "HistogramMetricFamily",
    "SummaryMetricFamily",
    "InfoMetricFamily",
    "StateSetMetricFamily",
    "GaugeHistogramMetricFamily",
}
OWN_METRICS_ALLOWED = {
    "bus/self_metrics.py": "the catalogue's factories",
    "producers/gpu/exporter.py": "the GPU values (data metrics of bus/catalogue.py), not self-metrics",
}
NAME = re.compile(r"^aima_[a-z][a-z0-9]*(_[a-z0-9]+)*$")
LABEL = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
NOT_BASE_UNITS = {
    "ms", "us", "ns", "millis", "milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "days",
    "kb", "mb", "gb", "kib", "mib", "gib", "kilobytes", "megabytes", "gigabytes", "bits", "percent",
}  # fmt: skip
TIME_WORDS = {"duration", "latency", "time"}
RESERVED_SUFFIXES = ("_count", "_sum", "_bucket", "_created", "_gcount", "_gsum")


def _bundles() -> dict[str, Callable[[CollectorRegistry], object]]:
    """Each component's bundle, as its process builds it."""
    from aima_metrics.webhook_receiver import WebhookReceiverMetrics
    from api.metrics import ApiMetrics
    from consumers.notify.delivery import NotifierMetrics
    from consumers.sink_metrics import SinkMetrics
    from producers.dcgm.collector import DcgmCollectorMetrics
    from producers.gpu.collector import GpuCollectorMetrics
    from producers.publisher import PublisherMetrics
    from producers.system import SystemCollectorMetrics
    from streams.runtime.app import StreamMetrics

    return {
        "runtime": lambda registry: Service("test", Settings(), registry=registry),
        "publisher": PublisherMetrics,
        "gpu_collector": GpuCollectorMetrics,
        "system_collector": SystemCollectorMetrics,
        "dcgm_collector": DcgmCollectorMetrics,
        "stream": StreamMetrics,
        "sink": SinkMetrics,
        "notifier": NotifierMetrics,
        "api": ApiMetrics,
        "webhook_receiver": WebhookReceiverMetrics,
    }


def _of(component: str) -> dict[str, MetricDef]:
    return {d.family: d for d in CATALOGUE.values() if d.component == component}


def test_every_component_has_a_bundle() -> None:
    assert set(_bundles()) == set(get_args(Component))
    assert {d.component for d in CATALOGUE.values()} == set(get_args(Component))


@pytest.mark.parametrize("component", get_args(Component))
def test_bundle_registers_exactly_its_catalogue_entries(component: str) -> None:
    registry = CollectorRegistry()
    _bundles()[component](registry)
    registered = {family.name: family for family in registry.collect()}
    expected = _of(component)
    assert sorted(registered) == sorted(expected), "registered families and the catalogue differ"
    for family, definition in expected.items():
        assert (registered[family].type, registered[family].documentation) == (
            definition.kind,
            definition.help,
        )
    exposed = generate_latest(registry).decode()
    for definition in expected.values():
        assert f"\n# TYPE {definition.name} " in f"\n{exposed}", f"{definition.name} is not exposed so"


def test_name_types_list_exactly_the_definitions() -> None:
    kinds = {
        "counter": self_metrics.CounterName,
        "gauge": self_metrics.GaugeName,
        "histogram": self_metrics.HistogramName,
        "info": self_metrics.InfoName,
    }
    for kind, names in kinds.items():
        assert sorted(get_args(names)) == sorted(d.name for d in CATALOGUE.values() if d.kind == kind), kind
    assert set(get_args(self_metrics.MetricName)) == set(CATALOGUE)
    assert len({d.family for d in CATALOGUE.values()}) == len(CATALOGUE), "two entries share a family"


@pytest.mark.parametrize("definition", CATALOGUE.values(), ids=lambda d: d.name)
def test_name_follows_prometheus_conventions(definition: MetricDef) -> None:
    name = definition.name
    assert NAME.match(name), "snake_case with the aima_ prefix"
    assert name.endswith("_total") == (definition.kind == "counter"), "_total exactly on counters"
    assert name.endswith("_info") == (definition.kind == "info"), "_info exactly on infos"
    assert not definition.family.endswith(RESERVED_SUFFIXES), "a suffix Prometheus reserves for samples"
    words = name.removesuffix("_total").split("_")
    assert not NOT_BASE_UNITS & set(words), "base units only (seconds, bytes)"
    if TIME_WORDS & set(words) or definition.help.lower().startswith(("time ", "batch timings")):
        assert words[-1] == "seconds", "a time is in seconds, named so"
    if "bytes" in words:
        assert words[-1] == "bytes"
    assert definition.help.strip(), "help text"
    for label in definition.labels:
        assert LABEL.match(label) and label not in {"le", "quantile"}, label
    assert len(set(definition.labels)) == len(definition.labels)


def _metric_constructions(path: str) -> list[str]:
    """``name:line`` of each call of a prometheus_client metric or family constructor in ``path``."""
    tree = ast.parse((REPO_ROOT / path).read_text(), path)
    imported: set[str] = set()  # constructor names imported from prometheus_client
    modules: set[str] = set()  # names bound to prometheus_client modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client"):
            imported |= {alias.asname or alias.name for alias in node.names if alias.name in CONSTRUCTORS}
        elif isinstance(node, ast.Import):
            modules |= {
                (alias.asname or alias.name).split(".")[0]
                for alias in node.names
                if alias.name.startswith("prometheus_client")
            }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            found.append(f"{func.id}:{node.lineno}")
        elif isinstance(func, ast.Attribute) and func.attr in CONSTRUCTORS:
            root = func.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append(f"{func.attr}:{node.lineno}")
    return found


def test_metrics_are_built_only_through_the_catalogue() -> None:
    paths = [
        str(path.relative_to(REPO_ROOT))
        for package in PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    ]
    offenders = {
        path: calls
        for path in paths
        if path not in OWN_METRICS_ALLOWED
        if (calls := _metric_constructions(path))
    }
    assert offenders == {}, (
        "build self-metrics with bus.self_metrics (counter, gauge, histogram, info, gauge_family)"
    )


def test_factories_refuse_names_not_catalogued_and_the_wrong_type() -> None:
    registry = CollectorRegistry()
    with pytest.raises(UndefinedMetric, match=r"not in bus/self_metrics\.py"):
        self_metrics.counter("aima_made_up_total", registry)  # type: ignore[arg-type]
    with pytest.raises(UndefinedMetric, match="is a gauge, not a counter"):
        self_metrics.counter("aima_sink_paused", registry)  # type: ignore[arg-type]
    assert list(registry.collect()) == []
