"""Every query of the API's read side, in one place (silences are stored and read through bus/silences.py,
as the notifier does). User input only ever travels as a query parameter; identifiers (view and label
column names) come from the metric catalogue.

Data lives where the migrations put it (consumers/migrations): raw samples are read through the metric
views (one per catalogue metric: ``time``, ``value``, one text column per label), rollups from ``rollups``,
costs from ``costs`` and the ``budgets`` view, alerts from ``alert_history``, the audit trail from
``audit_log``.
Rows come back as plain dicts ready for JSON: times in ISO 8601, non-finite numbers as null."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from api.process_sql import held_by_projects_only
from bus.catalogue import Metric
from bus.tiers import Tier, bucket_end, from_ms, to_ms

__all__ = [
    "Conn",
    "Page",
    "Projects",
    "aggregate_calendar",
    "aggregate_raw",
    "aggregate_rollups",
    "alert_history",
    "audit_trail",
    "budgets",
    "costs",
    "current_alerts",
    "fetch_page",
    "json_row",
    "raw_samples",
]

Conn = psycopg.Connection[Any]
Projects = Sequence[str] | None
"""The projects a restricted token may see; None: unrestricted."""
BIN_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
"""Buckets computed from raw samples are aligned to multiples of the interval since this moment."""
# The jobs of some projects, for metrics labelled with a job but not its project (its one parameter, the
# projects, is passed three times).
_JOBS_OF_PROJECTS = sql.SQL(
    """(SELECT job_id FROM job_timings WHERE project = ANY(%s)
        UNION SELECT job_id FROM job_events WHERE project = ANY(%s)
        UNION SELECT job_id FROM costs WHERE kind = 'job_cost' AND project = ANY(%s))"""
)


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    truncated: bool
    """More rows matched than the limit let through."""


def _json(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A database row ready for JSON (times in ISO 8601, non-finite numbers null, UUIDs as text): the one
    conversion every query of the API's read side (here, api/console_sql.py, api/recommend_sql.py) uses."""
    return {key: _json(value) for key, value in row.items()}


def fetch_page(cur: psycopg.Cursor[Any], query: sql.Composable, params: Sequence[Any], limit: int) -> Page:
    """Run ``query`` (its last parameter is the limit) for one row more than ``limit``, to tell whether
    more matched."""
    cur.execute(query, [*params, limit + 1])
    rows = cur.fetchall()
    return Page([json_row(r) for r in rows[:limit]], len(rows) > limit)


# -- metrics --------------------------------------------------------------------------------------------


def _columns(*first: str, metric: Metric) -> sql.Composable:
    """``first, ..., <every label column of the metric>``."""
    return sql.SQL(", ").join(sql.Identifier(name) for name in (*first, *metric.labels))


LabelExpression = Callable[[str], tuple[sql.Composable, list[Any]]]


def _label_filters(
    metric: Metric, labels: Mapping[str, str], projects: Projects, label: LabelExpression
) -> tuple[list[sql.Composable], list[Any]]:
    """Conditions for label equality (an empty value asks for a missing label) and, for a user token, its
    projects. ``label(name)`` is the SQL expression of a label with its own parameters: a view column, or
    a key of the rollups' jsonb labels."""
    conditions: list[sql.Composable] = []
    params: list[Any] = []

    def add(name: str, test: sql.Composable, values: list[Any]) -> None:
        expression, expression_params = label(name)
        conditions.append(expression + test)
        params.extend([*expression_params, *values])

    for name, value in labels.items():
        if value == "":
            add(name, sql.SQL(" IS NULL"), [])
        else:
            add(name, sql.SQL(" = %s"), [value])
    if projects is not None:
        if "project" in metric.labels:
            add("project", sql.SQL(" = ANY(%s)"), [list(projects)])
        elif "job_id" in metric.labels:
            add("job_id", sql.SQL(" IN ") + _JOBS_OF_PROJECTS, [list(projects)] * 3)
    return conditions, params


def _rollup_label(name: str) -> tuple[sql.Composable, list[Any]]:
    return sql.SQL("labels ->> %s"), [name]


