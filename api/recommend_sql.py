"""SQL of the recommendations (issue 17): read only the hourly cost figures and budget figures of the
costs table, which are kept without expiry, never the raw samples (kept 24 h)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from api.sql import Conn, Projects, json_row


def _project_filter(projects: Projects, column: str = "project") -> tuple[sql.Composable, list[Any]]:
    if projects is None:
        return sql.SQL("TRUE"), []
    return sql.SQL("{} = ANY(%s)").format(sql.Identifier(column)), [list(projects)]


def idle_gpu_hours(conn: Conn, start: datetime, end: datetime, projects: Projects) -> list[dict[str, Any]]:
    """Per (project, provider, GPU model, pricing) in [start, end): GPU hours, idle GPU hours and the
    estimated cost, from the hourly gpu_hours figures."""
    where, params = _project_filter(projects)
    query = sql.SQL(
        """SELECT NULLIF(project, '') AS project, NULLIF(provider, '') AS provider,
                  NULLIF(gpu_model, '') AS gpu_model, NULLIF(pricing, '') AS pricing,
                  sum(gpu_hours) AS gpu_hours, sum(coalesce(idle_gpu_hours, 0)) AS idle_gpu_hours,
                  sum(cost_estimated_eur) AS cost_eur, min(currency) AS currency
             FROM costs
            WHERE kind = 'gpu_hours' AND time >= %s AND time < %s AND {where}
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"""
    ).format(where=where)
    with conn.cursor(row_factory=dict_row) as cur:
        return [json_row(r) for r in cur.execute(query, [start, end, *params])]


def latest_budgets(conn: Conn, projects: Projects) -> list[dict[str, Any]]:
    """The latest figure of every project budget: amount, spend so far and the period-end forecast."""
    where, params = _project_filter(projects)
    query = sql.SQL(
        """SELECT DISTINCT ON (project, budget) project, budget, period_start, period_end, budget_eur,
                  spent_eur, forecast_eur, currency
             FROM budgets WHERE {where}
            ORDER BY project, budget, period_start DESC, updated_at DESC"""
    ).format(where=where)
    with conn.cursor(row_factory=dict_row) as cur:
        return [json_row(r) for r in cur.execute(query, params)]


# Whole GPUs only: a MIG instance's series carries a mig_instance label (labels whose value is null are
# left out of a series), and its cost is its parent's.
_WHOLE_GPU = "NOT {alias}.labels ? 'mig_instance'"


def gpu_hours(conn: Conn, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Every whole GPU with hourly rollups in [start, end): its hours (bucket starts, oldest first) with
    the mean utilization and mean memory in use (percent of the total) of each, from the hour tier of
    gpu_utilization_percent and gpu_memory_utilization_percent (kept 7 days, D2). One row per GPU."""
    query = sql.SQL(
        """SELECT u.labels->>'host' AS host, u.labels->>'gpu' AS gpu, u.labels->>'gpu_uuid' AS gpu_uuid,
                  u.labels->>'gpu_model' AS gpu_model,
                  array_agg(u.bucket_start ORDER BY u.bucket_start) AS hours,
                  array_agg(u.avg ORDER BY u.bucket_start) AS utilization_percent,
                  array_agg(m.avg ORDER BY u.bucket_start) AS memory_percent
             FROM rollups u
             LEFT JOIN rollups m
               ON m.metric = 'gpu_memory_utilization_percent' AND m.tier = 'hour'
              AND m.bucket_start = u.bucket_start AND m.labels = u.labels
            WHERE u.metric = 'gpu_utilization_percent' AND u.tier = 'hour'
              AND u.bucket_start >= %s AND u.bucket_end <= %s AND {whole}
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3"""
    ).format(whole=sql.SQL(_WHOLE_GPU.format(alias="u")))
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, [start, end]))


def host_prices(conn: Conn, price_since: datetime, end: datetime) -> dict[str, dict[str, Any]]:
    """Per host, the provider, pricing and GPU model its latest started job named (the job events say
    what a host is; GPU samples do not), with the mean estimated cost per GPU hour of that provider,
    model and pricing in the hourly cost figures of [price_since, end) (null when none were priced)."""
    query = """
        WITH hosts AS (
            SELECT DISTINCT ON (host) host, provider, pricing, gpu_model
              FROM job_events WHERE event = 'started' AND host IS NOT NULL AND time < %s
             ORDER BY host, time DESC),
        prices AS (
            SELECT provider, gpu_model, pricing, min(currency) AS currency,
                   sum(cost_estimated_eur) / NULLIF(sum(gpu_hours), 0) AS eur_per_gpu_hour
              FROM costs
             WHERE kind = 'gpu_hours' AND project <> '' AND time >= %s AND time < %s
               AND gpu_hours > 0 AND cost_estimated_eur IS NOT NULL
             GROUP BY 1, 2, 3)
        SELECT h.host, h.provider, h.pricing, p.eur_per_gpu_hour, p.currency
          FROM hosts h
          LEFT JOIN prices p
            ON p.provider = h.provider AND p.gpu_model = h.gpu_model AND p.pricing = h.pricing"""
    with conn.cursor(row_factory=dict_row) as cur:
        return {r["host"]: r for r in cur.execute(query.encode(), [end, price_since, end])}


