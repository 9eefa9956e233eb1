"""The queries behind the web console's fleet and job views (api/routes/fleet.py, api/routes/jobs.py): the
latest state of every GPU seen lately, the fleet's mean utilization per host and minute, the recent jobs,
and one job's events, timings, cost and the GPUs of its hosts while it ran. Rows come back JSON-ready (the
conversions of api.sql)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from api.sql import Conn, Page, Projects, fetch_page, json_row

__all__ = ["fleet", "fleet_history", "job", "jobs"]

MAX_GPUS = 10_000
"""A bound on the fleet view's rows, so that a misbehaving producer cannot make the page unbounded."""


def _latest(column: str) -> str:
    return f"(array_agg({column} ORDER BY time DESC) FILTER (WHERE {column} IS NOT NULL))[1] AS {column}"


def fleet(conn: Conn, since: datetime, idle_below: float) -> list[dict[str, Any]]:
    """Every GPU (and MIG instance) with a sample since ``since``: its latest utilization, memory,
    temperature and power, by host; ``idle`` when its latest utilization is below ``idle_below``."""
    columns = ", ".join(
        _latest(c)
        for c in (
            "utilization_percent",
            "memory_used_bytes",
            "memory_total_bytes",
            "temperature_celsius",
            "power_watts",
        )
    )
    query = f"""
        SELECT host, gpu_uuid, NULLIF(mig_instance, '') AS mig_instance, min(gpu) AS gpu,
               min(gpu_model) AS gpu_model, max(time) AS last_seen, {columns}
          FROM gpu_samples WHERE time >= %s
         GROUP BY host, gpu_uuid, mig_instance ORDER BY host, min(gpu), gpu_uuid, mig_instance LIMIT %s"""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query.encode(), (since, MAX_GPUS))
        rows = [json_row(r) for r in cur.fetchall()]
    for row in rows:
        util = row["utilization_percent"]
        row["idle"] = util is not None and util < idle_below
    return rows


def fleet_history(conn: Conn, since: datetime) -> list[dict[str, Any]]:
    """Mean GPU utilization per host and minute since ``since``, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT date_trunc('minute', time) AS minute, host,
                      avg(utilization_percent) AS utilization_percent
                 FROM gpu_samples
                WHERE time >= %s AND utilization_percent IS NOT NULL AND mig_instance = ''
                GROUP BY 1, 2 ORDER BY 1, 2 LIMIT %s""",
            (since, MAX_GPUS),
        )
        return [json_row(r) for r in cur.fetchall()]


def jobs(
    conn: Conn, start: datetime, end: datetime, limit: int, *, project: str | None, projects: Projects
) -> Page:
    """Jobs with an event in [start, end), by their latest event, newest first."""
    conditions, params = ["time >= %s", "time < %s"], [start, end]
    if project is not None:
        conditions.append("project = %s")
        params.append(project)
    if projects is not None:
        conditions.append("project = ANY(%s)")
        params.append(list(projects))
    query = f"""
        SELECT job_id, min(project) AS project, min(time) AS first_event, max(time) AS last_event,
               (array_agg(event ORDER BY time DESC))[1] AS state, max(host) AS host
          FROM job_events WHERE {" AND ".join(conditions)}
         GROUP BY job_id ORDER BY max(time) DESC, job_id LIMIT %s"""
    with conn.cursor(row_factory=dict_row) as cur:
        return fetch_page(cur, query.encode(), params, limit)  # type: ignore[arg-type]


def job(conn: Conn, job_id: str, now: datetime) -> dict[str, Any] | None:
    """One job: its events, timings per kind and kernel, cost, and per minute the utilization, memory and
    temperature of each GPU of its hosts from its first event to its end (or ``now``); None when it has
    no event."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT time, event, project, host, gpu_count, gpu_model, provider, pricing, model,
                      media_minutes, queue_wait_seconds, error
                 FROM job_events WHERE job_id = %s ORDER BY time LIMIT 100""",
            (job_id,),
        )
        events = cur.fetchall()
        if not events:
            return None
        cur.execute(
            """SELECT kind, NULLIF(kernel, '') AS kernel, sum(count)::bigint AS count,
                      sum(sum_seconds) AS total_seconds,
                      sum(sum_seconds) / NULLIF(sum(count), 0) AS mean_seconds,
                      min(min_seconds) AS min_seconds, max(max_seconds) AS max_seconds,
                      array_remove(array_agg(DISTINCT NULLIF(host, '')), NULL) AS hosts
                 FROM job_timings WHERE job_id = %s GROUP BY kind, kernel ORDER BY kind, kernel""",
            (job_id,),
        )
        timings = cur.fetchall()
        cur.execute(
            """SELECT sum(job_cost_eur) AS cost_eur, max(job_cost_per_media_minute_eur)
                      AS cost_per_media_minute_eur, min(currency) AS currency
                 FROM costs WHERE kind = 'job_cost' AND job_id = %s""",
            (job_id,),
        )
        cost = cur.fetchone()
        hosts = sorted(
            {e["host"] for e in events if e["host"]} | {h for t in timings for h in t.pop("hosts") or []}
        )
        start = events[0]["time"]
        ended = next((e["time"] for e in events if e["event"] in ("finished", "failed")), None)
        gpus: list[dict[str, Any]] = []
        if hosts:
            cur.execute(
                """SELECT date_trunc('minute', time) AS minute, host, gpu_uuid,
                          avg(utilization_percent) AS utilization_percent,
                          max(memory_used_bytes) AS memory_used_bytes,
                          max(temperature_celsius) AS temperature_celsius
                     FROM gpu_samples WHERE host = ANY(%s) AND time >= %s AND time <= %s
                    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT 5000""",
                (hosts, start, ended or now),
            )
            gpus = cur.fetchall()
    started = next((e["time"] for e in events if e["event"] == "started"), None)
    return {
        "job_id": job_id,
        "project": events[0]["project"],
        "state": events[-1]["event"],
        "queued": json_row({"t": events[0]["time"]})["t"] if events[0]["event"] == "queued" else None,
        "started": json_row({"t": started})["t"],
        "ended": json_row({"t": ended})["t"],
        "duration_seconds": ((ended or now) - started).total_seconds() if started else None,
        "hosts": hosts,
        "events": [json_row(e) for e in events],
        "timings": [json_row(t) for t in timings],
        "cost": json_row(cost) if cost is not None and cost["cost_eur"] is not None else None,
        "gpu_use": [json_row(g) for g in gpus],
    }