def _view_filters(
    metric: Metric, start: datetime, end: datetime, labels: Mapping[str, str], projects: Projects
) -> tuple[sql.Composable, list[Any]]:
    conditions: list[sql.Composable] = [sql.SQL("time >= %s"), sql.SQL("time < %s")]
    params: list[Any] = [start, end]
    more, more_params = _label_filters(metric, labels, projects, lambda name: (sql.Identifier(name), []))
    conditions += more
    params += more_params
    if projects is not None and metric.per_process:
        conditions.append(held_by_projects_only(metric.name))
        params += [list(projects)] * 2
    return sql.SQL(" AND ").join(conditions), params


def raw_samples(
    conn: Conn,
    metric: Metric,
    start: datetime,
    end: datetime,
    labels: Mapping[str, str],
    limit: int,
    projects: Projects = None,
) -> Page:
    """Samples in [start, end) in time order: {"time", "value", "labels"}."""
    where, params = _view_filters(metric, start, end, labels, projects)
    query = sql.SQL("SELECT {cols} FROM {view} WHERE {where} ORDER BY {order} LIMIT %s").format(
        cols=_columns("time", "value", metric=metric),
        view=sql.Identifier(metric.name),
        where=where,
        order=_columns("time", metric=metric),
    )
    with conn.cursor(row_factory=dict_row) as cur:
        page = fetch_page(cur, query, params, limit)
    return Page([_sample(row, metric) for row in page.rows], page.truncated)


def _sample(row: dict[str, Any], metric: Metric) -> dict[str, Any]:
    labels = {name: row.pop(name) for name in metric.labels}
    row["labels"] = {k: v for k, v in labels.items() if v is not None}
    return row


def aggregate_raw(
    conn: Conn,
    metric: Metric,
    start: datetime,
    end: datetime,
    labels: Mapping[str, str],
    step: timedelta,
    limit: int,
    projects: Projects = None,
) -> Page:
    """Buckets of ``step`` (aligned to :data:`BIN_ORIGIN`) per series, from the raw samples in [start,
    end): min, max, avg, p95 (continuous percentile) and count."""
    bucket = sql.SQL("date_bin(%s, time, %s)")
    return _aggregate_view(
        conn, metric, (bucket, [step, BIN_ORIGIN]), lambda s: s + step, start, end, labels, limit, projects
    )


def aggregate_calendar(
    conn: Conn,
    metric: Metric,
    tier: Tier,
    start: datetime,
    end: datetime,
    labels: Mapping[str, str],
    limit: int,
    projects: Projects = None,
) -> Page:
    """Calendar buckets (hour, day, month, year, in UTC) per series, from the metric's view. For the cost
    processor's metrics: each of their records is the latest figure of one period (an upsert), which
    the rollups do not carry, so their aggregates come from the stored figures themselves."""
    bucket = sql.SQL("date_trunc(%s, time, 'UTC')")
    return _aggregate_view(
        conn, metric, (bucket, [tier]), lambda s: _next_bucket(tier, s), start, end, labels, limit, projects
    )


def _next_bucket(tier: Tier, start: datetime) -> datetime:
    return from_ms(bucket_end(tier, to_ms(start)))


def _aggregate_view(
    conn: Conn,
    metric: Metric,
    bucket: tuple[sql.Composable, list[Any]],
    bucket_end: Callable[[datetime], datetime],
    start: datetime,
    end: datetime,
    labels: Mapping[str, str],
    limit: int,
    projects: Projects,
) -> Page:
    where, params = _view_filters(metric, start, end, labels, projects)
    series = _columns("bucket_start", metric=metric)
    expression, bucket_params = bucket
    query = sql.SQL(
        """SELECT {bucket} AS bucket_start, {labels}
                  min(value) AS min, max(value) AS max, avg(value) AS avg,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY value) AS p95, count(*) AS count
             FROM {view} WHERE {where}
            GROUP BY {series} ORDER BY {series} LIMIT %s"""
    ).format(
        bucket=expression,
        labels=sql.SQL("").join(sql.Identifier(n) + sql.SQL(", ") for n in metric.labels),
        view=sql.Identifier(metric.name),
        where=where,
        series=series,
    )
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, [*bucket_params, *params, limit + 1])
        rows = cur.fetchall()
    buckets = []
    for row in rows[:limit]:
        labels_of = {name: row.pop(name) for name in metric.labels}
        row["bucket_end"] = bucket_end(row["bucket_start"])
        row["labels"] = {k: v for k, v in labels_of.items() if v is not None}
        buckets.append(json_row(row))
    return Page(buckets, len(rows) > limit)


