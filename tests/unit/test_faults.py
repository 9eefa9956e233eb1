"""Injected faults of the simulator (producers/faults.py): off by default, seeded, and visible in the records
exactly while the truth says they are active."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producers import faults
from producers.faults import FaultPlan
from producers.simulator import Fleet, generate

T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)


def run(
    plan: FaultPlan | None, hours: float = 6.0
) -> tuple[Fleet, list[tuple[str, str, str, dict[str, Any]]]]:
    fleet = Fleet(seed=5, hosts=2, gpus_per_host=4, faults=plan)
    return fleet, list(generate(fleet, T0, T0 + timedelta(hours=hours), 15.0))


def test_faults_are_off_by_default_and_do_not_shift_the_fleets_draws() -> None:
    plain, records = run(None)
    assert plain.truth == []
    _, with_faults = run(FaultPlan(every_s=3600.0, seed=2))
    # Only GPU samples of faulty GPUs change; every other record is the same.
    others = [r for r in records if r[0] != "gpu.samples"]
    assert others == [r for r in with_faults if r[0] != "gpu.samples"]
    assert records != with_faults


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
    assert len(fleet.truth) >= 4
    truth = fleet.truth[0]
    assert truth.kind == kind and truth.end - truth.start == timedelta(seconds=900)
    slow = samples(records, truth.entity, "slow")
    during = [v for v in slow if truth.start + timedelta(minutes=10) <= v["time"] < truth.end]
    before = [v for v in slow if truth.start - timedelta(minutes=30) <= v["time"] < truth.start]
    assert during and before
    if kind == "throttling":
        assert all("hw_slowdown" in v["throttle_reasons"] for v in during)
        assert not any("hw_slowdown" in v["throttle_reasons"] for v in before)
    elif kind == "fan_failure":
        assert min(v["temperature_celsius"] for v in during) > max(v["temperature_celsius"] for v in before)
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


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="kinds"):
        FaultPlan(kinds=("meteor",))
    with pytest.raises(ValueError, match="every_s"):
        FaultPlan(every_s=0)
