"""Alerts (S3) for admins: the ones firing now, their history, and a live feed as server-sent events.

The feed LISTENs on the channel ``aima_alerts``, on which a trigger on ``alert_history`` (migration 0010)
announces every row written, with the schema it was written in; the feed passes on the rows of the API's
schema. It ends within ``POLL_S`` when the client goes away or the server shuts down, and sends a
heartbeat comment every ``HEARTBEAT_S`` so that proxies keep an idle connection open."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, Literal

import anyio
import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from psycopg import sql as pgsql
from starlette.types import Receive, Scope, Send

from api import audit, params, sql
from api.auth import Auth
from api.deps import ApiState, Conn, api_state
from api.errors import ApiError, error_responses
from api.models import AlertsResponse
from api.responses import ApiJSON
from api.routes.common import EndTime, Labels, Limit, StartTime

router = APIRouter(tags=["alerts"])
log = logging.getLogger(__name__)

CHANNEL = "aima_alerts"
POLL_S = 0.5
HEARTBEAT_S = 15.0
DEFAULT_HISTORY = timedelta(hours=24)


@router.get("/alerts", responses={200: {"model": AlertsResponse}, **error_responses(400, 401, 403, 422)})
def alerts(
    request: Request,
    principal: Auth,
    conn: Conn,
    state: Annotated[
        Literal["current", "history"],
        Query(description="current: firing with no later resolved event; history: every state change"),
    ] = "current",
    start_time: StartTime = None,
    end_time: EndTime = None,
    severity: Annotated[Literal["critical", "warning", "info"] | None, Query()] = None,
    rule: Annotated[str | None, Query(max_length=200)] = None,
    labels: Labels = None,
    limit: Limit = 1000,
) -> ApiJSON:
    """Current alerts (newest first), or the history of state changes in [start_time, end_time) (default:
    the last 24 hours; newest first). Admins only."""
    principal.require_role("admin", what="reading alerts")
    selector = params.label_selector(labels)
    if state == "current":
        page = sql.current_alerts(conn, limit, severity=severity, rule=rule, labels=selector)
    else:
        span = params.time_range(start_time, end_time, default=DEFAULT_HISTORY)
        page = sql.alert_history(
            conn, span.start, span.end, limit, severity=severity, rule=rule, labels=selector
        )
    audit.note(request, rows=len(page.rows))
    return ApiJSON({"state": state, "truncated": page.truncated, "alerts": page.rows})


@router.get(
    "/alerts/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "ready, alert and heartbeat events"},
        **error_responses(401, 403, 503),
    },
)
async def stream(request: Request, principal: Auth) -> StreamingResponse:
    """Server-sent events: `ready` once listening, then one `alert` event per alert_history row written
    (`{"op", "truncated", "alert"}`), and a heartbeat comment every 15 s. Admins only."""
    principal.require_role("admin", what="the alert stream")
    state = api_state(request)
    with state.streams_lock:
        if state.streams >= state.config.max_streams:
            raise ApiError(503, "too_many_streams", f"{state.streams} alert streams are open; retry later")
        state.streams += 1
        state.metrics.streams.inc()
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        conn = await psycopg.AsyncConnection.connect(state.dsn, autocommit=True)
        if state.schema is not None:
            await conn.execute(
                pgsql.SQL("SET search_path TO {}, public").format(pgsql.Identifier(state.schema))
            )
        row = await (await conn.execute("SELECT current_schema()")).fetchone()
        await conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(CHANNEL)))
    except BaseException:
        await _release(state, conn)
        raise
    schema = row[0] if row else None
    return EventStreamResponse(
        _events(state, conn, schema),
        on_close=lambda: _release(state, conn),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _release(state: ApiState, conn: psycopg.AsyncConnection[Any] | None) -> None:
    with anyio.CancelScope(shield=True):
        if conn is not None:
            await conn.close()
        with state.streams_lock:
            state.streams -= 1
            state.metrics.streams.dec()


class EventStreamResponse(StreamingResponse):
    """A stream that ends as soon as the client disconnects, even while it has nothing to send, and
    calls ``on_close`` however it ends."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def produce() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(produce)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except BaseExceptionGroup as errors:
            if len(errors.exceptions) == 1:
                raise errors.exceptions[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            await self.on_close()


def _sse(event: str, data: dict[str, Any], seq: int = 0) -> str:
    head = f"id: {seq}\n" if seq else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


async def _events(
    state: ApiState, conn: psycopg.AsyncConnection[Any], schema: str | None
) -> AsyncIterator[str]:
    yield _sse("ready", {"schema": schema})
    seq, last_sent = 0, time.monotonic()
    while not state.stopping.is_set():
        async for notify in conn.notifies(timeout=POLL_S):
            try:
                payload = json.loads(notify.payload)
            except ValueError:
                log.warning("a notification on %s is not JSON; skipped", CHANNEL)
                continue
            if not isinstance(payload, dict) or payload.get("schema") != schema:
                continue
            seq += 1
            last_sent = time.monotonic()
            yield _sse(
                "alert",
                {
                    "op": payload.get("op", "INSERT"),
                    "truncated": bool(payload.get("truncated", False)),
                    "alert": payload.get("alert", {}),
                },
                seq,
            )
        if time.monotonic() - last_sent >= HEARTBEAT_S:
            last_sent = time.monotonic()
            yield ": heartbeat\n\n"
