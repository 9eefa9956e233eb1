"""streams.runtime.columns and the columnar paths that are not a processor's own module: Columns gives exactly
what Codec.decode gives, LazyInputs builds the dicts only when asked, SeriesIndex.rows equals
SeriesIndex.series record for record, ColumnValidator agrees with Validator, and the alert and device-hours
processors give the same state and outputs from columns as from per-record inputs, without building the
per-record dicts."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from bus.codec import Codec
from bus.frames import FrameDecoders
from bus.validation import ColumnValidator, Validator
from streams.alerts.processor import AlertProcessor
from streams.alerts.rules import default_rules, parse_rules
from streams.costs import DeviceHoursProcessor
from streams.runtime.series import SeriesIndex, metrics_of
from tests.unit.columnar import SAMPLE_RECORDS, deliveries, run_both, simulated_values

GPU = "aima.metrics.GpuSample"

# Thresholds the simulated fleet crosses often, so alerts go pending, fire and resolve.
BUSY_RULES = """
rules:
  - name: HotGpu
    metric: gpu_temperature_celsius
    condition: gt
    threshold: 60
    for: 30s
    keep_firing_for: 20s
    severity: warning
  - name: BusyGpu
    metric: gpu_utilization_percent
    match: {host: sim-gpu-01}
    condition: ge
    threshold: 50
    severity: info
    no_data: alert
    no_data_after: 1m
  - name: QuietGpu
    metric: gpu_power_watts
    condition: lt
    threshold: 200
    severity: info
    no_data: resolve
    no_data_after: 1m
