"""Jobs (for the web console): the recent ones, and one job's events, timings, cost and the GPU use of its
host while it ran. A user token sees the jobs of its projects only; another project's job is answered 404
like a job that does not exist, so that a token cannot learn which job ids exist elsewhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from api import audit, console_sql, params
from api.auth import Auth
from api.deps import Conn
from api.errors import ApiError, error_responses
from api.responses import ApiJSON
from api.routes.common import EndTime, StartTime
from api.routes.fleet import FLEET_METRICS
from bus import catalogue

router = APIRouter(tags=["jobs"])

DEFAULT_JOB_RANGE = timedelta(hours=24)
JOB_ID = r"^[A-Za-z0-9._:@/-]{1,200}$"


@router.get("/jobs", responses=error_responses(400, 401, 403, 422))
def jobs(
    request: Request,
    principal: Auth,
    conn: Conn,
    start_time: StartTime = None,
    end_time: EndTime = None,
    project: Annotated[str | None, Query(max_length=200, description="only this project")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many jobs (1..1000)")] = 100,
) -> ApiJSON:
    """Jobs with an event in [start_time, end_time) (default: the last 24 hours), newest first."""
    principal.require_project(project)
    span = params.time_range(start_time, end_time, default=DEFAULT_JOB_RANGE)
    projects = principal.projects if principal.restricted else None
    page = console_sql.jobs(conn, span.start, span.end, limit, project=project, projects=projects)
    audit.note(request, rows=len(page.rows))
    return ApiJSON({**span.to_json(), "truncated": page.truncated, "jobs": page.rows})


@router.get("/jobs/{job_id}", responses=error_responses(401, 404, 422))
def job(
    request: Request,
    principal: Auth,
    conn: Conn,
    job_id: Annotated[str, Path(pattern=JOB_ID, description="the job's id")],
) -> ApiJSON:
    """One job: its events, its timings per kind and kernel, its cost, and per minute the utilization,
    memory and temperature of each GPU of its host from its first event to its end (or now); `gpu_use` is
    null for a token without the scopes of those GPU metrics."""
    found = console_sql.job(conn, job_id, datetime.now(UTC))
    if found is None or (principal.restricted and found["project"] not in principal.projects):
        raise ApiError(404, "unknown_job", f"no job {job_id!r} that this token may read")
    if not all(principal.can_read(catalogue.BY_NAME[m]) for m in FLEET_METRICS):
        found["gpu_use"] = None  # the GPU metrics are the token's scopes to read, not the job's project
    audit.note(request, rows=1)
    return ApiJSON(found)