def aggregate_rollups(
    conn: Conn,
    metric: Metric,
    tier: str,
    start: datetime,
    end: datetime,
    labels: Mapping[str, str],
    limit: int,
    projects: Projects = None,
) -> Page:
    """The stored rollup buckets of one tier that overlap [start, end), per series."""
    conditions: list[sql.Composable] = [
        sql.SQL("metric = %s"),
        sql.SQL("tier = %s"),
        sql.SQL("bucket_end > %s"),
        sql.SQL("bucket_start < %s"),
    ]
    params: list[Any] = [metric.name, tier, start, end]
    more, more_params = _label_filters(metric, labels, projects, _rollup_label)
    conditions += more
    params += more_params
    query = sql.SQL(
        """SELECT bucket_start, bucket_end, labels, min, max, avg, p95, count, final
             FROM rollups WHERE {where} ORDER BY bucket_start, series LIMIT %s"""
    ).format(where=sql.SQL(" AND ").join(conditions))
    with conn.cursor(row_factory=dict_row) as cur:
        return fetch_page(cur, query, params, limit)


# -- costs and budgets ----------------------------------------------------------------------------------

CostGroup = Literal["project", "user", "service", "provider", "gpu_model", "pricing", "job"]
Period = Literal["hour", "day", "week", "month", "year", "total"]
_GPU_HOUR_GROUPS = {"project", "provider", "gpu_model", "pricing"}
_JOB_GROUPS = {"user": "j.user_pseudonym", "service": "j.service", "job": "NULLIF(c.job_id, '')"}


def costs(
    conn: Conn,
    group_by: CostGroup,
    period: Period,
    start: datetime,
    end: datetime,
    limit: int,
    *,
    project: str | None = None,
    projects: Projects = None,
) -> tuple[str, Page]:
    """Cost per ``group_by`` and period. Project, provider, GPU model and pricing come from the hourly
    GPU-hour figures (estimated cost and GPU hours); user, service and job from the per-job costs, joined
    to the job's events for its user (pseudonymised) and service. Returns (the kind of cost figure used,
    the rows)."""
    bucket = (
        sql.SQL("NULL::timestamptz")
        if period == "total"
        else sql.SQL("date_trunc({}, c.time, 'UTC')").format(sql.Literal(period))
    )
    conditions: list[sql.Composable] = [sql.SQL("c.time >= %s"), sql.SQL("c.time < %s")]
    params: list[Any] = [start, end]
    if project is not None:
        conditions.append(sql.SQL("c.project = %s"))
        params.append(project)
    if projects is not None:
        conditions.append(sql.SQL("c.project = ANY(%s)"))
        params.append(list(projects))
    where = sql.SQL(" AND ").join(conditions)
    if group_by in _GPU_HOUR_GROUPS:
        kind = "gpu_hours"
        # Energy beside the GPU-hour cost: each project's share from the energy_costs view (migration
        # 0016); the energy no project held falls in the group of no project (project null), like the
        # fleet's idle hours. Both sides are grouped alike, then matched (null matching null).
        query = sql.SQL(
            """WITH hours AS (
                   SELECT {bucket} AS period_start, NULLIF(c.{g}, '') AS {g},
                          sum(c.cost_estimated_eur) AS cost_eur, sum(c.gpu_hours) AS gpu_hours,
                          min(c.currency) AS currency
                     FROM costs c WHERE c.kind = 'gpu_hours' AND {where}
                    GROUP BY 1, 2),
               energy AS (
                   SELECT {bucket} AS period_start, NULLIF(c.{g}, '') AS {g},
                          sum(c.energy_kwh) AS energy_kwh, sum(c.energy_cost_eur) AS energy_cost_eur
                     FROM energy_costs c WHERE {where}
                    GROUP BY 1, 2)
               SELECT h.period_start, h.{g}, h.cost_eur, h.gpu_hours, e.energy_kwh, e.energy_cost_eur,
                      h.currency
                 FROM hours h
                 LEFT JOIN energy e ON e.period_start IS NOT DISTINCT FROM h.period_start
                                   AND e.{g} IS NOT DISTINCT FROM h.{g}
                ORDER BY 1, 2 LIMIT %s"""
        ).format(bucket=bucket, g=sql.Identifier(group_by), where=where)
        params = params + params
    else:
        kind = "job_cost"
        query = sql.SQL(
            """SELECT {bucket} AS period_start, {key} AS {g},
                      sum(c.job_cost_eur) AS cost_eur, count(*) AS jobs, min(c.currency) AS currency
                 FROM costs c
                 LEFT JOIN LATERAL (
                      SELECT e.user_pseudonym, e.service FROM job_events e
                       WHERE e.job_id = c.job_id AND (e.user_pseudonym IS NOT NULL OR e.service IS NOT NULL)
                       ORDER BY e.time LIMIT 1) j ON true
                WHERE c.kind = 'job_cost' AND {where}
                GROUP BY 1, 2 ORDER BY 1, 2 LIMIT %s"""
        ).format(bucket=bucket, key=sql.SQL(_JOB_GROUPS[group_by]), g=sql.Identifier(group_by), where=where)
    with conn.cursor(row_factory=dict_row) as cur:
        page = fetch_page(cur, query, params, limit)
    if period == "total":
        for row in page.rows:
            row["period_start"] = start.isoformat()
    return kind, page


