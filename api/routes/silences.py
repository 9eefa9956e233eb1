"""Silences for admins: label matchers that mute matching alerts for a while. The API stores and reads them
through bus/silences.py, as the notifier and the command line do: at least one matcher, not all matching
the empty string, an end after the start and after now. Deleting a silence expires it now, so the record
of who muted what stays. Creating and expiring are audited as ``silence.create`` and ``silence.expire``, the
row written in the change's transaction (:func:`api.audit.change`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from api import audit, params
from api.auth import Auth
from api.deps import Conn
from api.errors import ApiError, bad_request, error_responses
from api.models import SilenceIn, SilenceOut, SilencesResponse
from api.responses import ApiJSON
from api.routes.common import Limit
from bus import silences

router = APIRouter(tags=["silences"])

SilenceId = Annotated[uuid.UUID, Path(description="the silence's id")]


@router.post(
    "/silences",
    status_code=201,
    responses={201: {"model": SilenceOut}, **error_responses(400, 401, 403, 422)},
    dependencies=[audit.action("silence.create")],
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
        matcher
        for i, item in enumerate(body.matchers)
        for matcher in params.parse_matchers(
            item if isinstance(item, str) else item.model_dump(), f"matchers[{i}]"
        )
    ]
    start = params.to_utc(body.starts_at, "starts_at") if body.starts_at is not None else None
    end = params.to_utc(body.ends_at, "ends_at") if body.ends_at is not None else None
    duration = params.parse_duration(body.duration, "duration") if body.duration is not None else None
    try:
        with audit.change(request, conn, status=201):
            silence = silences.create_silence(
                conn,
                matchers,
                created_by=f"api:{principal.name}",
                comment=body.comment,
                starts_at=start,
                ends_at=end,
                duration=duration,
            )
            audit.note(request, rows=1, target=silence.id, silence_id=silence.id)
    except silences.InvalidSilence as exc:
        raise bad_request(str(exc)) from None
    return ApiJSON(silence.to_json(), status_code=201)


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
    now = datetime.now(UTC)
    found = silences.list_silences(conn, state=state, now=now, limit=limit + 1)
    audit.note(request, rows=len(found[:limit]))
    return ApiJSON({"truncated": len(found) > limit, "silences": [s.to_json(now) for s in found[:limit]]})


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
    silence = silences.get_silence(conn, str(silence_id))
    if silence is None:
        raise ApiError(404, "not_found", f"no silence {silence_id}")
    audit.note(request, rows=1)
    return ApiJSON(silence.to_json())


@router.delete(
    "/silences/{silence_id}",
    status_code=204,
    responses=error_responses(401, 403, 404, 422),
    dependencies=[audit.action("silence.expire")],
)
def delete(
    request: Request,
    principal: Auth,
    conn: Conn,
    silence_id: SilenceId,
) -> Response:
    """Expire a pending or active silence now. 404 when there is no such silence still in force."""
    audit.note(request, target=str(silence_id))
    principal.require_role("admin", what="deleting silences")
    with audit.change(request, conn, status=204):
        if not silences.delete_silence(conn, str(silence_id)):
            raise ApiError(404, "not_found", f"no pending or active silence {silence_id}")
        audit.note(request, rows=1)
    return Response(status_code=204)