"""


@pytest.fixture(scope="module")
def gpu_values() -> list[dict[str, Any]]:
    return simulated_values(GPU, hosts=3, gpus_per_host=4, duration=timedelta(hours=2))


def test_columns_hold_what_codec_decode_gives(gpu_values: list[dict[str, Any]]) -> None:
    codec = Codec()
    delivery = next(deliveries(gpu_values[:300], batch_size=300))
    columns = delivery.columnar.columns
    assert columns is not None
    decoded = [codec.decode(codec.encode(GPU, value))[1] for value in gpu_values[:300]]
    assert columns.records() == decoded
    assert columns.record(17) == decoded[17]
    for name in columns.names:
        expected = [value[name] for value in decoded]
        if name == "time":
            expected = [int(value.timestamp() * 1000) for value in expected]
        assert columns.values(name) == expected, name
    power = columns.numbers("power_watts")
    assert [None if x != x else x for x in power.tolist()] == [value["power_watts"] for value in decoded]
    late = columns.input("gpu.samples", 0, 5)
    assert (late.offset, late.value, late.event_time) == (5, decoded[5], decoded[5]["time"])


def test_lazy_inputs_build_the_dicts_once_and_only_when_asked(gpu_values: list[dict[str, Any]]) -> None:
    delivery = next(deliveries(gpu_values[:100], batch_size=100))
    inputs = delivery.columnar.inputs
    assert len(inputs) == 100 and not inputs.built  # type: ignore[attr-defined]
    assert delivery.columnar.last_offset == 99
    assert inputs.built is False  # type: ignore[attr-defined]
    assert list(inputs) == list(delivery.rows.inputs)
    assert inputs.built  # type: ignore[attr-defined]
    assert inputs[-1] is inputs[-1]


@pytest.mark.parametrize("record_name", SAMPLE_RECORDS)
def test_series_index_rows_equal_series(record_name: str) -> None:
    values = simulated_values(record_name, duration=timedelta(minutes=30))
    index = SeriesIndex(metrics_of(record_name))
    checked = 0
    for delivery in deliveries(values, record_name, batch_size=64):
        columns = delivery.columnar.columns
        assert columns is not None
        rows = index.rows(columns)
        if rows is None:  # a metric read from array items: the per-record path serves those
            assert any("[]." in metric.field for metric in metrics_of(record_name))
            return
        assert rows == [index.series(record.value) for record in delivery.rows.inputs]
        checked += sum(map(len, rows))
    assert checked > 0


def test_column_validator_agrees_with_the_per_record_validator(gpu_values: list[dict[str, Any]]) -> None:
    codec, validator, columns = Codec(), Validator(), ColumnValidator()
    decoder = FrameDecoders(codec).get(GPU)
    assert decoder is not None
    rng = random.Random(5)
    spoilt = {
        "utilization_percent": [float("nan"), float("inf"), -0.5, 100.5, 100.0, None],
        "power_watts": [-1.0, float("-inf"), 0.0],
        "memory_used_bytes": [-1, 0, None],
        "processes": [[{"pid": 1, "name": "x", "used_memory_bytes": -3}], [], None],
        "gpu": [-1, 7],
        "host": ["h" * 257, "h" * 256],
        "gpu_model": ["m" * 1000],
    }
    outcomes = set()
    for _ in range(40):
        chosen = [dict(value) for value in rng.sample(gpu_values, 20)]
        field = rng.choice(sorted(spoilt))
        chosen[rng.randrange(20)][field] = rng.choice(spoilt[field])
        frame = decoder.decode([codec.encode(GPU, value) for value in chosen])
        assert frame.columns is not None
        expected = all(not validator.problems(GPU, record) for record in frame.records())
        assert columns.all_valid(GPU, frame.columns) is expected
        outcomes.add(expected)
    assert outcomes == {True, False}


def _same(make: Any, values: list[dict[str, Any]], **kwargs: Any) -> tuple[Any, Any]:
    rows, columnar = run_both(make, list(deliveries(values, **kwargs)))
    assert columnar.built_inputs == 0
    assert columnar.outputs == rows.outputs
    assert columnar.state.log == rows.state.log
    assert columnar.late == rows.late
    return rows, columnar


@pytest.mark.parametrize("batch_size", [16, 250, 1000])
def test_alerts_from_columns_equal_alerts_from_records(
    gpu_values: list[dict[str, Any]], batch_size: int
) -> None:
    rows, _ = _same(
        lambda: AlertProcessor(parse_rules(BUSY_RULES)), gpu_values, batch_size=batch_size, replay_every=3
    )
    statuses = {output.value["status"] for output in rows.outputs}
    assert statuses == {"firing", "resolved"}
    _same(lambda: AlertProcessor(default_rules()), gpu_values, batch_size=batch_size, replay_every=3)


@pytest.mark.parametrize("batch_size", [16, 250])
def test_device_hours_from_columns_equal_device_hours_from_records(
    gpu_values: list[dict[str, Any]], batch_size: int
) -> None:
    values = [dict(value) for value in gpu_values]
    for value in values[len(values) // 2 :: 97]:
        value["time"] -= timedelta(hours=3)  # older than the retention below: late
    for emit_interval in (timedelta(0), timedelta(seconds=60)):  # every batch's changes, and coalesced
        rows, _ = _same(
            lambda emit_interval=emit_interval: DeviceHoursProcessor(
                retention=timedelta(hours=1), max_gap=timedelta(seconds=30), emit_interval=emit_interval
            ),
            values,
            batch_size=batch_size,
            replay_every=2,
        )
        assert rows.outputs and rows.late


def test_indexes_sharing_a_batch_share_its_metric_columns(gpu_values: list[dict[str, Any]]) -> None:
    # The top-level ones: an array metric (per-process memory) takes the record path.
    metrics = tuple(metric for metric in metrics_of(GPU) if "[]." not in metric.field)
    first, second = SeriesIndex(metrics[:6]), SeriesIndex(metrics[3:])
    shared = next(deliveries(gpu_values[:200], batch_size=200)).columnar.columns
    fresh = next(deliveries(gpu_values[:200], batch_size=200)).columnar.columns
    assert shared is not None and fresh is not None
    one, two = first.by_metric(shared), second.by_metric(shared)
    assert one is not None and two is not None
    assert one[3] is two[0]  # made once, for the first index
    assert two == SeriesIndex(metrics[3:]).by_metric(fresh)


def test_alerts_folding_several_series_into_one_fall_back_to_records(
    gpu_values: list[dict[str, Any]],
) -> None:
    # The rule's labels override the series' gpu and gpu_uuid: every GPU of a host feeds one alert, whose
    # samples must come in row order, so the batch goes record by record.
    folding = BUSY_RULES.replace(
        "    no_data: resolve\n", "    no_data: resolve\n    labels: {gpu: all, gpu_uuid: all}\n"
    )
    rows, columnar = run_both(
        lambda: AlertProcessor(parse_rules(folding)), list(deliveries(gpu_values, batch_size=250))
    )
    assert columnar.built_inputs > 0
    assert columnar.outputs == rows.outputs and columnar.state.log == rows.state.log
    assert any(output.value["labels"].get("gpu") == "all" for output in rows.outputs)
