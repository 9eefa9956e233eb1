"""SQL of the recommendations (issue 17): read only the hourly cost figures and budget figures of the
costs table, which are kept without expiry, never the raw samples (kept 24 h)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from api.sql import Conn, Projects, _row


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
        return [_row(r) for r in cur.execute(query, [start, end, *params])]


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
        return [_row(r) for r in cur.execute(query, params)]
