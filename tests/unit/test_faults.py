"""Injected faults of the simulator (producers/faults.py): off by default, seeded, and visible in the records
exactly while the truth says they are active."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bus.settings import Settings
from producers import faults
from producers.faults import FaultPlan
from producers.settings import CollectorSettings
from producers.simulator import Fleet, backfill, generate, main, write_truth
from producers.simulator import run as sim_run

T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)


def run(
    plan: FaultPlan | None, hours: float = 6.0
) -> tuple[Fleet, list[tuple[str, str, str, dict[str, Any]]]]:
    fleet = Fleet(seed=5, hosts=2, gpus_per_host=4, faults=plan)
    return fleet, list(generate(fleet, T0, T0 + timedelta(hours=hours), 15.0))


def test_faults_are_off_by_default_and_do_not_shift_the_fleets_draws() -> None:
    plain, records = run(None)
    # Without a plan the truth holds only the first host's hourly cooling fault, which every fleet has.
    assert [(t.kind, t.host) for t in plain.truth] == [("cooling_fault", "sim-gpu-00")] * 6
    assert all(t.end - t.start == timedelta(minutes=6) for t in plain.truth)
    faulty, with_faults = run(FaultPlan(every_s=3600.0, seed=2))

    # Only GPU samples of faulty GPUs and the timings of slowed jobs change; every other record is the same.
    def kept(r: Any) -> bool:
        return r[0] not in ("gpu.samples", "job.timings", "job.events")

    assert [r for r in records if kept(r)] == [r for r in with_faults if kept(r)]

    # Job events: the same, but for the media minutes a slowed job got through.
    def events(rs: list[Any]) -> list[Any]:
        return [{k: v for k, v in r[3].items() if k != "media_minutes"} for r in rs if r[0] == "job.events"]

    assert events(records) == events(with_faults)
    slowed = {t.entity for t in faulty.truth if t.kind in ("throttling", "job_slowdown")}
    assert slowed, "the plan should slow some job down"
    timings = {_timing_key(r[3]): r[3] for r in records if r[0] == "job.timings"}
    changed = [v for t, _, _, v in with_faults if t == "job.timings" and timings[_timing_key(v)] != v]
    assert changed and all(v["count"] <= timings[_timing_key(v)]["count"] for v in changed)
    assert records != with_faults


def _timing_key(v: dict[str, Any]) -> tuple[Any, ...]:
    return (v["job_id"], v["time"], v["kind"], v["kernel"], v["direction"])


def test_same_seed_same_truth() -> None:
    a, _ = run(FaultPlan(seed=3), hours=4)
    b, _ = run(FaultPlan(seed=3), hours=4)
    c, _ = run(FaultPlan(seed=4), hours=4)
    assert a.truth == b.truth and a.truth and a.truth != c.truth


def samples(records: list[Any], uuid: str, group: str) -> list[dict[str, Any]]:
    return [
        v
        for t, _, _, v in records
        if t == "gpu.samples" and v["gpu_uuid"] == uuid and v["interval_group"] == group
    ]


@pytest.mark.parametrize("kind", faults.FAULT_KINDS)
def test_each_kind_shows_in_the_records_while_active(kind: str) -> None:
    fleet, records = run(FaultPlan(every_s=3600.0, seed=1, kinds=(kind,)))
    planned = [t for t in fleet.truth if t.kind != "cooling_fault"]  # the fleet's own hourly one aside
    assert len(planned) >= 4
    truth = planned[0]
    assert truth.kind == kind and truth.end - truth.start == timedelta(seconds=900)
    slow = samples(records, truth.entity, "slow")
    during = [v for v in slow if truth.start + timedelta(minutes=10) <= v["time"] < truth.end]
    before = [v for v in slow if truth.start - timedelta(minutes=30) <= v["time"] < truth.start]
    assert during and before
    if kind == "throttling":
        assert all("hw_slowdown" in v["throttle_reasons"] for v in during)
        assert not any("hw_slowdown" in v["throttle_reasons"] for v in before)
        _assert_slowed(planned, records)  # a throttled GPU's job processes fewer frames
    elif kind == "fan_failure":
        assert min(v["temperature_celsius"] for v in during) > max(v["temperature_celsius"] for v in before)
    elif kind == "job_slowdown":
        assert {t.cause for t in planned} == set(faults.SLOWDOWN_CAUSES)
        _assert_slowed(planned, records)
        for t in planned:
            slow_t = [
                v
                for v in samples(records, t.entity, "slow")
                if t.start + timedelta(minutes=1) <= v["time"] < t.end
            ]
            fast_t = [
                v
                for v in samples(records, t.entity, "fast")
                if t.start <= v["time"] < t.end and v["processes"]
            ]
            if t.cause == "throttling":
                assert slow_t and all("hw_slowdown" in v["throttle_reasons"] for v in slow_t)
            elif fast_t:
                assert all(v["memory_utilization_percent"] >= 97 for v in fast_t)
    elif kind in ("idle_allocated", "underused_job"):
        fast = [v for v in samples(records, truth.entity, "fast") if truth.start <= v["time"] < truth.end]
        busy = [v for v in fast if v["processes"]]
        assert len(busy) >= 10, "a job should hold the GPU for part of the fault"
        if kind == "idle_allocated":
            assert all(v["utilization_percent"] < 5 for v in busy)
        else:
            assert all(v["memory_utilization_percent"] < 30 for v in busy)
    else:
        fast = [v for v in samples(records, truth.entity, "fast") if truth.start <= v["time"] < truth.end]
        by_pid: dict[int, list[int]] = {}
        for v in fast:
            if v["processes"]:
                by_pid.setdefault(v["processes"][0]["pid"], []).append(v["memory_used_bytes"])
        used = max(by_pid.values(), key=len)
        assert len(used) >= 20, "the leaking GPU should hold one job for 5 minutes of the fault"
        # Samples jitter by a few %; the leak (20 MiB/s) outgrows that within minutes.
        assert sum(used[-5:]) / 5 > sum(used[:5]) / 5 + 2 * 1024**3


def _frames_per_s(records: list[Any], job_id: str, start: datetime, end: datetime) -> float | None:
    """The job's frames per second over its frame timings in [start, end)."""
    frames = seconds = 0.0
    for topic, _, _, v in records:
        if topic != "job.timings" or v["job_id"] != job_id or v["kind"] != "frame":
            continue
        if start <= v["interval_start"] and v["time"] <= end:
            frames += v["count"]
            seconds += (v["time"] - v["interval_start"]).total_seconds()
    return frames / seconds if seconds >= 60 else None


