"""Metric data (A1): the catalogue, raw samples and aggregated buckets of any catalogue metric."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from api import audit, params, sql
from api.auth import Auth, Principal
from api.deps import Conn
from api.errors import error_responses
from api.models import AggregatedResponse, CatalogueResponse, RawResponse
from api.responses import ApiJSON
from api.routes.common import EndTime, Labels, Limit, StartTime
from bus import catalogue
from bus.catalogue import Metric

router = APIRouter(tags=["metrics"])

MetricName = Annotated[str, Path(max_length=200, description="a metric of the catalogue (GET /metrics)")]
Interval = Annotated[
    str,
    Query(max_length=20, description="1h, 1d, 1mo, 1y (rollups) or a duration under a day such as 5m"),
]


@router.get("/metrics", response_model=CatalogueResponse, responses=error_responses(401))
def list_metrics(principal: Auth) -> dict[str, Any]:
    """Every metric of the catalogue, with whether this token may read it."""
    return {
        "metrics": [
            {
                "name": m.name,
                "unit": m.unit,
                "type": m.type,
                "interval": m.interval,
                "labels": list(m.labels),
                "description": m.description,
                "requirement": m.req_id,
                "source": m.source,
                "readable": principal.can_read(m),
            }
            for m in catalogue.METRICS
        ]
    }


def _readable(
    request: Request, principal: Principal, name: str, labels: str | None
) -> tuple[Metric, dict[str, str]]:
    audit.note(request, metric=name[:200])
    metric = params.metric(name)
    principal.require_metric(metric)
    selector = params.label_selector(labels, metric.labels)
    principal.require_project(selector.get("project"))
    return metric, selector


@router.get(
    "/metrics/raw/{metric_name}",
    responses={200: {"model": RawResponse}, **error_responses(400, 401, 403, 404, 422)},
)
def raw(
    request: Request,
    principal: Auth,
    conn: Conn,
    metric_name: MetricName,
    start_time: StartTime = None,
    end_time: EndTime = None,
    labels: Labels = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """Raw samples in [start_time, end_time) (default: the last hour), oldest first, at most `limit`."""
    metric, selector = _readable(request, principal, metric_name, labels)
    span = params.time_range(start_time, end_time)
    projects = principal.projects if principal.restricted else None
    page = sql.raw_samples(conn, metric, span.start, span.end, selector, limit, projects)
    audit.note(request, rows=len(page.rows))
    return ApiJSON(
        {
            "metric": metric.name,
            "unit": metric.unit,
            **span.to_json(),
            "labels": selector,
            "limit": limit,
            "truncated": page.truncated,
            "samples": page.rows,
        }
    )


@router.get(
    "/metrics/aggregated/{metric_name}",
    responses={200: {"model": AggregatedResponse}, **error_responses(400, 401, 403, 404, 422)},
)
def aggregated(
    request: Request,
    principal: Auth,
    conn: Conn,
    metric_name: MetricName,
    interval: Interval = "1h",
    start_time: StartTime = None,
    end_time: EndTime = None,
    labels: Labels = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """min, max, avg, p95 and count per bucket and series. 1h, 1d, 1mo and 1y buckets are the stored
    rollups (those overlapping the range), except for the cost processor's metrics (gpu_hours, costs,
    budgets), whose stored figures are aggregated per calendar bucket (``source: costs``), and the
    per-process metrics, never rolled up, whose raw samples are (``source: raw``); shorter intervals
    are computed from the raw samples in the range, in buckets aligned to multiples of the interval since
    2000-01-01 UTC."""
    metric, selector = _readable(request, principal, metric_name, labels)
    step = params.parse_interval(interval)
    span = params.time_range(start_time, end_time)
    projects = principal.projects if principal.restricted else None
    if step.tier is not None and metric.source == "cost_processor":
        source = "costs"  # one figure per period, upserted: aggregated as stored, not rolled up again
        page = sql.aggregate_calendar(
            conn, metric, step.tier, span.start, span.end, selector, limit, projects
        )
    elif step.tier is not None and metric.per_process:
        source = "raw"  # never rolled up (a series per pid): calendar buckets of the raw rows kept
        page = sql.aggregate_calendar(
            conn, metric, step.tier, span.start, span.end, selector, limit, projects
        )
    elif step.tier is not None:
        source = "rollups"
        page = sql.aggregate_rollups(conn, metric, step.tier, span.start, span.end, selector, limit, projects)
    else:
        assert step.step is not None
        source = "raw"
        page = sql.aggregate_raw(conn, metric, span.start, span.end, selector, step.step, limit, projects)
    audit.note(request, rows=len(page.rows))
    return ApiJSON(
        {
            "metric": metric.name,
            "unit": metric.unit,
            "interval": step.text,
            "source": source,
            **span.to_json(),
            "labels": selector,
            "limit": limit,
            "truncated": page.truncated,
            "buckets": page.rows,
        }
    )
