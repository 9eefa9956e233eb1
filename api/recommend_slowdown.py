"""For a job that got slow, the GPU metrics that moved most against its own history (issue 17,
recommendations), on plain rows of :func:`api.recommend_sql.job_frame_hours` and
:func:`api.recommend_sql.gpu_metric_hours`.

A job's throughput is measured per whole hour it ran (hour tier of job_frame_processing_seconds: frames in
the hour over 3,600 s). Its own history is its fastest hour: an hour within ``NORMAL_TOLERANCE`` of it is
normal, an hour at least ``min_drop_percent`` below it is slow, an hour in between is neither. The hourly
rollups cannot split an hour, so an hour in which a slowdown began or ended part-way, whose throughput lies
between the two, is compared on neither side rather than blurring both: a slowdown shows once it has
filled a whole hour. A job is listed when a slow hour follows a normal one.

Then, for each GPU metric of ``METRICS`` on each GPU of the job's host that a job held in every compared
hour (hourly mean memory in use at least the allocated threshold), the median of the slow hours' means
against the median of the normal hours': ``change`` relative to the normal median, ``score`` a robust
z-score (the difference over the normal hours' MAD x 1.4826, at least ``RELATIVE_FLOOR`` of the normal
median, so two or three steady normal hours do not make every wobble huge). Per metric the GPU that moved
most; metrics by |score|, largest first. A job whose events name its GPUs (JobEvent gpu_uuids) is compared
on those only. Otherwise its events name its host and GPU count, not its GPUs: on a host whose other GPUs
ran other jobs, their moves are candidates too (``gpus_compared`` says how many GPUs were looked at), exact
for a job alone on its host's held GPUs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from statistics import median
from typing import Any

METRICS = (
    "gpu_sm_clock_hz",
    "gpu_memory_clock_hz",
    "gpu_temperature_celsius",
    "gpu_power_watts",
    "gpu_utilization_percent",
    "gpu_tensor_core_utilization_percent",
    "gpu_memory_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_memory_bandwidth_utilization_percent",
    "gpu_pcie_rx_bytes_per_second",
    "gpu_pcie_tx_bytes_per_second",
)
"""The GPU gauges compared (counters such as energy and ECC errors are not: their means only grow)."""
HELD_METRIC = "gpu_memory_utilization_percent"
NORMAL_TOLERANCE = 0.1
"""An hour within this share of the job's fastest hour is normal."""
RELATIVE_FLOOR = 0.02
"""Least scale of the z-score, as a share of the normal median."""
CAUSES = {
    "gpu_sm_clock_hz": ("throttling", -1),
    "gpu_memory_clock_hz": ("throttling", -1),
    "gpu_temperature_celsius": ("throttling", 1),
    "gpu_memory_utilization_percent": ("memory_pressure", 1),
    "gpu_memory_used_bytes": ("memory_pressure", 1),
}
"""What a metric that moved clearly (``CAUSE_MIN_SCORE``) in the given direction suggests: clocks down or
the temperature up, throttling; memory up, memory pressure. Utilization, power, bandwidth and PCIe fall with
any slowdown (less work done) and a cooler GPU follows less power, so they suggest no cause by themselves;
``likely_cause`` is the cause of the highest-ranked move that suggests one."""
CAUSE_MIN_SCORE = 3.0


def slow_periods(jobs: Iterable[Mapping[str, Any]], min_drop_percent: float, since: datetime) -> list[dict]:
    """The jobs with a slow hour (at least ``min_drop_percent`` below their fastest whole hour) after a
    normal one, the last slow hour starting at or after ``since``: the job's fields with its
    ``normal_hours`` and ``slow_hours`` (bucket starts) and frames/s of each."""
    out = []
    for job in jobs:
        fps = [frames / 3600.0 for frames in job["frames"]]
        if not fps or max(fps) <= 0:
            continue
        best = max(fps)
        normal = [i for i, v in enumerate(fps) if v >= best * (1 - NORMAL_TOLERANCE)]
        slow = [i for i, v in enumerate(fps) if v <= best * (1 - min_drop_percent / 100) and i > normal[0]]
        if not slow or job["hours"][slow[-1]] < since:
            continue
        hours = job["hours"]
        out.append(
            {
                **{k: job[k] for k in ("job_id", "project", "model", "host", "gpu_count", "gpu_model")},
                "gpu_uuids": job.get("gpu_uuids"),
                "normal_hours": [hours[i] for i in normal],
                "slow_hours": [hours[i] for i in slow],
                "normal_frames_per_second": median(fps[i] for i in normal),
                "slow_frames_per_second": median(fps[i] for i in slow),
            }
        )
    return out


