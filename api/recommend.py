"""The arithmetic of the recommendations (issue 17), apart from SQL so it can be tested on plain rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def idle_costs(rows: Iterable[Mapping[str, Any]], days: float, min_idle_share: float) -> list[dict[str, Any]]:
    """Idle GPU capacity worth acting on: rows whose idle share of GPU hours is at least ``min_idle_share``,
    with the idle cost per day (idle hours priced at the row's average price per GPU hour, over ``days``).
    Largest waste first."""
    out = []
    for row in rows:
        gpu_hours = row.get("gpu_hours") or 0.0
        idle = row.get("idle_gpu_hours") or 0.0
        if gpu_hours <= 0 or idle <= 0 or idle / gpu_hours < min_idle_share:
            continue
        price = (row.get("cost_eur") or 0.0) / gpu_hours
        out.append(
            {
                **{k: row.get(k) for k in ("project", "provider", "gpu_model", "pricing", "currency")},
                "idle_gpu_hours": idle,
                "idle_share": idle / gpu_hours,
                "idle_cost_eur_per_day": idle * price / days,
            }
        )
    return sorted(out, key=lambda r: -r["idle_cost_eur_per_day"])


def budget_projections(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Period-end spend against budget per project budget: the forecast, the overrun (forecast minus
    budget, 0 when within) and whether it is projected over. Projected overruns first."""
    out = []
    for row in rows:
        budget = row.get("budget_eur")
        forecast = row.get("forecast_eur")
        over = budget is not None and forecast is not None and forecast > budget
        out.append(
            {
                **{k: row.get(k) for k in ("project", "budget", "period_start", "period_end", "currency")},
                "budget_eur": budget,
                "spent_eur": row.get("spent_eur"),
                "forecast_eur": forecast,
                "over_budget": over,
                "overrun_eur": (forecast - budget) if over else 0.0,
            }
        )
    return sorted(out, key=lambda r: (not r["over_budget"], -(r["overrun_eur"] or 0.0)))
