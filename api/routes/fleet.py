"""The fleet now (for the web console): the latest sample of every GPU, host by host, idle ones marked, and
the mean utilization per host and minute for its chart. GPU metrics carry no project, so, as for /query,
what decides is the token's metric scopes: it needs those of utilization, memory and temperature."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api import audit, console_sql
from api.auth import Auth
from api.deps import Conn
from api.errors import error_responses
from api.responses import ApiJSON
from bus import catalogue

router = APIRouter(tags=["fleet"])

FLEET_METRICS = ("gpu_utilization_percent", "gpu_memory_used_bytes", "gpu_temperature_celsius")


@router.get("/fleet", responses=error_responses(401, 403, 422))
def fleet(
    request: Request,
    principal: Auth,
    conn: Conn,
    max_age_s: Annotated[
        int, Query(ge=10, le=86_400, description="GPUs with a sample in the last this many seconds")
    ] = 300,
    idle_below: Annotated[
        float, Query(ge=0, le=100, description="a GPU whose utilization is below this percent is idle")
    ] = 5.0,
    history_minutes: Annotated[
        int, Query(ge=1, le=1440, description="minutes of per-host mean utilization for the chart")
    ] = 60,
) -> ApiJSON:
    """Every GPU seen in the last `max_age_s` seconds with its latest utilization, memory, temperature and
    power, grouped by host; `idle` when its utilization is below `idle_below`."""
    for name in FLEET_METRICS:
        principal.require_metric(catalogue.BY_NAME[name])
    now = datetime.now(UTC)
    gpus = console_sql.fleet(conn, now - timedelta(seconds=max_age_s), idle_below)
    hosts: dict[str, list[dict[str, object]]] = {}
    for gpu in gpus:
        hosts.setdefault(str(gpu["host"]), []).append(gpu)
    history = console_sql.fleet_history(conn, now - timedelta(minutes=history_minutes))
    audit.note(request, rows=len(gpus))
    return ApiJSON(
        {
            "idle_below": idle_below,
            "gpus": len(gpus),
            "idle": sum(1 for g in gpus if g["idle"]),
            "hosts": [{"host": host, "gpus": rows} for host, rows in hosts.items()],
            "history": history,
        }
    )
