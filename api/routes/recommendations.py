"""Recommendations (issue 17): idle GPU capacity with its cost per day, and period-end spend against
budget per project, from the hourly cost figures and budget figures (kept without expiry). A user token
sees its own projects only."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request

from api import audit, recommend
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
    projects = principal.projects if principal.restricted else None
    body = recommend.build(conn, api_state(request).config, projects, datetime.now(UTC))
    audit.note(request, rows=len(body["idle_gpus"]) + len(body["budgets"]))
    return ApiJSON(body)
