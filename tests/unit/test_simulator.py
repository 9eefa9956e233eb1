"""The fleet simulator (producers/simulator.py): determinism, contract, coverage of every sample topic."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import pytest

from bus import sketch
from bus.codec import Codec
from bus.settings import Settings
from bus.topics import BY_KEY
from bus.validation import check
from producers.simulator import GPU_SPECS, Fleet, _when, backfill, generate, main, run

T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)
SAMPLE_TOPICS = {"gpu.samples", "system.samples", "job.events", "job.timings", "queue.samples", "k8s.pods"}


def two_hours(seed: int, step_s: float = 15.0) -> list[tuple[str, str, str, dict[str, Any]]]:
    return list(generate(Fleet(seed=seed, hosts=3, gpus_per_host=4), T0, T0 + timedelta(hours=2), step_s))


def test_same_seed_same_records() -> None:
    assert two_hours(7) == two_hours(7)
    assert two_hours(7) != two_hours(8)


def test_step_is_repeatable_with_an_explicit_start() -> None:
    def steps() -> list[Any]:
        fleet = Fleet(seed=3, start=T0)
        return [fleet.step(T0 + timedelta(seconds=s), 1.0) for s in (1, 2, 3)]

    assert steps() == steps()


def test_every_record_is_valid_encodes_and_names_its_topic_schema() -> None:
    codec = Codec()
    for topic_key, key, record_name, value in two_hours(1):
        check(record_name, value)
        name, decoded = codec.decode(codec.encode(record_name, value))
        assert name == BY_KEY[topic_key].schema
        assert key
        assert decoded.get("source", "simulator") == "simulator"
        assert value["source"] == "simulator"


def test_the_first_step_fills_all_six_sample_topics() -> None:
    records = Fleet(seed=1).step(T0, 1.0)
    assert {topic for topic, *_ in records} == SAMPLE_TOPICS
    assert set(BY_KEY) >= SAMPLE_TOPICS


def test_keys_follow_the_topic_catalogue() -> None:
    for topic_key, key, _, value in two_hours(2)[:2000]:
        expected = {
            "gpu.samples": lambda v: f"{v['host']}/{v['gpu_uuid']}",
            "system.samples": lambda v: v["host"],
            "job.events": lambda v: v["job_id"],
            "job.timings": lambda v: v["job_id"],
            "queue.samples": lambda v: v["queue"],
            "k8s.pods": lambda v: f"{v['namespace']}/{v['pod']}",
        }[topic_key](value)
        assert key == expected


def test_job_lifecycles_are_complete_and_ordered() -> None:
    records = two_hours(4)
    events: dict[str, list[dict[str, Any]]] = {}
    for topic, _, _, value in records:
        if topic == "job.events":
            events.setdefault(value["job_id"], []).append(value)
    assert len(events) > 10
    ended = 0
    for job_events in events.values():
        kinds = [e["event"] for e in job_events]
        assert kinds in (["queued"], ["queued", "started"], ["queued", "started", "finished"],
                         ["queued", "started", "failed"])  # fmt: skip
        times = [e["time"] for e in job_events]
        assert times == sorted(times)
        assert job_events[0]["host"] is None
        if len(job_events) > 1:
            started = job_events[1]
            assert started["queue_wait_seconds"] == (started["time"] - job_events[0]["time"]).total_seconds()
            assert started["gpu_model"] in GPU_SPECS and started["provider"] and started["pricing"]
        if len(job_events) == 3:
            ended += 1
            assert job_events[2]["media_minutes"] > 0
            assert (job_events[2]["error"] is not None) == (job_events[2]["event"] == "failed")
        assert job_events[0]["user"].startswith("u_") and len(job_events[0]["user"]) == 18
    assert ended > 5


def test_gpu_utilisation_follows_allocation_and_power_follows_utilisation() -> None:
    fast: list[dict[str, Any]] = []
    slow: list[dict[str, Any]] = []
    for topic, _, _, value in two_hours(5, step_s=30):
        if topic == "gpu.samples":
            (fast if value["interval_group"] == "fast" else slow).append(value)
    busy = [v for v in fast if v["processes"]]
    idle = [v for v in fast if not v["processes"]]
    assert busy and idle
    assert min(v["utilization_percent"] for v in busy) > 50
    assert max(v["utilization_percent"] for v in idle) < 5
    # Hopper reports tensor-core activity; Ampere and Ada leave it absent, never 0.
    for value in fast:
        supported = value["gpu_model"].startswith("NVIDIA H100")
        assert (value["tensor_core_utilization_percent"] is not None) == supported
    by_time = {(v["gpu_uuid"], v["time"]): v for v in fast}
    pairs = [(by_time[(v["gpu_uuid"], v["time"])], v) for v in slow]
    hot = [s for f, s in pairs if f["processes"]]
    cold = [s for f, s in pairs if not f["processes"]]
    for model, spec in GPU_SPECS.items():
        hot_w = [s["power_watts"] for s in hot if s["gpu_model"] == model]
        cold_w = [s["power_watts"] for s in cold if s["gpu_model"] == model]
        if hot_w and cold_w:
            assert sum(hot_w) / len(hot_w) > 2 * sum(cold_w) / len(cold_w)
            assert max(hot_w) <= spec.max_watts * 1.02
    # Temperature climbs with power: busy GPUs run hotter on average.
    assert sum(s["temperature_celsius"] for s in hot) / len(hot) > sum(
        s["temperature_celsius"] for s in cold
    ) / len(cold)


def test_timings_carry_consistent_sketches() -> None:
    timings = [v for topic, _, _, v in two_hours(6) if topic == "job.timings"]
    assert {v["kind"] for v in timings} == {
        "frame", "batch", "inference", "model_load", "data_transfer", "cuda_kernel",
    }  # fmt: skip
    for value in timings[:500]:
        restored = sketch.from_avro(value["sketch"])
        assert restored.count == pytest.approx(value["count"])
        assert value["min_seconds"] <= value["sum_seconds"] / value["count"] <= value["max_seconds"]
        assert value["interval_start"] < value["time"]
        assert (value["bytes"] is not None) == (value["kind"] == "data_transfer")


def test_cadences_and_bad_times() -> None:
    fleet = Fleet(seed=1)
    first = Counter(r[0] for r in fleet.step(T0, 1.0))
    second = Counter(r[0] for r in fleet.step(T0 + timedelta(seconds=1), 1.0))
    # Slow GPU metrics and pod states every 30 s, fast ones every step.
    assert first["gpu.samples"] == 2 * second["gpu.samples"] == 16
    assert second["k8s.pods"] == 0
    with pytest.raises(ValueError, match="forward"):
        fleet.step(T0, 1.0)
    with pytest.raises(ValueError, match="timezone"):
        fleet.step(datetime(2025, 3, 14, 9, 0), 1.0)


class RecordingPublisher:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, str, dict[str, Any]]] = []
        self.flushes = 0

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        self.records.append((topic_key, key, record_name, value))
        return True

    def flush(self, timeout_s: float = 30.0) -> int:
        self.flushes += 1
        return 0


def test_run_once_publishes_and_returns_one_step() -> None:
    publisher = RecordingPublisher()
    pairs = run(Settings(), once=True, publisher=publisher, seed=2)  # type: ignore[arg-type]
    assert pairs == [(name, value) for _, _, name, value in publisher.records]
    assert publisher.flushes == 1
    assert {topic for topic, *_ in publisher.records} == SAMPLE_TOPICS


def test_run_steps_until_the_service_stops() -> None:
    publisher = RecordingPublisher()
    service = SimpleNamespace(stopping=threading.Event(), time_left_s=lambda: 5.0)
    threading.Timer(0.3, service.stopping.set).start()
    assert run(Settings(), service=service, publisher=publisher, rate_hz=20, speedup=30) == []  # type: ignore[arg-type]
    assert publisher.flushes == 1
    times = sorted({value["time"] for topic, _, _, value in publisher.records if topic == "queue.samples"})
    assert len(times) >= 3
    # Each step advances event time by speedup / rate_hz = 1.5 s.
    assert {(b - a).total_seconds() for a, b in pairwise(times)} == {1.5}


class _Recorder:
    """A publisher stand-in that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, str, dict[str, Any]]] = []
        self.flushes = 0

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        self.records.append((topic_key, key, record_name, value))
        return True

    def flush(self, timeout_s: float = 30.0) -> int:
        self.flushes += 1
        return 0


