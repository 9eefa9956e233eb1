"""The arithmetic of the recommendations on plain rows."""

from __future__ import annotations

import pytest

from api import recommend


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