def _assert_slowed(truth: list[faults.Truth], records: list[Any]) -> None:
    """Each fault that began on a busy GPU slowed that job: fewer frames/s during than before it."""
    compared = 0
    for t in truth:
        if t.job_id is None:
            continue
        before = _frames_per_s(records, t.job_id, t.start - timedelta(minutes=10), t.start)
        during = _frames_per_s(records, t.job_id, t.start + timedelta(seconds=15), t.end)
        if before and during:
            share = faults.THROTTLE_CLOCK_SHARE if t.kind == "throttling" else faults.SLOWDOWN_SHARE
            assert during == pytest.approx(before * share, rel=0.05), t
            compared += 1
    assert compared >= 1, "some fault should start on a busy GPU whose job ran on"


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="kinds"):
        FaultPlan(kinds=("meteor",))
    with pytest.raises(ValueError, match="every_s"):
        FaultPlan(every_s=0)


class _Recorder:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        self.records.append((topic_key, key, record_name, value))
        return True

    def flush(self, timeout_s: float = 30.0) -> int:
        return 0


def test_a_backfill_with_faults_reports_and_writes_its_truth(tmp_path: Path) -> None:
    plan = FaultPlan(every_s=1800.0, seed=6, kinds=("throttling", "job_slowdown"))
    report = backfill(
        Settings(), T0, T0 + timedelta(hours=3), step_s=60, hosts=1, gpus_per_host=2, seed=5,
        publisher=_Recorder(), faults=plan,  # type: ignore[arg-type]
    )  # fmt: skip
    kinds = Counter(t.kind for t in report.truth)
    assert kinds["cooling_fault"] == 3 and kinds["throttling"] + kinds["job_slowdown"] >= 4
    assert list(report.truth) == sorted(report.truth, key=lambda t: t.start)
    path = tmp_path / "truth.jsonl"
    write_truth(str(path), report.truth)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["kind"], x["entity"], datetime.fromisoformat(x["start"])) for x in lines] == [
        (t.kind, t.entity, t.start) for t in report.truth
    ]
    assert {x["cause"] for x in lines if x["kind"] == "job_slowdown"} <= set(faults.SLOWDOWN_CAUSES)


def test_fault_options_of_the_command_line_and_the_live_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--since", "1h", "--fault-kinds", "throttling"])
    assert "--fault-kinds needs --faults-every-s" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--since", "1h", "--faults-every-s", "600", "--fault-kinds", "meteor"])
    assert "kinds must be a non-empty subset" in capsys.readouterr().err
    assert CollectorSettings.from_environ({"AIMA_SIM_FAULTS_EVERY_S": "600"}).sim_faults_every_s == 600.0
    assert CollectorSettings.from_environ({}).sim_faults_every_s is None
    # The live simulator (aima-metrics collect jobs-sim) logs each fault as it starts.
    service = SimpleNamespace(stopping=threading.Event(), time_left_s=lambda: 5.0)
    threading.Timer(0.5, service.stopping.set).start()
    plan = FaultPlan(every_s=20.0, duration_s=10.0, kinds=("fan_failure",))
    sim_run(Settings(), service=service, publisher=_Recorder(), rate_hz=20, speedup=40, faults=plan)  # type: ignore[arg-type]
    # main() configured logging (bus/logs.py): one JSON object a line on stderr.
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    injected = [entry["fault"] for entry in logged if entry["msg"] == "simulator fault injected"]
    assert injected and [(f["kind"], f["entity"]) for f in injected] == [
        (t.kind, t.entity) for t in plan.truth
    ]
