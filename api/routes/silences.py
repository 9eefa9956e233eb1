"""Silences for admins: label matchers that mute matching alerts for a while. The API writes the
``silences`` table directly, by the rules the notifier reads it with (consumers/notify/silences.py): at
least one matcher, not all matching the empty string, an end after the start and after now. Deleting a
silence expires it now, so the record of who muted what stays."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from api import audit, params, sql
from api.auth import Auth
from api.deps import Conn
from api.errors import ApiError, bad_request, error_responses
from api.models import SilenceIn, SilenceOut, SilencesResponse
from api.responses import ApiJSON
from api.routes.common import Limit

router = APIRouter(tags=["silences"])

SilenceId = Annotated[uuid.UUID, Path(description="the silence's id")]


@router.post(
    "/silences",
    status_code=201,
    responses={201: {"model": SilenceOut}, **error_responses(400, 401, 403, 422)},
)
def create(
    request: Request,
    principal: Auth,
    conn: Conn,
    body: SilenceIn,
) -> ApiJSON:
    """Mute alerts whose labels match every matcher, from starts_at (default now) to ends_at or for a
    duration. Admins only; the silence is recorded as created by the token's name."""
    principal.require_role("admin", what="creating silences")
    matchers = [
        params.parse_matcher(m if isinstance(m, str) else m.model_dump(), f"matchers[{i}]")
        for i, m in enumerate(body.matchers)
    ]
    if all(params.matches_empty(m) for m in matchers):
        raise bad_request("matchers: they all match an alert without those labels, so would mute every alert")
    now = datetime.now(UTC)
    start = params.to_utc(body.starts_at, "starts_at") if body.starts_at is not None else now
    if (body.ends_at is None) == (body.duration is None):
        raise bad_request("ends_at/duration: give exactly one of them")
    try:
        end = (
            params.to_utc(body.ends_at, "ends_at")
            if body.ends_at is not None
            else start + params.parse_duration(body.duration or "", "duration")
        )
    except OverflowError:
        raise bad_request("duration: the silence would end outside the range of times") from None
    if end <= start:
        raise bad_request(f"ends_at {end.isoformat()} is not after starts_at {start.isoformat()}")
    if end <= now:
        raise bad_request(f"ends_at {end.isoformat()} has already passed")
    silence = sql.create_silence(conn, matchers, start, end, f"api:{principal.name}", body.comment)
    audit.note(request, rows=1, silence_id=silence["id"])
    return ApiJSON(silence, status_code=201)


@router.get("/silences", responses={200: {"model": SilencesResponse}, **error_responses(401, 403, 422)})
def list_all(
    request: Request,
    principal: Auth,
    conn: Conn,
    state: Annotated[
        Literal["pending", "active", "expired"] | None, Query(description="default: all")
    ] = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """Silences, newest first. Admins only."""
    principal.require_role("admin", what="reading silences")
    page = sql.list_silences(conn, state, limit)
    audit.note(request, rows=len(page.rows))
    return ApiJSON({"truncated": page.truncated, "silences": page.rows})


@router.get(
    "/silences/{silence_id}", responses={200: {"model": SilenceOut}, **error_responses(401, 403, 404, 422)}
)
def get(
    request: Request,
    principal: Auth,
    conn: Conn,
    silence_id: SilenceId,
) -> ApiJSON:
    principal.require_role("admin", what="reading silences")
    silence = sql.get_silence(conn, silence_id)
    if silence is None:
        raise ApiError(404, "not_found", f"no silence {silence_id}")
    audit.note(request, rows=1)
    return ApiJSON(silence)


@router.delete("/silences/{silence_id}", status_code=204, responses=error_responses(401, 403, 404, 422))
def delete(
    request: Request,
    principal: Auth,
    conn: Conn,
    silence_id: SilenceId,
) -> Response:
    """Expire a pending or active silence now. 404 when there is no such silence still in force."""
    principal.require_role("admin", what="deleting silences")
    if not sql.expire_silence(conn, silence_id):
        raise ApiError(404, "not_found", f"no pending or active silence {silence_id}")
    audit.note(request, rows=1)
    return Response(status_code=204)
