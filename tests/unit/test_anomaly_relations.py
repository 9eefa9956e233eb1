"""The anomaly detector's default method, relations (streams/anomaly/relations.py): quiet on a simulated
fleet's normal life (job starts and stops, idle and busy), where the per-series z-score alerts about twice
per job; an alert for each injected fault on its GPU while it lasts; replays and re-sends as the z-score
detector does them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus.codec import Codec
from producers.faults import FaultPlan, Truth
from producers.simulator import Fleet, generate
from streams.anomaly.processor import AnomalyConfig, AnomalyProcessor
from streams.runtime.findings import fingerprint
from streams.runtime.processor import Input, Output, PartitionBatch
from tests.unit.columnar import deliveries, run_both, simulated_values

T0 = datetime(2026, 2, 2, 6, 0, tzinfo=UTC)
GPU = "aima.metrics.GpuSample"
GRACE = timedelta(minutes=5)


def gpu_batches(
    records: Iterable[tuple[str, str, str, dict[str, Any]]], size: int = 400
) -> Iterator[PartitionBatch]:
    """The fleet's GPU samples as one partition's batches, offsets from 0, each with its watermark."""
    inputs: list[Input] = []
    offset = 0
    watermark: datetime | None = None
    for topic, _, _, value in records:
        if topic != "gpu.samples":
            continue
        inputs.append(Input("gpu.samples", 0, offset, GPU, value, value["time"]))
        offset += 1
        if len(inputs) == size:
            yield PartitionBatch("gpu.samples", 0, inputs, inputs[-1].event_time, watermark)
            watermark, inputs = inputs[-1].event_time, []
    if inputs:
        yield PartitionBatch("gpu.samples", 0, inputs, inputs[-1].event_time, watermark)


def run(
    processor: AnomalyProcessor, batches: Iterable[PartitionBatch]
) -> tuple[list[Output], dict[str, Any]]:
    state: dict[str, Any] = {}
    outputs: list[Output] = []
    for batch in batches:
        outputs.extend(processor.process(batch, state).outputs)
    return outputs, state


def fleet_run(plan: FaultPlan | None, hours: float, seed: int = 3) -> tuple[Fleet, list[Any]]:
    fleet = Fleet(seed=seed, hosts=2, gpus_per_host=4, start=T0, faults=plan)
    return fleet, list(generate(fleet, T0, T0 + timedelta(hours=hours), 10.0))


def firing(outputs: list[Output]) -> list[dict[str, Any]]:
    return [o.value for o in outputs if o.topic_key == "alerts" and o.value["status"] == "firing"]


def matches(alert: dict[str, Any], truth: Truth) -> bool:
    on_gpu = alert["labels"].get("gpu_uuid") == truth.entity
    return on_gpu and truth.start <= alert["starts_at"] <= truth.end + GRACE


def test_quiet_on_normal_life_where_the_zscore_alerts_on_every_job() -> None:
    fleet, records = fleet_run(None, hours=8)
    jobs = sum(1 for topic, _, _, v in records if topic == "job.events" and v["event"] == "started")
    relations, _ = run(AnomalyProcessor(), gpu_batches(records))
    zscore, _ = run(AnomalyProcessor(AnomalyConfig(method="ewma_mad_zscore")), gpu_batches(records))
    # The only fault of a fleet without a plan: the first host's hourly cooling fault, in the truth.
    assert {t.kind for t in fleet.truth} == {"cooling_fault"} and len(fleet.truth) == 8
    false = [a for a in firing(relations) if not any(matches(a, t) for t in fleet.truth)]
    assert false == []
    found = [t for t in fleet.truth if any(matches(a, t) for a in firing(relations))]
    assert len(found) >= 6, "the cooling fault should alert nearly every hour once the model has learnt"
    # The same records through the per-series z-score: an alert or more per job started.
    assert len([a for a in firing(zscore) if not any(matches(a, t) for t in fleet.truth)]) > jobs


@pytest.mark.parametrize("kind", ["fan_failure", "throttling", "memory_leak"])
def test_each_injected_fault_alerts_on_its_gpu_while_it_lasts(kind: str) -> None:
    fleet, records = fleet_run(FaultPlan(every_s=2400.0, seed=4, kinds=(kind,)), hours=12)
    outputs, state = run(AnomalyProcessor(), gpu_batches(records))
    alerts = firing(outputs)
    injected = [t for t in fleet.truth if t.kind == kind and t.end <= T0 + timedelta(hours=12)]
    assert len(injected) >= 12
    if kind == "memory_leak":  # a leak shows only while a job holds the GPU
        injected = [t for t in injected if held(records, t) >= timedelta(minutes=6)]
        assert len(injected) >= 6
    found = [t for t in injected if any(matches(a, t) for a in alerts)]
    assert len(found) >= 0.8 * len(injected), (len(found), len(injected))
    assert [a for a in alerts if not any(matches(a, t) for t in fleet.truth)] == []
    metric = {"fan_failure": "gpu_temperature_celsius", "throttling": "gpu_sm_clock_hz"}.get(
        kind, "gpu_memory_used_bytes"
    )
    assert {a["labels"]["metric"] for a in alerts if any(matches(a, t) for t in injected)} == {metric}
    json.dumps(state)  # a changelog holds it


def held(records: list[Any], truth: Truth) -> timedelta:
    """The longest stretch one job held the fault's GPU while the fault lasted."""
    longest, holder, since = timedelta(0), None, truth.start
    for topic, _, _, v in records:
        if topic != "gpu.samples" or v["gpu_uuid"] != truth.entity or v.get("processes") is None:
            continue
        if not truth.start <= v["time"] < truth.end:
            continue
        pid = v["processes"][0]["pid"] if v["processes"] else None
        if pid != holder:
            holder, since = pid, v["time"]
        if pid is not None:
            longest = max(longest, v["time"] - since)
    return longest