def job_memory(
    conn: Conn, start: datetime, end: datetime, held_percent: float, projects: Projects
) -> list[dict[str, Any]]:
    """Every job that ran on a host during [start, end) (from its started and ended events), with the
    peak and the highest hourly p95 of memory in use (percent of the total) over the hours it ran on the
    GPUs of its host that someone held then (hourly peak at least ``held_percent``), from the hour tier
    of gpu_memory_utilization_percent.

    Job events name a job's host and GPU count, not its GPUs, so a GPU hour of the host counts for every
    job that ran on the host in that hour: the figure is an upper bound of the job's own use, exact for
    a job alone on its host's held GPUs in its hours. A bound from above never says a batch fits when it
    does not."""
    where, params = _project_filter(projects)
    query = sql.SQL(
        """WITH started AS (
               SELECT DISTINCT ON (job_id) job_id, project, model, host, gpu_count, gpu_model, provider,
                      pricing, time AS started
                 FROM job_events WHERE event = 'started' AND host IS NOT NULL AND time < %s
                ORDER BY job_id, time),
           ended AS (
               SELECT job_id, min(time) AS ended FROM job_events
                WHERE event IN ('finished', 'failed') GROUP BY job_id),
           jobs AS (
               SELECT s.*, e.ended FROM started s LEFT JOIN ended e USING (job_id)
                WHERE coalesce(e.ended, %s) > %s AND {where})
           SELECT j.job_id, j.project, j.model, j.host, j.gpu_count, j.gpu_model, j.provider, j.pricing,
                  j.started, j.ended, count(DISTINCT m.bucket_start) AS hours,
                  count(DISTINCT m.labels->>'gpu_uuid') AS gpus_seen,
                  max(m.max) AS peak_memory_percent, max(m.p95) AS p95_memory_percent
             FROM jobs j
             JOIN rollups m
               ON m.metric = 'gpu_memory_utilization_percent' AND m.tier = 'hour'
              AND m.labels->>'host' = j.host AND {whole}
              AND m.bucket_start < coalesce(j.ended, %s) AND m.bucket_end > j.started
              AND m.bucket_start >= %s - interval '1 hour' AND m.max >= %s
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
            ORDER BY max(m.max), j.job_id"""
    ).format(where=where, whole=sql.SQL(_WHOLE_GPU.format(alias="m")))
    args = [end, end, start, *params, end, start, held_percent]
    with conn.cursor(row_factory=dict_row) as cur:
        return [json_row(r) for r in cur.execute(query, args)]


def throughput(
    conn: Conn, since: datetime, end: datetime, job_model: str | None, projects: Projects
) -> list[dict[str, Any]]:
    """Measured throughput per GPU model: for the jobs that ended in [since, end) (their job_cost
    figures: GPU model and GPU hours, kept without expiry), the frames they processed (the count of
    job_frame_processing_seconds in the day tier of the rollups, kept 30 days) over their GPU seconds.
    ``job_model``: only jobs running that model (the job's ``model`` label); None: every job."""
    where, params = _project_filter(projects)
    query = sql.SQL(
        """WITH frames AS (
               SELECT labels->>'job_id' AS job_id, sum(count)::float8 AS frames
                 FROM rollups
                WHERE metric = 'job_frame_processing_seconds' AND tier = 'day'
                  AND bucket_start >= %s - interval '1 day' AND bucket_start < %s
                  AND (%s::text IS NULL OR labels->>'model' = %s)
                GROUP BY 1),
           jobs AS (
               SELECT c.job_id, min(c.gpu_model) AS gpu_model, sum(c.gpu_hours) AS gpu_hours
                 FROM costs c
                WHERE c.kind = 'job_cost' AND c.period_end >= %s AND c.period_end < %s AND c.gpu_hours > 0
                  AND c.gpu_model <> '' AND {where}
                GROUP BY 1)
           SELECT j.gpu_model, count(*) AS jobs, sum(f.frames) AS frames, sum(j.gpu_hours) AS gpu_hours,
                  sum(f.frames) / (sum(j.gpu_hours) * 3600) AS frames_per_gpu_second
             FROM jobs j JOIN frames f USING (job_id)
            GROUP BY 1 ORDER BY 1"""
    ).format(where=where)
    args = [since, end, job_model, job_model, since, end, *params]
    with conn.cursor(row_factory=dict_row) as cur:
        return [json_row(r) for r in cur.execute(query, args)]
