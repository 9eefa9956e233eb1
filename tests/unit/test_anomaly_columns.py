"""The anomaly detector's columnar fold gives exactly what its per-record fold gives: the same outputs in
the same order, the same state writes in the same order, without building the per-record dicts."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from typing import Any

import polars as pl
import pytest

from streams.anomaly import processor as anomaly
from streams.anomaly.processor import AnomalyConfig, AnomalyProcessor
from streams.runtime.columns import Columns, LazyInputs
from tests.unit.columnar import Delivery, Run, deliveries, run_both, simulated_values

GPU = "aima.metrics.GpuSample"
SYSTEM = "aima.metrics.SystemSample"
QUEUE = "aima.metrics.QueueSample"
# Low thresholds and a short warm-up, so that anomalies fire and resolve alerts all along.
ZSCORE = AnomalyConfig(method="ewma_mad_zscore")
"""The per-series detector at its defaults: the one with a columnar fold (relations read records)."""
JUMPY = replace(ZSCORE, warmup=5, threshold=2.0, alert_threshold=3.0, resolve_after=2)


@functools.cache
def _values(record_name: str, hosts: int, gpus_per_host: int, hours: int) -> list[dict[str, Any]]:
    return simulated_values(
        record_name, hosts=hosts, gpus_per_host=gpus_per_host, duration=timedelta(hours=hours)
    )


def _both(
    config: AnomalyConfig,
    record_name: str = GPU,
    *,
    batch_size: int,
    replay_every: int = 3,
    hosts: int = 3,
    gpus_per_host: int = 4,
    hours: int = 4,
) -> tuple[Run, Run]:
    batches = deliveries(
        _values(record_name, hosts, gpus_per_host, hours),
        record_name,
        batch_size=batch_size,
        replay_every=replay_every,
    )
    return run_both(lambda: AnomalyProcessor(config), list(batches))


def _assert_same(rows: Run, columns: Run) -> None:
    assert columns.outputs == rows.outputs
    assert columns.state.log == rows.state.log
    assert columns.late == rows.late
    assert columns.state == rows.state


def _resumed_across(first: Delivery, second: Delivery, start: int) -> Delivery:
    """Both batches again from row ``start`` of ``first``, resumed there: records already folded and new
    ones in one batch, so each series skips a prefix of its samples."""
    committed = first.rows.inputs[start].offset
    inputs = [*first.rows.inputs[start:], *second.rows.inputs]
    old, new = first.columnar.columns, second.columnar.columns
    assert old is not None and new is not None
    frame = pl.concat([old.frame.slice(start), new.frame])
    columns = Columns(old.record_name, frame, [*old.offsets[start:], *new.offsets])
    lazy = LazyInputs(second.rows.topic_key, second.rows.partition, columns)
    return Delivery(
        replace(second.rows, inputs=inputs, committed_offset=committed, resumed=True),
        replace(second.columnar, inputs=lazy, columns=columns, committed_offset=committed, resumed=True),
    )


def _kinds(run: Run) -> Counter[str]:
    return Counter(output.value.get("status", "anomaly") for output in run.outputs)


@pytest.mark.parametrize("batch_size", [16, 64, 250, 1000])
def test_gpu_samples_fold_the_same_from_columns(batch_size: int) -> None:
    rows, columns = _both(ZSCORE, batch_size=batch_size)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    assert rows.outputs  # the simulator's fleet does have anomalies at the defaults


@pytest.mark.parametrize("batch_size", [16, 250, 1000])
def test_many_anomalies_and_alerts_fold_the_same_from_columns(batch_size: int) -> None:
    rows, columns = _both(JUMPY, batch_size=batch_size)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    kinds = _kinds(rows)
    assert kinds["anomaly"] > 0 and kinds["firing"] > 0 and kinds["resolved"] > 0, kinds


@pytest.mark.parametrize("width", [0, 10**9], ids=["always-across-series", "always-sample-by-sample"])
def test_a_resumed_batch_of_folded_and_new_records_folds_the_same(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anomaly, "_MIN_WIDTH", width)
    batches = list(deliveries(_values(GPU, 3, 4, 4), batch_size=200))
    mixed = []
    for number, delivery in enumerate(batches):
        mixed.append(delivery)
        if number + 1 < len(batches) and number % 4 in (1, 3):
            # From its middle, or from its last record alone (the very offset its series were left at).
            start = len(delivery.rows.inputs) // 2 if number % 4 == 1 else len(delivery.rows.inputs) - 1
            mixed.append(_resumed_across(delivery, batches[number + 1], start))
    rows, columns = run_both(lambda: AnomalyProcessor(JUMPY), mixed)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    assert _kinds(rows)["resolved"] > 0


@pytest.mark.parametrize("width", [0, 10**9], ids=["always-across-series", "always-sample-by-sample"])
def test_both_columnar_folds_give_the_per_record_results(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anomaly, "_MIN_WIDTH", width)
    for config in (ZSCORE, JUMPY):
        rows, columns = _both(config, batch_size=100, replay_every=2)
        _assert_same(rows, columns)
        assert columns.built_inputs == 0


def test_a_narrow_partition_folds_the_same_from_columns() -> None:
    """One GPU: a few series, many steps per batch, so the columnar fold goes sample by sample."""
    rows, columns = _both(JUMPY, batch_size=500, hosts=1, gpus_per_host=1, hours=3)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    assert _kinds(rows)["firing"] > 0


@pytest.mark.parametrize("config", [ZSCORE, JUMPY], ids=["defaults", "jumpy"])
def test_queue_samples_fold_the_same_from_columns(config: AnomalyConfig) -> None:
    rows, columns = _both(config, QUEUE, batch_size=100, hours=2)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    assert columns.state


def test_system_samples_with_array_metrics_fold_per_record() -> None:
    rows, columns = _both(JUMPY, SYSTEM, batch_size=100, hours=2)
    _assert_same(rows, columns)
    assert columns.built_inputs > 0  # disks[] and networks[]: by_metric leaves those to the records
    assert rows.outputs


def test_system_samples_without_array_metrics_fold_from_columns() -> None:
    config = replace(
        ZSCORE,
        warmup=5,
        threshold=2.0,
        alert_threshold=3.0,
        resolve_after=2,
        metrics=("host_cpu_utilization_percent", "host_memory_used_bytes", "host_containers_running"),
    )
    rows, columns = _both(config, SYSTEM, batch_size=100, hours=2)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    assert rows.outputs


def test_a_gpu_batch_is_no_work_for_a_processor_watching_only_queues() -> None:
    rows, columns = _both(replace(ZSCORE, metrics=("queue_length_jobs",)), batch_size=250)
    _assert_same(rows, columns)
    assert columns.built_inputs == 0 and not columns.state


@pytest.mark.parametrize("width", [0, 10**9], ids=["always-across-series", "always-sample-by-sample"])
def test_a_flat_zero_series_scores_against_eps(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes have no unit minimum: a series flat at 0 has a scale of eps, until it moves."""
    monkeypatch.setattr(anomaly, "_MIN_WIDTH", width)
    values = [
        {**value, "memory_used_bytes": 0} if number < 60 else value
        for number, value in enumerate(_values(GPU, 1, 1, 1))
    ]
    rows, columns = run_both(lambda: AnomalyProcessor(ZSCORE), list(deliveries(values, batch_size=100)))
    _assert_same(rows, columns)
    assert columns.built_inputs == 0
    jump = next(o for o in rows.outputs if o.value.get("metric") == "gpu_memory_used_bytes")
    assert jump.value["expected"] == 0.0 and jump.value["score"] > 1e9


def test_eps_must_be_positive() -> None:
    """A scale of 0 would divide by zero (the per-record fold raises, numpy gives inf)."""
    with pytest.raises(ValueError, match="eps must be positive"):
        AnomalyConfig(eps=0.0)