def gpu_energy(
    conn: Conn,
    period: Period,
    start: datetime,
    end: datetime,
    limit: int,
    *,
    gpu_model: str | None = None,
    gpu_uuid: str | None = None,
) -> Page:
    """Each GPU's energy (kWh), its cost at the tariff (EUR) and the hours it was seen, per GPU and period,
    from the gpu_energy rows (migration 0018) whose hour starts in [start, end). energy_kwh sums the hours
    that told it (null when none did); hours_with_energy says how many did."""
    bucket = (
        sql.SQL("NULL::timestamptz")
        if period == "total"
        else sql.SQL("date_trunc({}, g.time, 'UTC')").format(sql.Literal(period))
    )
    conditions: list[sql.Composable] = [sql.SQL("g.time >= %s"), sql.SQL("g.time < %s")]
    params: list[Any] = [start, end]
    for column, value in (("gpu_model", gpu_model), ("gpu_uuid", gpu_uuid)):
        if value is not None:
            conditions.append(sql.SQL("g.{} = %s").format(sql.Identifier(column)))
            params.append(value)
    query = sql.SQL(
        """SELECT {bucket} AS period_start, g.gpu_uuid, min(g.gpu_model) AS gpu_model,
                  sum(g.device_hours) AS device_hours, sum(g.energy_kwh) AS energy_kwh,
                  sum(g.energy_cost_eur) AS energy_cost_eur, count(g.energy_kwh) AS hours_with_energy,
                  min(g.currency) AS currency
             FROM gpu_energy g WHERE {where}
            GROUP BY 1, 2 ORDER BY 1, 2 LIMIT %s"""
    ).format(bucket=bucket, where=sql.SQL(" AND ").join(conditions))
    with conn.cursor(row_factory=dict_row) as cur:
        page = fetch_page(cur, query, params, limit)
    if period == "total":
        for row in page.rows:
            row["period_start"] = start.isoformat()
    return page


def budgets(
    conn: Conn,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    *,
    project: str | None = None,
    budget: str | None = None,
    projects: Projects = None,
) -> Page:
    """The latest figure of every project budget, or (given a range) every period overlapping it."""
    conditions: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    if project is not None:
        conditions.append(sql.SQL("project = %s"))
        params.append(project)
    if budget is not None:
        conditions.append(sql.SQL("budget = %s"))
        params.append(budget)
    if projects is not None:
        conditions.append(sql.SQL("project = ANY(%s)"))
        params.append(list(projects))
    columns = sql.SQL(
        "period_start, period_end, project, budget, budget_eur, spent_eur, budget_utilization_percent, "
        "forecast_eur, currency, updated_at"
    )
    if start is None or end is None:
        query = sql.SQL(
            """SELECT DISTINCT ON (project, budget) {cols} FROM budgets WHERE {where}
                ORDER BY project, budget, period_start DESC, updated_at DESC LIMIT %s"""
        )
    else:
        conditions += [sql.SQL("period_end > %s"), sql.SQL("period_start < %s")]
        params += [start, end]
        query = sql.SQL(
            "SELECT {cols} FROM budgets WHERE {where} ORDER BY period_start, project, budget LIMIT %s"
        )
    query = query.format(cols=columns, where=sql.SQL(" AND ").join(conditions))
    with conn.cursor(row_factory=dict_row) as cur:
        return fetch_page(cur, query, params, limit)


