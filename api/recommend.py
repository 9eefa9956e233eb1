"""The arithmetic of the recommendations (issue 17), apart from SQL so it can be tested on plain rows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from api import recommend_slowdown
from api.config import ApiSettings
from bus.prices import PRICINGS, CatalogueError, PriceCatalogue

log = logging.getLogger(__name__)

MAX_ROWS = 200
"""Most rows of each per-GPU and per-job list: the worst first, so a large fleet's answer stays readable
(``truncated`` says when more matched)."""
PRICE_LOOKBACK = timedelta(days=7)
"""How far back the hourly cost figures give a host's price per GPU hour (a price rarely changes; a week
prices a host that ran no job in the window)."""
SLOWDOWN_LOOKBACK = timedelta(days=7)
"""How far back a slowed job's own history goes: the hour tier of the rollups is kept 7 days (D2)."""
THROUGHPUT_LOOKBACK = timedelta(days=30)
"""How far back the ended jobs give the measured throughput per GPU model: the day tier of the rollups,
which holds their frame counts, is kept 30 days (D2)."""


@dataclass(frozen=True)
class Thresholds:
    """What the recommendations call idle, allocated and worth a larger batch: the AIMA_API_RECOMMEND_*
    settings, each of which a request or the CLI may override."""

    idle_below_percent: float
    idle_min_hours: int
    allocated_memory_percent: float
    memory_safe_percent: float
    batch_min_factor: float
    slowdown_min_drop_percent: float

    @classmethod
    def of(cls, config: ApiSettings, **overrides: Any) -> Thresholds:
        """The settings' thresholds with every override that is not None."""
        base = cls(
            config.recommend_idle_below_percent,
            config.recommend_idle_min_hours,
            config.recommend_allocated_memory_percent,
            config.recommend_memory_safe_percent,
            config.recommend_batch_min_factor,
            config.recommend_slowdown_min_drop_percent,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


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
    budget, 0 when within) and whether it is projected over. Projected overruns first. The cost processor
    also sends each project's month without a budget (budget null: its forecast alone); that row is kept
    only for a project that has no budget, as its month-end spend."""
    rows = list(rows)
    budgeted = {row.get("project") for row in rows if row.get("budget") is not None}
    out = []
    for row in rows:
        if row.get("budget") is None and row.get("project") in budgeted:
            continue
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


def idle_by_gpu(
    gpus: Iterable[Mapping[str, Any]],
    prices: Mapping[str, Mapping[str, Any]],
    thresholds: Thresholds,
    days: float,
) -> list[dict[str, Any]]:
    """GPUs idle for at least ``idle_min_hours`` consecutive hours, from :func:`api.recommend_sql.gpu_hours`
    rows: an hour is idle when its mean utilization is below ``idle_below_percent``, and then
    ``allocated`` when the GPU's mean memory in use was at least ``allocated_memory_percent`` (a job held
    it and left it idle), else ``unallocated``. One row per GPU and state whose longest run of
    consecutive idle hours in that state is long enough; ``idle_hours``: all its idle hours in that
    state. ``idle_cost_eur_per_day``: those hours at the host's price per GPU hour (``prices``, by
    host) over ``days``; null when no price is known. Costliest first."""
    out = []
    for gpu in gpus:
        runs: dict[str, _Run] = {"allocated": _Run(), "unallocated": _Run()}
        for hour, util, memory in zip(
            gpu["hours"], gpu["utilization_percent"], gpu["memory_percent"], strict=True
        ):
            state = None
            if util is not None and util < thresholds.idle_below_percent:
                held = memory is not None and memory >= thresholds.allocated_memory_percent
                state = "allocated" if held else "unallocated"
            for name, run in runs.items():
                run.add(hour, util if name == state else None)
        price = prices.get(gpu["host"], {})
        eur = price.get("eur_per_gpu_hour")
        for state, run in runs.items():
            if run.longest < thresholds.idle_min_hours:
                continue
            out.append(
                {
                    **{k: gpu[k] for k in ("host", "gpu", "gpu_uuid", "gpu_model")},
                    "provider": price.get("provider"),
                    "pricing": price.get("pricing"),
                    "state": state,
                    "idle_hours": len(run.utilization),
                    "longest_idle_hours": run.longest,
                    "longest_idle_start": run.span[0].astimezone(UTC).isoformat(),
                    "longest_idle_end": run.span[1].astimezone(UTC).isoformat(),
                    "idle_utilization_percent": sum(run.utilization) / len(run.utilization),
                    "eur_per_gpu_hour": eur,
                    "idle_cost_eur_per_day": None if eur is None else len(run.utilization) * eur / days,
                    "currency": price.get("currency"),
                }
            )
    return sorted(
        out,
        key=lambda r: (r["idle_cost_eur_per_day"] is None, -(r["idle_cost_eur_per_day"] or 0.0),
                       -r["idle_hours"], r["host"], r["gpu_uuid"], r["state"]),
    )  # fmt: skip


class _Run:
    """The idle hours of one GPU in one state, fed hour by hour (oldest first): their utilization, and the
    longest run of consecutive ones. A missing hour (no samples) ends a run: nothing says it was idle."""

    def __init__(self) -> None:
        self.utilization: list[float] = []
        self.longest = 0
        self.span: tuple[datetime, datetime] = (datetime.min, datetime.min)
        self._run = 0
        self._start = self._last = datetime.min

    def add(self, hour: datetime, idle_utilization: float | None) -> None:
        """``idle_utilization``: the hour's utilization when it is idle in this state, else None."""
        if idle_utilization is None:
            self._run = 0
            return
        self.utilization.append(idle_utilization)
        if self._run and hour - self._last == timedelta(hours=1):
            self._run += 1
        else:
            self._run, self._start = 1, hour
        self._last = hour
        if self._run > self.longest:
            self.longest, self.span = self._run, (self._start, hour + timedelta(hours=1))


