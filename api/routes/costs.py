"""Costs and budgets (S2) for finance, admins, and users (their own projects only)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api import audit, params, sql
from api.auth import Auth
from api.deps import Conn
from api.errors import error_responses
from api.models import BudgetsResponse, CostsResponse, GpuEnergyResponse
from api.responses import ApiJSON
from api.routes.common import EndTime, Limit, StartTime

router = APIRouter(tags=["costs"])

Project = Annotated[str | None, Query(max_length=200, description="only this project")]
DEFAULT_COST_RANGE = timedelta(days=30)


@router.get("/costs", responses={200: {"model": CostsResponse}, **error_responses(400, 401, 403, 422)})
def costs(
    request: Request,
    principal: Auth,
    conn: Conn,
    group_by: Annotated[sql.CostGroup, Query(description="what to sum costs by")] = "project",
    period: Annotated[sql.Period, Query(description="bucket per UTC calendar period, or one total")] = "day",
    start_time: StartTime = None,
    end_time: EndTime = None,
    project: Project = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """Costs in [start_time, end_time) (default: the last 30 days) per `group_by` and `period`. By project,
    provider, GPU model or pricing: the hourly estimates (cost_eur, gpu_hours) and beside them the GPUs'
    energy (energy_kwh) and its cost at the catalogue's tariff (energy_cost_eur), a project's share by its
    GPU-hours, the energy no project held in the group of no project; by user, service or job: the costs of
    finished jobs (cost_eur, jobs). A user token sees its own projects only."""
    principal.require_project(project)
    span = params.time_range(start_time, end_time, default=DEFAULT_COST_RANGE)
    projects = principal.projects if principal.restricted else None
    kind, page = sql.costs(
        conn, group_by, period, span.start, span.end, limit, project=project, projects=projects
    )
    audit.note(request, rows=len(page.rows))
    return ApiJSON(
        {
            "group_by": group_by,
            "period": period,
            "source": kind,
            **span.to_json(),
            "truncated": page.truncated,
            "rows": page.rows,
        }
    )


@router.get(
    "/costs/gpus", responses={200: {"model": GpuEnergyResponse}, **error_responses(400, 401, 403, 422)}
)
def gpu_energy(
    request: Request,
    principal: Auth,
    conn: Conn,
    period: Annotated[sql.Period, Query(description="bucket per UTC calendar period, or one total")] = "day",
    start_time: StartTime = None,
    end_time: EndTime = None,
    gpu_model: Annotated[str | None, Query(max_length=200, description="only GPUs of this model")] = None,
    gpu_uuid: Annotated[str | None, Query(max_length=200, description="only this GPU")] = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """Each GPU's energy in [start_time, end_time) (default: the last 30 days) per `period`: energy_kwh
    (its energy counter, power x time where that reset or is missing), energy_cost_eur at the catalogue's
    tariff, device_hours (the time it was seen) and hours_with_energy. GPUs belong to no project (job
    events do not say which GPUs a job held), so this is fleet data: admin and finance tokens only."""
    principal.require_role("admin", "finance", what="energy per GPU")
    span = params.time_range(start_time, end_time, default=DEFAULT_COST_RANGE)
    page = sql.gpu_energy(conn, period, span.start, span.end, limit, gpu_model=gpu_model, gpu_uuid=gpu_uuid)
    audit.note(request, rows=len(page.rows))
    return ApiJSON({"period": period, **span.to_json(), "truncated": page.truncated, "rows": page.rows})


@router.get("/budgets", responses={200: {"model": BudgetsResponse}, **error_responses(400, 401, 403, 422)})
def budgets(
    request: Request,
    principal: Auth,
    conn: Conn,
    start_time: StartTime = None,
    end_time: EndTime = None,
    project: Project = None,
    budget: Annotated[str | None, Query(max_length=200, description="only this budget")] = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """Budgets with spend, utilisation and forecast: the latest figure of each project budget, or, with
    start_time or end_time, every budget period overlapping that range. A user token sees its own
    projects only."""
    principal.require_project(project)
    start = end = None
    if start_time is not None or end_time is not None:
        span = params.time_range(start_time, end_time, default=DEFAULT_COST_RANGE)
        start, end = span.start, span.end
    projects = principal.projects if principal.restricted else None
    page = sql.budgets(conn, start, end, limit, project=project, budget=budget, projects=projects)
    audit.note(request, rows=len(page.rows))
    return ApiJSON({"truncated": page.truncated, "budgets": page.rows})
