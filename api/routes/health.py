"""Liveness and the API's own Prometheus metrics; neither needs a token nor shows any metric data."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import POOL_TIMEOUT_S, api_state
from api.responses import ApiJSON

router = APIRouter(tags=["operations"])


@router.get("/healthz", responses={503: {"description": "the database does not answer"}})
def healthz(request: Request) -> ApiJSON:
    """200 while the API and its database answer."""
    state = api_state(request)
    try:
        with state.pool.connection(timeout=min(POOL_TIMEOUT_S, 3.0)) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return ApiJSON(
            {"status": "unavailable", "database": type(exc).__name__, "streams": state.streams}, 503
        )
    return ApiJSON({"status": "ok", "database": "ok", "streams": state.streams})


@router.get("/internal/metrics", response_class=Response)
def self_metrics(request: Request) -> Response:
    """The API's own metrics in the Prometheus text format."""
    registry = api_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
