"""The arithmetic of the recommendations (issue 17), apart from SQL so it can be tested on plain rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from api.config import ApiSettings


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


def build(conn: Any, config: ApiSettings, projects: Sequence[str] | None, now: datetime) -> dict[str, Any]:
    """Every recommendation for ``projects`` (None: the fleet) as of ``now``: the body of
    `GET /recommendations` and of `aima-metrics recommend --json`."""
    from api import recommend_sql

    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=config.recommend_window_hours)
    idle = idle_costs(
        recommend_sql.idle_gpu_hours(conn, start, end, projects),
        days=config.recommend_window_hours / 24,
        min_idle_share=config.recommend_idle_min_share,
    )
    return {
        "start_time": start.isoformat(),
        "end_time": end.isoformat(),
        "idle_min_share": config.recommend_idle_min_share,
        "idle_gpus": idle,
        "budgets": budget_projections(recommend_sql.latest_budgets(conn, projects)),
    }


def render(body: Mapping[str, Any]) -> str:
    """A readable report of :func:`build`'s body."""
    lines = [f"Recommendations for {body['start_time']} .. {body['end_time']}", "", "Idle GPUs:"]
    for r in body["idle_gpus"]:
        lines.append(
            f"  {r['project']} {r['provider']}/{r['gpu_model']} ({r['pricing']}): "
            f"{r['idle_gpu_hours']:.1f} idle GPU h ({r['idle_share']:.0%}), "
            f"{r['idle_cost_eur_per_day']:.2f} {r['currency']}/day wasted"
        )
    if not body["idle_gpus"]:
        lines.append(f"  none at least {body['idle_min_share']:.0%} idle")
    lines += ["", "Budgets (period-end forecast):"]
    for b in body["budgets"]:
        verdict = f"OVER by {b['overrun_eur']:.2f}" if b["over_budget"] else "within"
        lines.append(
            f"  {b['project']}/{b['budget']}: spent {b['spent_eur'] or 0:.2f}, forecast "
            f"{b['forecast_eur'] or 0:.2f} of {b['budget_eur'] or 0:.2f} {b['currency']}: {verdict}"
        )
    if not body["budgets"]:
        lines.append("  no budgets")
    return "\n".join(lines)
