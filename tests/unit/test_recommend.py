"""The arithmetic of the recommendations on plain rows."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api import recommend
from api import recommend_slowdown as slowdown
from api.config import ApiSettings
from bus.prices import PriceCatalogue


def test_idle_costs_keep_groups_over_the_share_priced_per_day_largest_first() -> None:
    rows = [
        {"project": "a", "gpu_hours": 10.0, "idle_gpu_hours": 6.0, "cost_eur": 20.0},
        {"project": "b", "gpu_hours": 10.0, "idle_gpu_hours": 9.0, "cost_eur": 40.0},
        {"project": "c", "gpu_hours": 10.0, "idle_gpu_hours": 1.0, "cost_eur": 40.0},
        {"project": "d", "gpu_hours": 0.0, "idle_gpu_hours": 0.0, "cost_eur": 0.0},
    ]
    out = recommend.idle_costs(rows, days=2.0, min_idle_share=0.5)
    assert [r["project"] for r in out] == ["b", "a"]
    assert out[0]["idle_cost_eur_per_day"] == pytest.approx(9.0 * 4.0 / 2)
    assert out[1]["idle_share"] == pytest.approx(0.6)


def test_budget_projections_put_overruns_first() -> None:
    rows = [
        {"project": "a", "budget_eur": 100.0, "forecast_eur": 90.0},
        {"project": "b", "budget_eur": 100.0, "forecast_eur": 130.0},
        {"project": "c", "budget_eur": None, "forecast_eur": 10.0},
    ]
    out = recommend.budget_projections(rows)
    assert [(r["project"], r["over_budget"], r["overrun_eur"]) for r in out] == [
        ("b", True, 30.0),
        ("a", False, 0.0),
        ("c", False, 0.0),
    ]


TH = recommend.Thresholds(
    idle_below_percent=10.0,
    idle_min_hours=2,
    allocated_memory_percent=5.0,
    memory_safe_percent=90.0,
    batch_min_factor=1.5,
    slowdown_min_drop_percent=30.0,
)
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _gpu(uuid: str, hours: list[int], util: list[float | None], memory: list[float | None]) -> dict[str, Any]:
    return {
        "host": "h1", "gpu": "0", "gpu_uuid": uuid, "gpu_model": "L4",
        "hours": [T0 + timedelta(hours=h) for h in hours], "utilization_percent": util,
        "memory_percent": memory,
    }  # fmt: skip


def test_idle_gpus_are_listed_per_state_after_enough_consecutive_hours() -> None:
    gpus = [
        # allocated idle 2 h running (hours 0-1), then busy, then unallocated for one hour only
        _gpu("a", [0, 1, 2, 3], [2.0, 3.0, 80.0, 0.5], [40.0, 40.0, 60.0, 1.0]),
        # idle in hours 0 and 2 with hour 1 missing (no samples): no run of two
        _gpu("b", [0, 2], [1.0, 1.0], [1.0, 1.0]),
        # unallocated 3 h, no price known for its host
        _gpu("c", [0, 1, 2], [0.3, 0.3, 0.3], [None, 1.0, 1.0]),
    ]
    gpus[2]["host"] = "h2"
    prices = {"h1": {"provider": "gcp", "pricing": "spot", "eur_per_gpu_hour": 0.5, "currency": "EUR"}}
    out = recommend.idle_by_gpu(gpus, prices, TH, days=0.5)
    assert [(r["gpu_uuid"], r["state"], r["idle_hours"], r["longest_idle_hours"]) for r in out] == [
        ("a", "allocated", 2, 2),
        ("c", "unallocated", 3, 3),
    ]
    assert out[0]["idle_cost_eur_per_day"] == pytest.approx(2 * 0.5 / 0.5)
    assert out[0]["longest_idle_end"] == (T0 + timedelta(hours=2)).isoformat()
    assert out[1]["idle_cost_eur_per_day"] is None and out[1]["provider"] is None
    assert recommend.idle_by_gpu(gpus, prices, replace(TH, idle_min_hours=3), days=1.0)[0]["gpu_uuid"] == "c"


def test_memory_headroom_is_the_safe_share_over_the_peak() -> None:
    jobs = [
        {"job_id": "j1", "peak_memory_percent": 20.0},
        {"job_id": "j2", "peak_memory_percent": 80.0},  # 1.125x: below the least factor
        {"job_id": "j3", "peak_memory_percent": 45.0},
        {"job_id": "j4", "peak_memory_percent": None},
    ]
    out = recommend.memory_headroom(jobs, TH)
    assert [(j["job_id"], j["batch_factor"]) for j in out] == [("j1", 4.5), ("j3", 2.0)]


def test_thresholds_take_the_settings_and_the_overrides_given() -> None:
    config = ApiSettings.from_environ({"AIMA_API_RECOMMEND_IDLE_BELOW_PERCENT": "7"})
    th = recommend.Thresholds.of(config, idle_min_hours=5, batch_min_factor=None)
    assert (th.idle_below_percent, th.idle_min_hours, th.batch_min_factor) == (7.0, 5, 1.5)


def test_a_projects_month_without_budget_shows_only_when_it_has_no_budget() -> None:
    rows = [
        {"project": "a", "budget": None, "budget_eur": None, "forecast_eur": 90.0},
        {"project": "a", "budget": "monthly", "budget_eur": 100.0, "forecast_eur": 90.0},
        {"project": "b", "budget": None, "budget_eur": None, "forecast_eur": 30.0},
    ]
    out = recommend.budget_projections(rows)
    assert [(r["project"], r["budget"]) for r in out] == [("a", "monthly"), ("b", None)]


def test_cheapest_ranks_every_catalogue_offer_of_a_measured_model_by_cost_per_million_frames() -> None:
    catalogue = PriceCatalogue.parse(
        """providers:
  aws: {"A100 40GB": {on_demand: 3.6, spot: 1.44}, L4: {on_demand: 0.72}}
  gcp: {"A100 80GB": {on_demand: 4.0}, L4: {spot: 0.36}}
