"""The rollup processor's columnar path (``PartitionBatch.columns``) gives exactly what its per-record path
gives: the same outputs in the same order, the same state writes and deletes in the same order (their JSON),
the same late records with the same reasons, without ever building the per-record dicts."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from math import ceil, log
from typing import Any

import numpy as np
import polars as pl
import pytest

from bus.codec import Codec
from streams.rollups.processor import RollupProcessor
from streams.runtime.buckets import from_ms
from streams.runtime.columns import Columns, LazyInputs
from streams.runtime.processor import Input, PartitionBatch
from tests.unit.columnar import START, Delivery, Run, deliveries, run_both, simulated_values


def rollups(**options: Any) -> Callable[[], RollupProcessor]:
    return lambda: RollupProcessor(**{"emit_interval": timedelta(minutes=5), **options})


def assert_same(rows: Run, columnar: Run, *, built: bool = False) -> None:
    assert columnar.outputs == rows.outputs
    assert columnar.state.log == rows.state.log
    assert columnar.late == rows.late
    assert dict(columnar.state) == dict(rows.state)
    if not built:
        assert columnar.built_inputs == 0


def gpu_values(hours: int = 26) -> list[dict[str, Any]]:
    """Four GPUs, one sample a minute each: past a day's end plus the lateness, so hours close, cascade
    into their day and the day closes too."""
    return simulated_values(hosts=2, gpus_per_host=2, duration=timedelta(hours=hours), step_s=60.0)


@pytest.mark.parametrize("batch_size", [16, 250, 1000])
def test_gpu_samples_over_a_day_fold_alike_with_replays(batch_size: int) -> None:
    values = gpu_values()
    batches = list(deliveries(values, batch_size=batch_size, replay_every=3))
    replays = [
        delivery for delivery in batches if delivery.columnar.resumed and delivery.columnar.committed_offset
    ]
    # deliveries() re-delivers from the middle of a batch only when the batch has 32 records or more.
    assert bool(replays) == (batch_size > 16)
    rows, columnar = run_both(rollups(), batches)
    assert_same(rows, columnar)
    log = rows.state.log
    assert any(key.startswith("d|") for key, _ in log), "hours merged into their day"
    assert any(value is None for _, value in log), "finals deleted once committed"
    assert sum(1 for output in rows.outputs if output.value["final"] and output.value["tier"] == "day") > 0
    assert rows.late == []


def test_gpu_samples_without_lateness_fold_alike() -> None:
    values = gpu_values(hours=5)
    rows, columnar = run_both(
        rollups(lateness=timedelta(0)), list(deliveries(values, batch_size=250, replay_every=2))
    )
    assert_same(rows, columnar)


def shifted(
    values: list[dict[str, Any]], lateness: timedelta
) -> tuple[list[dict[str, Any]], set[int], set[int]]:
    """``values`` with some records moved back in time by more than an hour plus the lateness (late once
    their hour is final) and some by less than the lateness (on time); the positions of both."""
    rng = random.Random(11)
    out = [dict(value) for value in values]
    far, near = set(), set()
    for position in range(200, len(out), 29):
        if rng.random() < 0.5:
            out[position]["time"] -= timedelta(hours=1) + lateness + timedelta(minutes=rng.randint(1, 50))
            far.add(position)
        else:
            out[position]["time"] -= lateness / 2
            near.add(position)
    return out, far, near


@pytest.mark.parametrize("lateness", [timedelta(minutes=10), timedelta(0)])
def test_late_records_are_the_same_with_the_same_reasons(lateness: timedelta) -> None:
    values, far, near = shifted(gpu_values(hours=6), lateness)
    batches = list(deliveries(values, batch_size=250, replay_every=4))
    rows, columnar = run_both(rollups(lateness=lateness), batches)
    assert_same(rows, columnar)
    late = {offset for offset, _ in rows.late}
    assert late and late <= far
    assert not late & near
    assert all("allowed lateness" in reason for _, reason in columnar.late)


def test_late_inputs_are_the_records_themselves() -> None:
    values, _, _ = shifted(gpu_values(hours=3), timedelta(minutes=10))
    processors = (RollupProcessor(), RollupProcessor())
    states: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    seen = 0
    for delivery in deliveries(values, batch_size=500):
        row_result = processors[0].process(delivery.rows, states[0])
        column_result = processors[1].process(delivery.columnar, states[1])
        assert column_result.late == row_result.late
        seen += len(row_result.late)
    assert seen


@pytest.mark.parametrize(
    ("record", "columnar"),
    [
        ("aima.metrics.QueueSample", True),
        ("aima.metrics.PodStatus", True),
        ("aima.metrics.SystemSample", False),  # array metrics (disks, networks): folded record by record
    ],
)
def test_other_samples_fold_alike(record: str, columnar: bool) -> None:
    assert RollupProcessor()._plans[record].columnar is columnar
    values = simulated_values(record, hosts=2, gpus_per_host=2, duration=timedelta(hours=26), step_s=60.0)
    for batch_size in (16, 250):
        rows, run = run_both(
            rollups(), list(deliveries(values, record, batch_size=batch_size, replay_every=3))
        )
        assert_same(rows, run, built=not columnar)
        assert rows.outputs
        assert any(key.startswith("d|") for key, _ in rows.state.log)
        if not columnar:
            assert run.built_inputs > 0


def job_event(rng: random.Random, number: int) -> dict[str, Any]:
    """Only ``started`` events carry the queue wait metric: the other records are not relevant at all."""
    return {
        "time": START + timedelta(seconds=20 * number),
        "job_id": f"j{number % 7}",
        "event": rng.choice(["queued", "started", "started", "finished", "failed"]),
        "project": rng.choice(["news", "sport"]),
        "user": None,
        "service": None,
        "queue": rng.choice(["default", "gpu"]),
        "model": None,
        "host": None,
        "gpu_count": 1,
        "gpu_model": None,
        "provider": None,
        "pricing": None,
        "media_minutes": None,
        "queue_wait_seconds": rng.choice([None, 0.0, rng.uniform(0, 900)]),
        "error": None,
        "source": "test",
    }


def cost_record(rng: random.Random, number: int) -> dict[str, Any]:
    """Each ``kind`` selects other metrics; every figure is set (or not) whatever the kind, so only the
    selectors decide which are folded."""
    time = START + timedelta(seconds=20 * number)

    def figure() -> float | None:
        return rng.choice([None, 0.0, rng.uniform(0, 500)])

    return {
        "time": time,
        "period_end": time + timedelta(hours=1),
        "kind": rng.choice(["gpu_hours", "job_cost", "budget"]),
        "project": rng.choice(["news", "sport", None]),
        "gpu_model": rng.choice(["H100", None]),
        "provider": rng.choice(["aws", None]),
        "pricing": None,
        "job_id": rng.choice(["j1", "j2", None]),
        "budget": rng.choice(["b1", None]),
        "gpu_hours": figure(),
        "device_hours": figure(),
        "idle_gpu_hours": figure(),
        "cost_estimated_eur": figure(),
        "job_cost_eur": figure(),
        "job_cost_per_media_minute_eur": figure(),
        "budget_eur": figure(),
        "budget_utilization_percent": figure(),
        "forecast_eur": figure(),
        "currency": "EUR",
        "source": "test",
    }


def hand_made_deliveries(
    record: str, topic: str, make: Callable[[random.Random, int], dict[str, Any]], count: int, size: int
) -> list[Delivery]:
    """Records bus.frames does not read natively today, given with columns as the app would give them:
    the selector logic of the columnar path."""
    codec = Codec()
    rng = random.Random(3)
    values = [codec.decode(codec.encode(record, make(rng, number)))[1] for number in range(count)]
    out, watermark = [], None
    for start in range(0, count, size):
        chunk = values[start : start + size]
        offsets = list(range(start, start + len(chunk)))
        frame = pl.DataFrame(chunk, infer_schema_length=None)
        frame = frame.with_columns(pl.col(pl.Datetime).dt.cast_time_unit("ms"))
        columns = Columns(record, frame, offsets)
        assert columns.records() == chunk
        inputs = [
            Input(topic, 0, offset, record, value, value["time"])
            for offset, value in zip(offsets, chunk, strict=True)
        ]
        previous = watermark
        newest = max(columns.event_ms)
        watermark = newest if previous is None else max(previous, newest)
        common: dict[str, Any] = {
            "topic_key": topic,
            "partition": 0,
            "watermark": from_ms(watermark),
            "previous_watermark": None if previous is None else from_ms(previous),
            "committed_offset": start,
            "resumed": start == 0,
        }
        lazy = PartitionBatch(inputs=LazyInputs(topic, 0, columns), columns=columns, **common)
        out.append(Delivery(PartitionBatch(inputs=inputs, **common), lazy))
    return out


@pytest.mark.parametrize(
    ("record", "topic", "make"),
    [("aima.metrics.JobEvent", "job.events", job_event), ("aima.metrics.CostRecord", "costs", cost_record)],
)
def test_where_selectors_are_read_from_the_columns(
    record: str, topic: str, make: Callable[[random.Random, int], dict[str, Any]]
) -> None:
    plan = RollupProcessor()._plans[record]
    assert plan.columnar and plan.selector is not None
    rows, columnar = run_both(rollups(), hand_made_deliveries(record, topic, make, 6000, 200))
    assert_same(rows, columnar)
    # A metric that spans partitions goes out as a partial (its rollup inside), its progress records carry
    # none.
    rolled = [output.value.get("rollup", output.value) for output in rows.outputs]
    series = {value["series"].split("{")[0] for value in rolled if value}
    assert series == {metric.name for metric in plan.metrics}


def test_bin_keys_are_those_of_math_log() -> None:
    processor = RollupProcessor()
    rng = np.random.default_rng(5)
    powers = 2.0 ** np.arange(-30, 60)
    boundaries = 2.0 ** (np.arange(-3000, 3000) / processor._multiplier)  # where keys change
    xs = np.concatenate(
        [
            rng.uniform(1e-9, 1e12, 20_000),
            rng.uniform(0, 100, 20_000),
            powers,
            np.nextafter(powers, 0),
            np.nextafter(powers, np.inf),
            [processor.mapping.value(key) for key in range(-200, 2000)],
            boundaries,
            np.nextafter(boundaries, 0),
            np.nextafter(boundaries, np.inf),
            [1.0, 5e-324, 1.7976931348623157e308],
        ]
    )
    expected = [ceil(log(x, 2) * processor._multiplier) for x in xs.tolist()]
    assert processor._bin_keys(xs) == expected


@pytest.mark.parametrize("batch_size", [16, 250])
def test_pods_changing_phase_fold_alike(batch_size: int) -> None:
    # One state entry per pod holds a restarts series for the pod and a status series per phase: the
    # columnar path folds the phases' rows value by value, in row order, as the records do.
    rng = random.Random(11)
    phases = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
    values = [
        {
            "time": START + timedelta(seconds=30 * step),
            "namespace": "sim",
            "pod": f"pod-{pod}",
            "host": None,
            "phase": rng.choice(phases),
            "ready": rng.random() < 0.5,
            "restarts": rng.randint(0, 3) + step // 40,
            "source": "test",
        }
        for step in range(26 * 120)
        for pod in range(3)
    ]
    record = "aima.metrics.PodStatus"
    rows, run = run_both(rollups(), list(deliveries(values, record, batch_size=batch_size, replay_every=3)))
    assert_same(rows, run)
    finals = [o.value for o in rows.outputs if o.value["final"] and o.value["tier"] == "day"]
    restarts = [v for v in finals if v["metric"] == "k8s_pod_restarts" and v["labels"]["pod"] == "pod-0"]
    assert restarts and restarts[0]["count"] == 24 * 120
