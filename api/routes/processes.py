"""The processes on the fleet's GPUs now (issue 17): per GPU (or MIG instance), each process's latest GPU
memory with the jobs running on its host at that time. The catalogue metric gpu_process_memory_used_bytes
(its samples through /metrics/raw and /metrics/aggregated) is the same data over time.

Process names and pids can reveal another team's work: a token needs the metric's scope, and a user token
sees only the rows of hosts its projects' jobs held alone at the time (api/process_sql.py says why the
host)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api import audit, params, process_sql
from api.auth import Auth
from api.deps import Conn
from api.errors import error_responses
from api.responses import ApiJSON
from api.routes.common import EndTime, StartTime
from bus import catalogue

router = APIRouter(tags=["fleet"])

METRIC = "gpu_process_memory_used_bytes"
PRINTABLE = r"^[^\x00-\x1f]{1,256}$"
"""A host or UUID as a label value: 1-256 characters, no control character (PostgreSQL refuses NUL)."""
DEFAULT_RANGE = timedelta(minutes=5)
"""Processes seen in the last five minutes: ten slow reads (30 s) of each GPU."""


@router.get("/fleet/processes", responses=error_responses(400, 401, 403, 422))
def processes(
    request: Request,
    principal: Auth,
    conn: Conn,
    gpu_uuid: Annotated[
        str | None, Query(pattern=PRINTABLE, description="only this GPU or MIG instance (its UUID)")
    ] = None,
    host: Annotated[str | None, Query(pattern=PRINTABLE, description="only this host")] = None,
    start_time: StartTime = None,
    end_time: EndTime = None,
    limit: Annotated[
        int, Query(ge=1, le=10_000, description="at most this many processes (1..10000)")
    ] = 1000,
) -> ApiJSON:
    """The latest sample in [start_time, end_time) (default: the last five minutes) of every process on
    every GPU, with `jobs`: the jobs (job_id, project) that ran on its host at that time."""
    metric = catalogue.BY_NAME[METRIC]
    audit.note(request, metric=METRIC)
    principal.require_metric(metric)
    span = params.time_range(start_time, end_time, default=DEFAULT_RANGE)
    rows, truncated = process_sql.latest_processes(
        conn,
        span.start,
        span.end,
        limit,
        gpu_uuid=gpu_uuid,
        host=host,
        projects=principal.projects if principal.restricted else None,
    )
    audit.note(request, rows=len(rows))
    return ApiJSON(
        {
            **span.to_json(),
            "metric": METRIC,
            "unit": metric.unit,
            "truncated": truncated,
            "processes": rows,
        }
    )