def test_records_keep_their_contracts() -> None:
    _, records = fleet_run(FaultPlan(every_s=2400.0, seed=4, kinds=("fan_failure",)), hours=4)
    outputs, _ = run(AnomalyProcessor(), gpu_batches(records))
    codec = Codec()
    for output in outputs:
        codec.encode(output.record_name, output.value)  # the Anomaly and AlertEvent schemas take them
    anomaly = next(o for o in outputs if o.topic_key == "anomalies")
    assert anomaly.record_name == "aima.metrics.Anomaly"
    assert anomaly.value["method"] == "temperature_vs_power"
    assert anomaly.key == anomaly.value["series"] and anomaly.key.startswith("gpu_temperature_celsius{")
    alert = firing(outputs)[0]
    labels = {k: v for k, v in alert["labels"].items() if k != "metric"}
    assert alert["rule"] == "anomaly"
    assert alert["fingerprint"] == fingerprint("anomaly", {**labels, "metric": "gpu_temperature_celsius"})
    assert alert["value"] >= alert_expected(alert) + 10  # 10 scales of at least 1 °C
    assert "temperature_vs_power" in alert["annotations"]["description"]
    statuses = [o.value["status"] for o in outputs if o.key == alert["fingerprint"]]
    assert statuses[:2] == ["firing", "resolved"]


def alert_expected(alert: dict[str, Any]) -> float:
    """The expectation an alert's summary quotes (``expected about X °C``)."""
    return float(alert["annotations"]["summary"].rsplit("about ", 1)[1].split(" ")[0])


