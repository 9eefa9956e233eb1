"""Recommendations (issue 17): idle GPU capacity with its cost per day, and period-end spend against
budget per project, from the hourly cost figures and budget figures (kept without expiry). A user token
sees its own projects only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request

from api import audit, recommend, recommend_sql
from api.auth import Auth
from api.deps import Conn, api_state
from api.errors import error_responses
from api.models import RecommendationsResponse
from api.responses import ApiJSON

router = APIRouter(tags=["recommendations"])


@router.get(
    "/recommendations",
    responses={200: {"model": RecommendationsResponse}, **error_responses(401, 403, 422)},
)
def recommendations(request: Request, principal: Auth, conn: Conn) -> ApiJSON:
    """`idle_gpus`: per project, provider, GPU model and pricing, the idle GPU hours of the last
    AIMA_API_RECOMMEND_WINDOW_HOURS when at least AIMA_API_RECOMMEND_IDLE_MIN_SHARE of its GPU hours were
    idle, with the idle cost per day; `budgets`: each project budget's period-end forecast against its
    amount, projected overruns first."""
    config = api_state(request).config
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=config.recommend_window_hours)
    projects = principal.projects if principal.restricted else None
    idle = recommend.idle_costs(
        recommend_sql.idle_gpu_hours(conn, start, end, projects),
        days=config.recommend_window_hours / 24,
        min_idle_share=config.recommend_idle_min_share,
    )
    budgets = recommend.budget_projections(recommend_sql.latest_budgets(conn, projects))
    audit.note(request, rows=len(idle) + len(budgets))
    return ApiJSON(
        {
            "start_time": start.isoformat(),
            "end_time": end.isoformat(),
            "idle_min_share": config.recommend_idle_min_share,
            "idle_gpus": idle,
            "budgets": budgets,
        }
    )