"""
    )
    rows = [
        {"gpu_model": "NVIDIA A100-SXM4-40GB", "frames_per_gpu_second": 100.0, "jobs": 3},
        {"gpu_model": "NVIDIA L4", "frames_per_gpu_second": 10.0, "jobs": 2},
        {"gpu_model": "NVIDIA H100 80GB HBM3", "frames_per_gpu_second": 0.0, "jobs": 1},  # no frames
    ]
    out = recommend.cheapest(rows, catalogue)
    # EUR per GPU hour * 1e6 / (frames/s * 3600): the A100 80GB of gcp does not match a 40GB measurement
    assert [
        (r["provider"], r["catalogue_model"], r["pricing"], round(r["eur_per_million_frames"], 6))
        for r in out
    ] == [
        ("aws", "A100 40GB", "spot", 4.0),
        ("aws", "A100 40GB", "on_demand", 10.0),  # a tie goes by provider
        ("gcp", "L4", "spot", 10.0),
        ("aws", "L4", "on_demand", 20.0),
    ]


def _job(frames: list[float], first_hour: int = 0) -> dict[str, Any]:
    return {
        "job_id": "j1", "project": "p", "model": "m", "host": "h1", "gpu_count": 1, "gpu_model": "L4",
        "hours": [T0 + timedelta(hours=first_hour + i) for i in range(len(frames))],
        "frames": [f * 3600 for f in frames],
    }  # fmt: skip


def _gpu_rows(values: dict[str, list[float]], uuid: str = "g1", memory: float = 50.0) -> list[dict[str, Any]]:
    hours = len(next(iter(values.values())))
    values = {"gpu_memory_utilization_percent": [memory] * hours, **values}
    return [
        {"host": "h1", "gpu": "0", "gpu_uuid": uuid, "metric": metric,
         "bucket_start": T0 + timedelta(hours=i), "avg": v}
        for metric, series in values.items()
        for i, v in enumerate(series)
    ]  # fmt: skip


def test_a_job_is_slow_in_whole_hours_well_below_its_fastest_and_the_hour_in_between_is_left_out() -> None:
    # 100 frames/s for 3 h, 80 (the hour the slowdown began in), then 50 for 2 h.
    jobs = [_job([100.0, 99.0, 100.0, 80.0, 50.0, 51.0])]
    (slow,) = slowdown.slow_periods(jobs, 30.0, since=T0)
    assert slow["normal_hours"] == [T0 + timedelta(hours=h) for h in (0, 1, 2)]
    assert slow["slow_hours"] == [T0 + timedelta(hours=h) for h in (4, 5)]
    assert slow["normal_frames_per_second"] == pytest.approx(100.0)
    assert slow["slow_frames_per_second"] == pytest.approx(50.5)
    # Slow from its first hour (no normal hour before), a mere wobble, or slow before `since`: not listed.
    assert slowdown.slow_periods([_job([50.0, 100.0, 100.0])], 30.0, since=T0) == []
    assert slowdown.slow_periods([_job([100.0, 85.0, 80.0])], 30.0, since=T0) == []
    assert slowdown.slow_periods(jobs, 30.0, since=T0 + timedelta(hours=6)) == []
    assert len(slowdown.slow_periods(jobs, 60.0, since=T0)) == 0


def test_the_metric_that_moved_most_names_the_cause() -> None:
    jobs = [_job([100.0, 100.0, 100.0, 50.0, 50.0])]
    steady = {
        "gpu_utilization_percent": [90.0, 91.0, 89.0, 90.0, 90.5],
        "gpu_temperature_celsius": [70.0, 70.5, 69.5, 70.0, 70.2],
        "gpu_power_watts": [300.0, 305.0, 298.0, 301.0, 300.0],
    }
    throttled = _gpu_rows({**steady, "gpu_sm_clock_hz": [1.98e9] * 3 + [1.19e9] * 2})
    (job,) = slowdown.slowed_jobs(jobs, throttled, 30.0, 5.0, since=T0)
    assert job["likely_cause"] == "throttling" and job["cause_metric"] == "gpu_sm_clock_hz"
    assert job["gpus_compared"] == 1
    top = job["moved_most"][0]
    assert top["metric"] == "gpu_sm_clock_hz" and top["change"] == pytest.approx(-0.4, abs=0.01)
    assert top["score"] < -10 and all(abs(m["score"]) < 3 for m in job["moved_most"][1:])
    assert job["throughput_drop"] == pytest.approx(0.5)

    pressure = _gpu_rows(steady, memory=0) + _gpu_rows(
        {"gpu_memory_used_bytes": [40e9] * 3 + [79e9] * 2}, memory=0
    )
    for row in pressure:
        if row["metric"] == "gpu_memory_utilization_percent":
            row["avg"] = 50.0 if row["bucket_start"] < T0 + timedelta(hours=3) else 98.0
    (job,) = slowdown.slowed_jobs(jobs, pressure, 30.0, 5.0, since=T0)
    assert job["likely_cause"] == "memory_pressure"
    assert {m["metric"] for m in job["moved_most"][:2]} == {
        "gpu_memory_utilization_percent",
        "gpu_memory_used_bytes",
    }
    # A GPU of the host no job held in every compared hour is not compared; nothing moved clearly: unclear.
    idle = _gpu_rows({"gpu_sm_clock_hz": [1.98e9] * 3 + [1.19e9] * 2}, uuid="g2", memory=1.0)
    (job,) = slowdown.slowed_jobs(jobs, idle + _gpu_rows(steady), 30.0, 5.0, since=T0)
    assert job["gpus_compared"] == 1 and job["likely_cause"] is None
    assert "gpu_sm_clock_hz" not in {m["metric"] for m in job["moved_most"]}
    lines = slowdown.render([job], 30.0)
    assert "100.0 -> 50.0 frames/s (-50%)" in lines[1] and "likely cause: unclear" in lines[1]


def test_a_cause_is_named_by_a_move_in_its_direction_even_below_consequences_of_the_slowdown() -> None:
    jobs = [_job([100.0, 100.0, 100.0, 50.0, 50.0])]
    # An allocated GPU also left idle: utilization and power fall most, the clock below them names the cause.
    rows = _gpu_rows({
        "gpu_utilization_percent": [90.0, 90.0, 90.0, 2.0, 2.0],
        "gpu_power_watts": [300.0, 300.0, 300.0, 60.0, 60.0],
        "gpu_sm_clock_hz": [1.98e9] * 3 + [1.4e9] * 2,
        "gpu_temperature_celsius": [70.0, 70.0, 70.0, 40.0, 40.0],
    })  # fmt: skip
    (job,) = slowdown.slowed_jobs(jobs, rows, 30.0, 5.0, since=T0)
    assert [m["metric"] for m in job["moved_most"][:2]] == ["gpu_utilization_percent", "gpu_power_watts"]
    assert (job["likely_cause"], job["cause_metric"]) == ("throttling", "gpu_sm_clock_hz")
    assert any("gpu_sm_clock_hz on GPU 0" in line for line in slowdown.render([job], 30.0))
    # A cooler GPU alone (less power drawn) names no cause: temperature counts when it rises.
    rows = _gpu_rows({"gpu_temperature_celsius": [70.0, 70.0, 70.0, 40.0, 40.0]})
    assert slowdown.slowed_jobs(jobs, rows, 30.0, 5.0, since=T0)[0]["likely_cause"] is None


def test_a_job_that_names_its_gpus_is_compared_on_those_only() -> None:
    steady = {"gpu_utilization_percent": [90.0, 91.0, 89.0, 90.0, 90.5]}
    # Another job's GPU on the same host throttled; this job's own GPU (g1) did not.
    throttled = {**steady, "gpu_sm_clock_hz": [1.98e9] * 3 + [1.19e9] * 2}
    rows = _gpu_rows(steady) + _gpu_rows(throttled, uuid="g2")
    host_wide = _job([100.0, 100.0, 100.0, 50.0, 50.0])
    (job,) = slowdown.slowed_jobs([host_wide], rows, 30.0, 5.0, since=T0)
    assert (job["gpus_compared"], job["likely_cause"]) == (2, "throttling")  # g2's move is a candidate
    (job,) = slowdown.slowed_jobs([{**host_wide, "gpu_uuids": ["g1"]}], rows, 30.0, 5.0, since=T0)
    assert (job["gpus_compared"], job["likely_cause"]) == (1, None)
    assert {m["gpu_uuid"] for m in job["moved_most"]} == {"g1"}
    # A job known only by its GPUs (no host in its events) adds no host to look up.
    (period,) = slowdown.slow_periods([{**host_wide, "host": None, "gpu_uuids": ["g1"]}], 30.0, since=T0)
    assert period["gpu_uuids"] == ["g1"]
    assert slowdown.hosts_and_span([period]) == ([], T0, T0 + timedelta(hours=5))