def test_replays_emit_nothing_new_and_a_resumed_partition_sends_again() -> None:
    _, records = fleet_run(FaultPlan(every_s=2400.0, seed=4, kinds=("throttling",)), hours=3)
    batches = list(gpu_batches(records))
    processor = AnomalyProcessor()
    state: dict[str, Any] = {}
    seen: list[tuple[int, PartitionBatch, list[Output]]] = []
    for number, batch in enumerate(batches):
        outputs = processor.process(batch, state).outputs
        state = json.loads(json.dumps(state))  # as a changelog restores it
        seen.append((number, batch, outputs))
    number, batch, outputs = next(item for item in seen if any(o.topic_key == "alerts" for o in item[2]))
    # The same batch again, its offsets already folded: nothing new, the state unchanged.
    before = json.dumps(state, sort_keys=True)
    assert processor.process(batch, state).outputs == []
    assert json.dumps(state, sort_keys=True) == before
    # Resumed with only the records before that batch committed: what it published goes out again.
    last = seen[-1][1]
    committed = batch.inputs[0].offset
    again = processor.process(replace(last, resumed=True, committed_offset=committed), state).outputs
    sent = [o for o in again if o.topic_key == "alerts"]
    assert sent and all(o in [x for _, _, out in seen[number:] for x in out] for o in again)
    assert (
        processor.process(replace(last, resumed=True, committed_offset=last.last_offset + 1), state).outputs
        == []
    )


def test_a_job_start_between_samples_is_no_alert_but_a_hot_gpu_is() -> None:
    """Hand-made GPU: idle and busy by turns (power 70 / 600 W, temperature following with the lag), then
    the same load 20 °C hotter."""
    processor = AnomalyProcessor(AnomalyConfig(warmup=10))
    inputs: list[Input] = []
    temperature, at = 35.0, T0

    def sample(group: str, **fields: Any) -> None:
        value = {
            "time": at, "host": "h", "gpu": 0, "gpu_uuid": "GPU-h0", "gpu_model": "NVIDIA H100 80GB HBM3",
            "mig_instance": None, "source": "test", "interval_group": group, **fields,
        }  # fmt: skip
        inputs.append(Input("gpu.samples", 0, len(inputs), GPU, value, at))

    for step in range(600):
        busy = (step // 40) % 2 == 1
        power = 600.0 if busy else 70.0
        hot = 20.0 if step >= 520 and busy else 0.0  # the last busy stretch: steps 520-559
        temperature += (32.0 + 50.0 * power / 700.0 + hot - temperature) * (1 - math.exp(-30.0 / 90.0))
        at += timedelta(seconds=30)
        processes = (
            [{"pid": 7 + step // 80, "name": "python3", "used_memory_bytes": 40 * 2**30}] if busy else []
        )
        used = (41 if busy else 1) * 2**30
        sample("fast", utilization_percent=90.0 if busy else 0.0, memory_used_bytes=used,
               memory_total_bytes=80 * 2**30, processes=processes)  # fmt: skip
        sample("slow", temperature_celsius=round(temperature, 1), power_watts=power,
               sm_clock_hz=1_980_000_000 if busy else 345_000_000, throttle_reasons=[])  # fmt: skip
    outputs, _ = run(processor, [PartitionBatch("gpu.samples", 0, inputs, at, None)])
    alerts = firing(outputs)
    assert len(alerts) == 1, alerts
    assert alerts[0]["labels"]["metric"] == "gpu_temperature_celsius"
    assert alerts[0]["starts_at"] >= T0 + timedelta(seconds=30 * 520)


def test_columns_fold_the_same_as_records_without_building_them() -> None:
    """Batches read natively (PartitionBatch.columns): the same outputs and state writes as per record."""
    values = simulated_values(GPU, hosts=1, gpus_per_host=2, duration=timedelta(hours=6))
    rows, columns = run_both(AnomalyProcessor, list(deliveries(values, batch_size=250, replay_every=3)))
    assert columns.outputs == rows.outputs and columns.state.log == rows.state.log
    assert columns.state == rows.state and rows.state
    assert columns.built_inputs == 0
    assert any(o.topic_key == "alerts" for o in rows.outputs)  # the hourly cooling fault
