"""SQL of the recommendations (issue 17): the hourly cost and budget figures of the costs table, the
rollups and job_placements (where each job ran, kept as long as the cost figures: migration 0019), never
the raw samples or job events (kept 24 h)."""

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
    """Per host, the provider, pricing and GPU model its latest job started before ``end`` named
    (job_placements: the job events say what a host is; GPU samples do not), with the mean estimated cost
    per GPU hour of that provider, model and pricing in the hourly cost figures of [price_since, end)
    (null when none were priced)."""
    query = """
        WITH hosts AS (
            SELECT DISTINCT ON (host) host, provider, pricing, gpu_model
              FROM job_placements WHERE started < %s AND host IS NOT NULL
             ORDER BY host, started DESC),
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
    """Every job that ran on a host during [start, end) (job_placements: its start and end), with the
    peak and the highest hourly p95 of memory in use (percent of the total) over the hours it ran on the
    GPUs of its host that someone held then (hourly peak at least ``held_percent``), from the hour tier
    of gpu_memory_utilization_percent.

    Job events name a job's host and GPU count, not its GPUs, so a GPU hour of the host counts for every
    job that ran on the host in that hour: the figure is an upper bound of the job's own use, exact for
    a job alone on its host's held GPUs in its hours. A bound from above never says a batch fits when it
    does not."""
    where, params = _project_filter(projects)
    query = sql.SQL(
        """WITH jobs AS (
               SELECT job_id, project, model, host, gpu_count, gpu_model, provider, pricing, started, ended
                 FROM job_placements
                WHERE started < %s AND coalesce(ended, %s) > %s AND {where})
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


def job_frame_hours(conn: Conn, since: datetime, end: datetime, projects: Projects) -> list[dict[str, Any]]:
    """Every job that ran during [since, end) (job_placements: with its host and, where its events named
    them, its GPUs) with the frames it processed in each whole hour it ran (started at or before the
    hour's start, not ended before its end), oldest first: the count of job_frame_processing_seconds in
    the hour tier of the rollups (kept 7 days), which is per hour of event time, so a whole hour's count
    over 3,600 s is the job's frames/s in that hour. Partial hours (the job's first and last) are left
    out: their count says how long the job ran, not how fast."""
    where, params = _project_filter(projects)
    query = sql.SQL(
        """SELECT j.job_id, j.project, j.model, j.host, j.gpu_count, j.gpu_model, j.gpu_uuids, j.started,
                  j.ended, array_agg(r.bucket_start ORDER BY r.bucket_start) AS hours,
                  array_agg(r.count ORDER BY r.bucket_start) AS frames
             FROM job_placements j
             JOIN rollups r
               ON r.metric = 'job_frame_processing_seconds' AND r.tier = 'hour'
              AND r.labels->>'job_id' = j.job_id
              AND r.bucket_start >= j.started AND r.bucket_end <= coalesce(j.ended, %s)
              AND r.bucket_start >= %s AND r.bucket_end <= %s
            WHERE j.started < %s AND coalesce(j.ended, %s) > %s AND {where}
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
            ORDER BY 1"""
    ).format(where=where)
    args = [end, since, end, end, end, since, *params]
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, args))


def gpu_metric_hours(
    conn: Conn, hosts: list[str], since: datetime, end: datetime, metrics: list[str]
) -> list[dict[str, Any]]:
    """The hourly mean of each of ``metrics`` of every whole GPU of ``hosts`` in [since, end), from the
    hour tier of the rollups: one row per GPU, metric and hour."""
    query = sql.SQL(
        """SELECT r.labels->>'host' AS host, r.labels->>'gpu' AS gpu, r.labels->>'gpu_uuid' AS gpu_uuid,
                  r.metric, r.bucket_start, r.avg
             FROM rollups r
            WHERE r.metric = ANY(%s) AND r.tier = 'hour' AND r.bucket_start >= %s AND r.bucket_end <= %s
              AND r.labels->>'host' = ANY(%s) AND {whole}
            ORDER BY 1, 3, 4, 5"""
    ).format(whole=sql.SQL(_WHOLE_GPU.format(alias="r")))
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, [metrics, since, end, hosts]))
