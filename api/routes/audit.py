"""The audit trail for admins (A3): what was read, changed and refused, newest first, a page at a time,
filtered by time, token, actor, action and outcome. Reading it is itself audited."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, get_args

from fastapi import APIRouter, Query, Request

from api import audit, params, sql
from api.audit_log import Action, Outcome
from api.auth import Auth
from api.deps import Conn
from api.errors import error_responses
from api.models import AuditResponse
from api.responses import ApiJSON

router = APIRouter(tags=["audit"])

MAX_PAGE = 1000
Since = Annotated[
    datetime | None, Query(description="ISO 8601, inclusive; without an offset it is UTC. Default: no bound")
]
Until = Annotated[
    datetime | None, Query(description="ISO 8601, exclusive; without an offset it is UTC. Default: no bound")
]


@router.get("/audit", responses={200: {"model": AuditResponse}, **error_responses(400, 401, 403, 422)})
def trail(
    request: Request,
    principal: Auth,
    conn: Conn,
    start_time: Since = None,
    end_time: Until = None,
    token_id: Annotated[uuid.UUID | None, Query(description="rows of this token")] = None,
    actor: Annotated[
        str | None, Query(max_length=500, description="exactly this actor, e.g. api:alice or cli:ops")
    ] = None,
    action: Annotated[Action | None, Query(description=", ".join(get_args(Action)))] = None,
    outcome: Annotated[Outcome | None, Query(description=", ".join(get_args(Outcome)))] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"rows per page (1..{MAX_PAGE})")] = 100,
    cursor: Annotated[
        str | None, Query(max_length=40, description="the previous page's next_cursor (default: the newest)")
    ] = None,
) -> ApiJSON:
    """Audit rows, newest first (in the order they were written, so a page never shifts while rows are
    added); time in [start_time, end_time), either side open when not given. Admins only."""
    principal.require_role("admin", what="reading the audit trail")
    start, end = params.time_bounds(start_time, end_time)
    page = sql.audit_trail(
        conn,
        limit,
        before_id=params.cursor(cursor),
        start=start,
        end=end,
        token_id=token_id,
        actor=actor,
        action=action,
        outcome=outcome,
    )
    audit.note(request, rows=len(page.rows))
    next_cursor = str(page.rows[-1]["id"]) if page.truncated else None
    return ApiJSON({"limit": limit, "next_cursor": next_cursor, "entries": page.rows})
