"""The audit log (A3, P3): one ``audit_log`` row per access to data (metrics, alerts, costs, budgets,
silences), whoever asked and however it ended: allowed, denied (401, 403), invalid (4xx) or failed (5xx).

An ASGI middleware opens a record for every such request; authentication notes the token and role in it,
the route the metric and the number of rows. The row is written when the response starts, before any
byte of data leaves: if it cannot be written the client gets 503 instead of unaudited data. A request
whose handler raises is recorded with status 500 before the error propagates. Event streams are recorded
once, when they start."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from fastapi import Request
from psycopg.types.json import Jsonb
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import POOL_TIMEOUT_S, ApiState

__all__ = ["AUDITED_PREFIXES", "AuditMiddleware", "AuditRecord", "current", "note"]

log = logging.getLogger(__name__)

AUDITED_PREFIXES = ("/metrics", "/alerts", "/costs", "/budgets", "/silences")
_SCOPE_KEY = "aima.audit"
_MAX_TEXT = 500
_MAX_PARAMS = 50


class AuditUnavailable(Exception):
    """The audit row could not be written; the response must not go out."""


@dataclass
class AuditRecord:
    time: datetime
    method: str
    endpoint: str
    parameters: dict[str, Any]
    client: str | None
    token_id: str | None = None
    role: str | None = None
    metric: str | None = None
    row_count: int | None = None
    status: int = 0
    duration_ms: float | None = None
    started: float = field(default_factory=time.monotonic)


def current(request: Request) -> AuditRecord | None:
    """The audit record of this request (None for endpoints that are not audited)."""
    record = request.scope.get(_SCOPE_KEY)
    return record if isinstance(record, AuditRecord) else None


def note(request: Request, *, metric: str | None = None, rows: int | None = None, **parameters: str) -> None:
    """Adds what a route learned to its request's audit row: the metric, the rows it returned, and
    parameters that are not in the query string (e.g. the id of a silence it created)."""
    record = current(request)
    if record is None:
        return
    if metric is not None:
        record.metric = metric
    if rows is not None:
        record.row_count = rows
    record.parameters.update({key: _clean(value) for key, value in parameters.items()})


def _clean(text: str) -> str:
    """PostgreSQL text and jsonb hold neither NUL nor lone surrogates; long values are cut."""
    return text[:_MAX_TEXT].replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _parameters(scope: Scope) -> dict[str, Any]:
    params = QueryParams(scope.get("query_string", b""))
    out: dict[str, Any] = {}
    for key in list(dict.fromkeys(params.keys()))[:_MAX_PARAMS]:
        values = [_clean(v) for v in params.getlist(key)]
        out[_clean(key)] = values[0] if len(values) == 1 else values
    return out


def _is_audited(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in AUDITED_PREFIXES)


def write(state: ApiState, record: AuditRecord) -> None:
    with state.pool.connection(timeout=POOL_TIMEOUT_S) as conn:
        conn.execute(
            """INSERT INTO audit_log (time, token_id, role, method, endpoint, metric, parameters, status,
                                      row_count, duration_ms, client)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                record.time,
                uuid.UUID(record.token_id) if record.token_id else None,
                record.role,
                record.method,
                record.endpoint,
                record.metric,
                Jsonb(record.parameters),
                record.status,
                record.row_count,
                record.duration_ms,
                record.client,
            ),
        )


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_audited(scope["path"]):
            await self.app(scope, receive, send)
            return
        state: ApiState = scope["app"].state.api
        client = scope.get("client")
        record = AuditRecord(
            time=datetime.now(UTC),
            method=_clean(scope["method"])[:16],
            endpoint=_clean(scope["path"]),
            parameters=_parameters(scope),
            client=_clean(str(client[0])) if client else None,
        )
        scope[_SCOPE_KEY] = record
        recorded = False

        async def record_now(status: int) -> None:
            nonlocal recorded
            recorded = True
            record.status = status
            path_params = scope.get("path_params") or {}
            if record.metric is None and isinstance(path_params.get("metric_name"), str):
                record.metric = _clean(path_params["metric_name"])[:200]
            record.duration_ms = round((time.monotonic() - record.started) * 1000, 3)
            try:
                await anyio.to_thread.run_sync(write, state, record)
            except Exception as exc:
                state.metrics.audit_failures.inc()
                log.error("audit row not written: %s", exc, extra={"endpoint": record.endpoint})
                raise AuditUnavailable(str(exc)) from exc

        async def audited_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not recorded:
                await record_now(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except AuditUnavailable:
            await _unavailable(send)
        except Exception:
            if not recorded:
                with contextlib.suppress(AuditUnavailable):
                    await record_now(500)
            raise


async def _unavailable(send: Send) -> None:
    body = b'{"error":"audit_unavailable","detail":"the access cannot be audited right now; retry later"}'
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