def test_backfill_publishes_the_history_in_time_order_and_filters_topics() -> None:
    recorder = _Recorder()
    start, end = T0, T0 + timedelta(days=2)
    report = backfill(
        Settings(), start, end, step_s=600, hosts=1, gpus_per_host=2, seed=4, arrivals_per_hour=0.5,
        topics=("gpu.samples", "job.events"), publisher=recorder, flush_every=500,  # type: ignore[arg-type]
    )  # fmt: skip
    assert (report.records, report.rejected, report.pending) == (len(recorder.records), 0, 0)
    assert {topic for topic, *_ in recorder.records} == {"gpu.samples", "job.events"}
    samples = [value["time"] for topic, _, _, value in recorder.records if topic == "gpu.samples"]
    assert samples == sorted(samples) and samples[0] == start + timedelta(minutes=10) and samples[-1] == end
    assert any(
        value["event"] == "finished" for topic, _, _, value in recorder.records if topic == "job.events"
    )
    assert recorder.flushes > 1  # the buffer is flushed as it goes, not only at the end
    same = Fleet(seed=4, hosts=1, gpus_per_host=2, start=start, arrivals_per_hour=0.5)
    expected = [r for r in generate(same, start, end, 600) if r[0] in ("gpu.samples", "job.events")]
    assert recorder.records == expected  # what an offline computation regenerates from the seed


def test_backfill_command_line_spans_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime(2025, 5, 1, tzinfo=UTC)
    assert _when("40d", now) == now - timedelta(days=40)
    assert _when("90m", now) == now - timedelta(minutes=90)
    assert _when("2025-04-01T00:00:00+00:00", now) == datetime(2025, 4, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a span"):
        _when("yesterday", now)
    with pytest.raises(SystemExit):
        main(["--since", "yesterday"])
    assert "neither a span" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not before its end"):
        backfill(Settings(), now, now - timedelta(days=1), publisher=_Recorder())  # type: ignore[arg-type]