def moved_most(
    job: Mapping[str, Any], gpu_rows: Iterable[Mapping[str, Any]], held_percent: float
) -> tuple[list[dict[str, Any]], int]:
    """The GPU metrics of ``job``'s GPUs (those its events named, else every GPU of its host) that moved
    between its normal and slow hours, most first, and how many GPUs were compared (held in every compared
    hour)."""
    series: dict[tuple[str, str], dict[str, dict[datetime, float]]] = defaultdict(lambda: defaultdict(dict))
    gpu_index: dict[str, str] = {}
    own = set(job.get("gpu_uuids") or ())
    for row in gpu_rows:
        if row["host"] == job["host"] and (not own or row["gpu_uuid"] in own):
            series[(row["host"], row["gpu_uuid"])][row["metric"]][row["bucket_start"]] = row["avg"]
            gpu_index[row["gpu_uuid"]] = row["gpu"]
    compared = [*job["normal_hours"], *job["slow_hours"]]
    best: dict[str, dict[str, Any]] = {}
    gpus = 0
    for (_host, uuid), metrics in sorted(series.items()):
        held = metrics.get(HELD_METRIC, {})
        if any(held.get(h) is None or held[h] < held_percent for h in compared):
            continue
        gpus += 1
        for metric in METRICS:
            move = _move(metrics.get(metric, {}), job["normal_hours"], job["slow_hours"])
            if move is None:
                continue
            if metric not in best or abs(move["score"]) > abs(best[metric]["score"]):
                best[metric] = {"metric": metric, "gpu": gpu_index[uuid], "gpu_uuid": uuid, **move}
    return sorted(best.values(), key=lambda m: (-abs(m["score"]), m["metric"])), gpus


def _move(
    values: Mapping[datetime, float], normal_hours: Sequence[datetime], slow_hours: Sequence[datetime]
) -> dict[str, float | None] | None:
    normal = [values[h] for h in normal_hours if values.get(h) is not None]
    slow = [values[h] for h in slow_hours if values.get(h) is not None]
    if not normal or not slow:
        return None
    n, s = median(normal), median(slow)
    spread = 1.4826 * median(abs(v - n) for v in normal)
    scale = max(spread, RELATIVE_FLOOR * abs(n), 1e-9)
    return {"normal": n, "slow": s, "change": (s - n) / abs(n) if n else None, "score": (s - n) / scale}


def slowed_jobs(
    jobs: Iterable[Mapping[str, Any]],
    gpu_rows: Sequence[Mapping[str, Any]],
    min_drop_percent: float,
    held_percent: float,
    since: datetime,
) -> list[dict[str, Any]]:
    """Every job of :func:`slow_periods` with the metrics that moved most (``moved_most``), the cause
    they suggest (``likely_cause``, :data:`CAUSES`; null when none clearly) and the metric that suggests it
    (``cause_metric``), hours as ISO text. Largest drop first."""
    out = []
    for job in slow_periods(jobs, min_drop_percent, since):
        moves, gpus = moved_most(job, gpu_rows, held_percent)
        named = next((m for m in moves if _cause(m) is not None), None)
        out.append(
            {
                **job,
                "normal_hours": [_iso(h) for h in job["normal_hours"]],
                "slow_hours": [_iso(h) for h in job["slow_hours"]],
                "slow_since": _iso(job["slow_hours"][0]),
                "throughput_drop": 1 - job["slow_frames_per_second"] / job["normal_frames_per_second"],
                "gpus_compared": gpus,
                "moved_most": moves,
                "likely_cause": None if named is None else _cause(named),
                "cause_metric": None if named is None else named["metric"],
            }
        )
    return sorted(out, key=lambda r: (-r["throughput_drop"], r["job_id"]))


def _cause(move: Mapping[str, Any]) -> str | None:
    cause, sign = CAUSES.get(move["metric"], (None, 0))
    return cause if move["score"] * sign >= CAUSE_MIN_SCORE else None


def hosts_and_span(jobs: Iterable[Mapping[str, Any]]) -> tuple[list[str], datetime, datetime] | None:
    """The hosts and the hours of :func:`slow_periods` rows, for :func:`api.recommend_sql.gpu_metric_hours`
    (None: no job)."""
    jobs = list(jobs)
    if not jobs:
        return None
    hours = [h for job in jobs for h in (*job["normal_hours"], *job["slow_hours"])]
    hosts = {job["host"] for job in jobs if job["host"] is not None}  # a job known only by its GPUs
    return sorted(hosts), min(hours), max(hours) + timedelta(hours=1)


def render(rows: Sequence[Mapping[str, Any]], min_drop_percent: float) -> list[str]:
    """The report's lines of :func:`slowed_jobs`."""
    lines = [f"Jobs that got slow (frames/s {min_drop_percent:g} %+ below their own fastest whole hour):"]
    for r in rows:
        lines.append(
            f"  {r['job_id']} ({r['project']}, {r['model']}) on {r['host']} x{r['gpu_count']} "
            f"{r['gpu_model']}: "
            f"{r['normal_frames_per_second']:.1f} -> {r['slow_frames_per_second']:.1f} frames/s "
            f"(-{r['throughput_drop']:.0%}) since {r['slow_since']} ({len(r['normal_hours'])} normal h, "
            f"{len(r['slow_hours'])} slow h); likely cause: {r['likely_cause'] or 'unclear'}"
        )
        shown = r["moved_most"][:3]
        shown += [m for m in r["moved_most"][3:] if m["metric"] == r["cause_metric"]]
        for m in shown:
            change = "" if m["change"] is None else f" ({m['change']:+.0%})"
            lines.append(
                f"    {m['metric']} on GPU {m['gpu']}: {_num(m['normal'])} -> {_num(m['slow'])}{change}, "
                f"score {m['score']:+.1f}"
            )
        if not r["moved_most"]:
            lines.append("    no GPU of its host held in every compared hour")
    if not rows:
        lines.append("  none")
    return lines


def _num(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def _iso(hour: datetime) -> str:
    return hour.astimezone(UTC).isoformat()