# -- alerts ---------------------------------------------------------------------------------------------

_ALERT_COLUMNS = sql.SQL(
    "fingerprint, rule, status, severity, starts_at, ends_at, event_time, value, labels, annotations, "
    "channels, source, received_at"
)


def _alert_filters(
    severity: str | None, rule: str | None, labels: Mapping[str, str]
) -> tuple[list[sql.Composable], list[Any]]:
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    if severity is not None:
        conditions.append(sql.SQL("severity = %s"))
        params.append(severity)
    if rule is not None:
        conditions.append(sql.SQL("rule = %s"))
        params.append(rule)
    present = {k: v for k, v in labels.items() if v != ""}
    if present:
        conditions.append(sql.SQL("labels @> %s"))
        params.append(Jsonb(present))
    for name in (k for k, v in labels.items() if v == ""):
        conditions.append(sql.SQL("labels ->> %s IS NULL"))
        params.append(name)
    return conditions, params


def current_alerts(
    conn: Conn, limit: int, *, severity: str | None = None, rule: str | None = None, labels: Mapping[str, str]
) -> Page:
    """Alerts whose latest state change is ``firing`` (no later ``resolved``), newest first."""
    conditions, params = _alert_filters(severity, rule, labels)
    query = sql.SQL(
        """SELECT {cols} FROM (
               SELECT DISTINCT ON (fingerprint) {cols} FROM alert_history
                ORDER BY fingerprint, event_time DESC, (status = 'resolved') DESC) latest
            WHERE {where} ORDER BY starts_at DESC, fingerprint LIMIT %s"""
    ).format(cols=_ALERT_COLUMNS, where=sql.SQL(" AND ").join([sql.SQL("status = 'firing'"), *conditions]))
    with conn.cursor(row_factory=dict_row) as cur:
        return fetch_page(cur, query, params, limit)


def alert_history(
    conn: Conn,
    start: datetime,
    end: datetime,
    limit: int,
    *,
    severity: str | None = None,
    rule: str | None = None,
    labels: Mapping[str, str],
) -> Page:
    """Every alert state change with its event time in [start, end), newest first."""
    conditions, params = _alert_filters(severity, rule, labels)
    query = sql.SQL(
        "SELECT {cols} FROM alert_history WHERE {where} ORDER BY event_time DESC, fingerprint LIMIT %s"
    ).format(
        cols=_ALERT_COLUMNS,
        where=sql.SQL(" AND ").join([sql.SQL("event_time >= %s"), sql.SQL("event_time < %s"), *conditions]),
    )
    with conn.cursor(row_factory=dict_row) as cur:
        return fetch_page(cur, query, [start, end, *params], limit)


# Rows older than migration 0013 have no outcome: the one mapping from the status, audit_outcome().
_OUTCOME = sql.SQL("coalesce(outcome, audit_outcome(status))")
_AUDIT_COLUMNS = sql.SQL(
    """id, time, action, {outcome} AS outcome, reason, actor, token_id, role, method, endpoint, metric,
       target, parameters, status, row_count, duration_ms, client"""
).format(outcome=_OUTCOME)


def audit_trail(
    conn: Conn,
    limit: int,
    *,
    before_id: int | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    token_id: uuid.UUID | None = None,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
) -> Page:
    """Audit rows newest first by id (the order they were written: rows added meanwhile never shift a later
    page), those with an id below ``before_id`` (the previous page's last), time in [start, end)."""
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    for condition, value in (
        (sql.SQL("id < %s"), before_id),
        (sql.SQL("time >= %s"), start),
        (sql.SQL("time < %s"), end),
        (sql.SQL("token_id = %s"), token_id),
        (sql.SQL("actor = %s"), actor),
        (sql.SQL("action = %s"), action),
        (sql.SQL("{} = %s").format(_OUTCOME), outcome),
    ):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    query = sql.SQL("SELECT {cols} FROM audit_log WHERE {where} ORDER BY id DESC LIMIT %s").format(
        cols=_AUDIT_COLUMNS, where=where
    )
    with conn.cursor(row_factory=dict_row) as cur:
        return fetch_page(cur, query, params, limit)
