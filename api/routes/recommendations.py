"""Recommendations (issue 17): idle GPU capacity with its cost per day, per project and GPU by GPU; jobs
with memory headroom for a larger batch; jobs that got slow with the GPU metrics that moved most; the
cheapest provider and GPU model per million frames from the price catalogue and the measured throughput;
period-end spend against budget per project. From the hourly rollups, cost figures and budget figures,
and job_placements for which job ran where. A user token sees its own projects' jobs and figures only;
the per-GPU list, as for `/fleet` (GPU metrics carry no project), and the slowed jobs' GPU metrics need
the scopes of GPU utilization and memory."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api import audit, recommend
from api.auth import Auth
from api.deps import Conn, api_state
from api.errors import bad_request, error_responses
from api.models import RecommendationsResponse
from api.responses import ApiJSON
from bus import catalogue

router = APIRouter(tags=["recommendations"])

GPU_METRICS = ("gpu_utilization_percent", "gpu_memory_utilization_percent")
"""What the per-GPU idle list reads: a reader needs both to see it."""


@router.get(
    "/recommendations",
    responses={200: {"model": RecommendationsResponse}, **error_responses(400, 401, 403, 422)},
)
def recommendations(
    request: Request,
    principal: Auth,
    conn: Conn,
    project: Annotated[
        str | None, Query(min_length=1, max_length=200, description="only this project (default: all yours)")
    ] = None,
    idle_below: Annotated[
        float | None,
        Query(ge=0, le=100, description="idle: hourly mean utilization below this percent"),
    ] = None,
    min_idle_hours: Annotated[
        int | None, Query(ge=1, le=24 * 31, description="consecutive idle hours before a GPU is listed")
    ] = None,
    min_batch_factor: Annotated[
        float | None, Query(gt=1, le=100, description="least batch factor for a job to be listed")
    ] = None,
    min_slowdown: Annotated[
        float | None,
        Query(gt=0, lt=100, description="least drop of a job's frames/s, percent, for an hour to be slow"),
    ] = None,
    job_model: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="job profile of `cheapest`: jobs running this model"),
    ] = None,
) -> ApiJSON:
    """`idle_gpus`: per project, provider, GPU model and pricing, the idle GPU hours of the last
    AIMA_API_RECOMMEND_WINDOW_HOURS when at least AIMA_API_RECOMMEND_IDLE_MIN_SHARE of its GPU hours were
    idle, with the idle cost per day. `idle_by_gpu`: each GPU idle (hourly mean utilization below
    `idle_below`, default AIMA_API_RECOMMEND_IDLE_BELOW_PERCENT) for `min_idle_hours` consecutive hours,
    allocated to a job or not, with its idle cost per day (null without the GPU metric scopes).
    `memory_headroom`: jobs whose peak GPU memory leaves room for a batch `batch_factor` times larger.
    `slowed_jobs`: jobs whose frames/s in whole hours dropped `min_slowdown` percent (default
    AIMA_API_RECOMMEND_SLOWDOWN_MIN_DROP_PERCENT) below their own fastest hour after a normal one, with
    the GPU metrics of their host that moved most between those hours (null without the GPU scopes).
    `throughput`: frames per GPU second per GPU model, measured on the ended jobs of the last 30 days
    (of `job_model`, or all); `cheapest`: every provider, GPU model and pricing of the price catalogue
    for a measured model, by cost per million frames, cheapest first.
    `budgets`: each project budget's period-end forecast against its amount, projected overruns first.
    Defaults and meanings of the thresholds: the AIMA_API_RECOMMEND_* settings."""
    principal.require_project(project)
    projects = principal.projects if principal.restricted else None
    if project is not None:
        projects = [project]
    config = api_state(request).config
    if min_idle_hours is not None and min_idle_hours > config.recommend_window_hours:
        raise bad_request(
            f"min_idle_hours {min_idle_hours} is longer than the window of "
            f"AIMA_API_RECOMMEND_WINDOW_HOURS={config.recommend_window_hours} hours"
        )
    thresholds = recommend.Thresholds.of(
        config,
        idle_below_percent=idle_below,
        idle_min_hours=min_idle_hours,
        batch_min_factor=min_batch_factor,
        slowdown_min_drop_percent=min_slowdown,
    )
    visible = all(principal.can_read(catalogue.BY_NAME[name]) for name in GPU_METRICS)
    body = recommend.build(
        conn, config, projects, datetime.now(UTC), thresholds, gpus_visible=visible, job_model=job_model
    )
    rows = len(body["idle_gpus"]) + len(body["budgets"]) + len(body["memory_headroom"])
    audit.note(request, rows=rows + len(body["idle_by_gpu"] or []) + len(body["slowed_jobs"] or []))
    return ApiJSON(body)