def memory_headroom(jobs: Iterable[Mapping[str, Any]], thresholds: Thresholds) -> list[dict[str, Any]]:
    """Jobs whose peak memory in use (:func:`api.recommend_sql.job_memory`, an upper bound of their own)
    leaves room for a batch at least ``batch_min_factor`` times larger: ``batch_factor`` is
    ``memory_safe_percent`` over the peak. A lower estimate: the activations grow with the batch, the
    model's weights do not, so the batch can grow a little more than memory's ratio. Largest first."""
    out = []
    for job in jobs:
        peak = job.get("peak_memory_percent")
        if peak is None or peak <= 0:
            continue
        factor = thresholds.memory_safe_percent / peak
        if factor >= thresholds.batch_min_factor:
            out.append({**job, "batch_factor": factor})
    return sorted(out, key=lambda r: (-r["batch_factor"], r["job_id"]))


def build(
    conn: Any,
    config: ApiSettings,
    projects: Sequence[str] | None,
    now: datetime,
    thresholds: Thresholds | None = None,
    *,
    gpus_visible: bool = True,
    job_model: str | None = None,
) -> dict[str, Any]:
    """Every recommendation for ``projects`` (None: the fleet) as of ``now``: the body of
    `GET /recommendations` and of `aima-metrics recommend --json`. ``gpus_visible``: whether the reader
    may see per-GPU figures (GPU metrics carry no project); when not, ``idle_by_gpu`` is null.
    ``job_model``: the job profile of ``cheapest`` (jobs running that model; None: every job)."""
    from api import recommend_sql

    th = thresholds or Thresholds.of(config)
    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=config.recommend_window_hours)
    days = config.recommend_window_hours / 24
    idle = idle_costs(
        recommend_sql.idle_gpu_hours(conn, start, end, projects),
        days=days,
        min_idle_share=config.recommend_idle_min_share,
    )
    by_gpu: list[dict[str, Any]] | None = None
    if gpus_visible:
        prices = recommend_sql.host_prices(conn, end - PRICE_LOOKBACK, end)
        by_gpu = idle_by_gpu(recommend_sql.gpu_hours(conn, start, end), prices, th, days)
    # Jobs up to now, not to the last whole hour: a running job's current hour counts.
    headroom = memory_headroom(
        recommend_sql.job_memory(conn, start, now, th.allocated_memory_percent, projects), th
    )
    slowed = None
    if gpus_visible:
        frames = recommend_sql.job_frame_hours(conn, end - SLOWDOWN_LOOKBACK, end, projects)
        periods = recommend_slowdown.slow_periods(frames, th.slowdown_min_drop_percent, start)
        span = recommend_slowdown.hosts_and_span(periods)
        rows = (
            []
            if span is None
            else recommend_sql.gpu_metric_hours(conn, *span, list(recommend_slowdown.METRICS))
        )
        slowed = recommend_slowdown.slowed_jobs(
            frames, rows, th.slowdown_min_drop_percent, th.allocated_memory_percent, start
        )
    throughputs = recommend_sql.throughput(conn, end - THROUGHPUT_LOOKBACK, now, job_model, projects)
    problem = None
    try:
        ranked = cheapest(throughputs, PriceCatalogue.load(config.recommend_prices_file))
    except CatalogueError as exc:  # the operator's file: say what is wrong, answer the rest
        log.error("cheapest provider left out: %s", exc)
        ranked, problem = [], f"the price catalogue cannot be used: {exc}"
    return {
        "start_time": start.isoformat(),
        "end_time": end.isoformat(),
        "idle_min_share": config.recommend_idle_min_share,
        "thresholds": {
            "idle_below_percent": th.idle_below_percent,
            "idle_min_hours": th.idle_min_hours,
            "allocated_memory_percent": th.allocated_memory_percent,
            "memory_safe_percent": th.memory_safe_percent,
            "batch_min_factor": th.batch_min_factor,
            "slowdown_min_drop_percent": th.slowdown_min_drop_percent,
        },
        "idle_gpus": idle,
        "idle_by_gpu": None if by_gpu is None else by_gpu[:MAX_ROWS],
        "idle_by_gpu_truncated": by_gpu is not None and len(by_gpu) > MAX_ROWS,
        "memory_headroom": headroom[:MAX_ROWS],
        "memory_headroom_truncated": len(headroom) > MAX_ROWS,
        "slowed_jobs": None if slowed is None else slowed[:MAX_ROWS],
        "slowed_jobs_truncated": slowed is not None and len(slowed) > MAX_ROWS,
        "job_model": job_model,
        "throughput": throughputs,
        "cheapest": ranked,
        "cheapest_problem": problem,
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
    th = body["thresholds"]
    lines += [
        "",
        f"Idle GPUs, one by one (below {th['idle_below_percent']:g} % for {th['idle_min_hours']}+ hours):",
    ]
    if body["idle_by_gpu"] is None:
        lines.append("  not shown: this reader may not read the GPU metrics")
    for g in body["idle_by_gpu"] or []:
        cost = (
            f"{g['idle_cost_eur_per_day']:.2f} {g['currency']}/day"
            if g["idle_cost_eur_per_day"] is not None
            else "no price known"
        )
        lines.append(
            f"  {g['host']} GPU {g['gpu']} {g['gpu_model']} ({g['provider'] or '?'}/{g['pricing'] or '?'}): "
            f"{g['state']}, {g['idle_hours']} idle h at {g['idle_utilization_percent']:.1f} % (longest "
            f"{g['longest_idle_hours']} h from {g['longest_idle_start']}): {cost}"
        )
    if body["idle_by_gpu"] == []:
        lines.append("  none")
    lines += ["", f"Memory headroom (batch could grow at least {th['batch_min_factor']:g}x):"]
    for j in body["memory_headroom"]:
        lines.append(
            f"  {j['job_id']} ({j['project']}, {j['model']}) on {j['host']} x{j['gpu_count']} "
            f"{j['gpu_model']}: peak {j['peak_memory_percent']:.1f} % of GPU memory "
            f"(p95 {j['p95_memory_percent']:.1f} %): batch x{j['batch_factor']:.1f}"
        )
    if not body["memory_headroom"]:
        lines.append("  none")
    lines.append("")
    if body["slowed_jobs"] is None:
        lines += ["Jobs that got slow:", "  not shown: this reader may not read the GPU metrics"]
    else:
        lines += recommend_slowdown.render(body["slowed_jobs"], th["slowdown_min_drop_percent"])
    profile = f"jobs running {body['job_model']}" if body["job_model"] else "every job"
    lines += ["", f"Cheapest provider and GPU model per million frames ({profile}, measured throughput):"]
    for c in body["cheapest"][:10]:
        lines.append(
            f"  {c['provider']} {c['catalogue_model']} ({c['pricing']}): {c['eur_per_million_frames']:.2f} "
            f"EUR/M frames at {c['frames_per_gpu_second']:.1f} frames/s per GPU ({c['jobs_measured']} jobs "
            f"on {c['gpu_model']}), {c['eur_per_gpu_hour']:.2f} EUR/GPU h"
        )
    if len(body["cheapest"]) > 10:
        lines.append(f"  ... {len(body['cheapest']) - 10} more")
    if body["cheapest_problem"]:
        lines.append(f"  not known: {body['cheapest_problem']}")
    elif not body["cheapest"]:
        lines.append("  no ended job with frames and a priced GPU model")
    lines += ["", "Budgets (period-end forecast):"]
    for b in body["budgets"]:
        if b["budget"] is None:
            forecast = b["forecast_eur"] or 0
            lines.append(f"  {b['project']}: forecast {forecast:.2f} {b['currency']}, no budget")
            continue
        verdict = f"OVER by {b['overrun_eur']:.2f}" if b["over_budget"] else "within"
        lines.append(
            f"  {b['project']}/{b['budget']}: spent {b['spent_eur'] or 0:.2f}, forecast "
            f"{b['forecast_eur'] or 0:.2f} of {b['budget_eur'] or 0:.2f} {b['currency']}: {verdict}"
        )
    if not body["budgets"]:
        lines.append("  no budgets")
    return "\n".join(lines)


def cheapest(throughputs: Iterable[Mapping[str, Any]], catalogue: PriceCatalogue) -> list[dict[str, Any]]:
    """Every (provider, GPU model, pricing) of the price catalogue for which a throughput was measured,
    with its cost per million frames (the price of a GPU hour over the frames one GPU processes in an
    hour); cheapest first. A measured model is looked up at every provider of the catalogue by the
    catalogue's matching rule (bus/prices.py); a provider without that model or pricing is left out."""
    out = []
    for row in throughputs:
        fps = row.get("frames_per_gpu_second")
        if not fps or fps <= 0:
            continue
        for provider in sorted(catalogue.providers):
            entry = catalogue.match(provider, row["gpu_model"])
            for pricing in PRICINGS:
                eur = None if entry is None else entry.eur_per_gpu_hour(pricing)
                if eur is None:
                    continue
                out.append(
                    {
                        "provider": provider,
                        "gpu_model": row["gpu_model"],
                        "catalogue_model": entry.model,
                        "pricing": pricing,
                        "eur_per_gpu_hour": eur,
                        "frames_per_gpu_second": fps,
                        "jobs_measured": row["jobs"],
                        "gpu_hours_per_million_frames": 1e6 / (fps * 3600),
                        "eur_per_million_frames": eur * 1e6 / (fps * 3600),
                    }
                )
    return sorted(out, key=lambda r: (r["eur_per_million_frames"], r["provider"], r["pricing"]))
