"""streams.runtime.series: SeriesIndex and series_of give what extract and series_id give, record for record,
for every catalogue metric of every simulated record kind (scalars, array items, ``where`` selectors)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus import catalogue
from producers.simulator import Fleet, generate
from streams.runtime.series import SeriesIndex, extract, metrics_of, series_id, series_of

START = datetime(2026, 11, 29, tzinfo=UTC)


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    fleet = Fleet(seed=11, hosts=2, gpus_per_host=4, start=START)
    for _topic, _key, name, value in generate(fleet, START, START + timedelta(minutes=20), 5):
        by_name[f"aima.metrics.{name}" if "." not in name else name].append(value)
    return by_name


def _expected(
    metrics: tuple[catalogue.Metric, ...], record: dict[str, Any]
) -> list[tuple[str, str, Any, float]]:
    return sorted(
        (metric.name, series_id(metric.name, labels), labels, value)
        for metric in metrics
        for labels, value in extract(metric, record)
    )


def test_series_index_equals_extract(records: dict[str, list[dict[str, Any]]]) -> None:
    checked = set()
    for record_name, values in records.items():
        metrics = metrics_of(record_name)
        if not metrics:
            continue
        index = SeriesIndex(metrics)
        for value in values:
            got = sorted((m.name, series, labels, x) for m, series, labels, x in index.series(value))
            assert got == _expected(metrics, value)
            # Asked twice (the cached path), the answer is the same.
            assert sorted((m.name, s, labels, x) for m, s, labels, x in index.series(value)) == got
            checked.update(name for name, *_ in got)
    # Scalar, array-item and selected metrics were all among those compared.
    kinds = {("[]." in catalogue.get(n).field, bool(catalogue.get(n).where)) for n in checked}
    assert {(False, False), (True, False), (False, True)} <= kinds


def test_series_of_equals_extract(records: dict[str, list[dict[str, Any]]]) -> None:
    for record_name, values in records.items():
        for metric in metrics_of(record_name):
            for value in values[:50]:
                got = [(series, labels, x) for series, labels, x in series_of(metric, value)]
                want = [(series_id(metric.name, labels), labels, x) for labels, x in extract(metric, value)]
                assert got == want


def test_null_values_and_labels() -> None:
    metric = catalogue.get("gpu_utilization_percent")
    index = SeriesIndex([metric])
    record = {"host": "h", "gpu": 0, "gpu_uuid": "G", "mig_instance": None, "utilization_percent": None}
    assert index.series(record) == []  # null is no sample
    record["utilization_percent"] = 7
    ((got_metric, series, labels, value),) = index.series(record)
    assert got_metric is metric and value == 7.0 and isinstance(value, float)
    assert "mig_instance" not in labels and series == series_id(metric.name, labels)
