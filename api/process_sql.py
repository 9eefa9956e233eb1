"""The API's reads of per-process GPU memory (``gpu_process_samples``, migration 0017) and the one rule that
limits them for a user token: a process row is visible when, at its time, jobs of the token's projects
held its host and no other project's job did.

Why the host: job events (``job_events``) name the host a job runs on, not which of its GPUs, so a host
where another project's job also ran may show that project's processes (names and pids can reveal another
team's work), and is left to admins. A job counts as holding the host from its ``started`` event to its
``finished`` or ``failed`` one; job events are kept as long as the raw samples (24 h), so a job that
started longer ago than that no longer shows to its users (admins see every row).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

__all__ = ["held_by_projects_only", "latest_processes"]

# A job running on the row's host at the row's time (alias s, a 'started' event): started there at or
# before it, and not finished or failed by then.
_RUNNING_ON_HOST = """s.event = 'started' AND s.host = {host} AND s.time <= {time}
                  AND NOT EXISTS (SELECT 1 FROM job_events e
                                   WHERE e.job_id = s.job_id AND e.event IN ('finished', 'failed')
                                     AND e.time <= {time})"""


def _running_on_host(relation: str) -> sql.Composable:
    return sql.SQL(_RUNNING_ON_HOST).format(
        host=sql.Identifier(relation, "host"), time=sql.Identifier(relation, "time")
    )


def held_by_projects_only(relation: str) -> sql.Composable:
    """The condition (on the columns ``host`` and ``time`` of ``relation``, a table, view or alias in the
    query's FROM) that the row's host was held, at the row's time, by jobs of some projects and of no
    other project. Its parameters: the projects (a list), twice."""
    running = _running_on_host(relation)
    return sql.SQL(
        "EXISTS (SELECT 1 FROM job_events s WHERE {running} AND s.project = ANY(%s)) "
        "AND NOT EXISTS (SELECT 1 FROM job_events s WHERE {running} AND s.project <> ALL(%s))"
    ).format(running=running)


def latest_processes(
    conn: psycopg.Connection[Any],
    start: datetime,
    end: datetime,
    limit: int,
    *,
    gpu_uuid: str | None = None,
    host: str | None = None,
    projects: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """The latest row in [start, end) of every process on every GPU (or MIG instance), optionally of one
    GPU or host, with the jobs that ran on its host at that time (``jobs``: job_id and project, []
    when none is known). ``projects``: a user token's, whose rows are only those its projects' jobs held
    alone (:func:`held_by_projects_only`); None: every row. Ordered by host, GPU and memory (largest
    first); returns (rows, whether more than ``limit`` matched)."""
    conditions: list[sql.Composable] = [sql.SQL("p.time >= %s"), sql.SQL("p.time < %s")]
    params: list[Any] = [start, end]
    if gpu_uuid is not None:
        conditions.append(sql.SQL("p.gpu_uuid = %s"))
        params.append(gpu_uuid)
    if host is not None:
        conditions.append(sql.SQL("p.host = %s"))
        params.append(host)
    if projects is not None:
        # Before DISTINCT ON: a token sees the latest row it may see, not nothing when the latest is not.
        conditions.append(held_by_projects_only("p"))
        params += [list(projects)] * 2
    jobs = sql.SQL(
        "SELECT jsonb_agg(DISTINCT jsonb_build_object('job_id', s.job_id, 'project', s.project)) "
        "FROM job_events s WHERE {running}"
    ).format(running=_running_on_host("l"))
    query = sql.SQL(
        """SELECT l.time, l.host, l.gpu, l.gpu_uuid, l.gpu_model, NULLIF(l.mig_instance, '') AS mig_instance,
                  l.pid, l.process_name, l.used_memory_bytes, coalesce(({jobs}), '[]'::jsonb) AS jobs
             FROM (SELECT DISTINCT ON (p.host, p.gpu_uuid, p.mig_instance, p.pid) p.*
                     FROM gpu_process_samples p
                    WHERE {where}
                    ORDER BY p.host, p.gpu_uuid, p.mig_instance, p.pid, p.time DESC) l
            ORDER BY l.host, l.gpu, l.gpu_uuid, l.mig_instance, l.used_memory_bytes DESC NULLS LAST, l.pid
            LIMIT %s"""
    ).format(jobs=jobs, where=sql.SQL(" AND ").join(conditions))
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, [*params, limit + 1])
        rows = cur.fetchall()
    for row in rows:
        row["time"] = row["time"].astimezone(UTC).isoformat()
    return rows[:limit], len(rows) > limit
