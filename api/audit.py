"""The audit log (A3, P3): one ``audit_log`` row per API request for data (metrics, alerts, costs, budgets,
silences, the audit trail itself), whoever asked and however it ended: allowed, unauthenticated (401, with
the reason: no token, an unknown, revoked or expired one), denied (403, with the reason), invalid (another
4xx) or failed (5xx). A request that changes something (a silence created or expired) is recorded with its
action; the token and silence commands write their rows through :mod:`api.audit_log`.

An ASGI middleware opens a record for every such request; authentication notes the token, role and actor
in it, the route the metric, the number of rows and its action (:func:`action`). The row is written when
the response starts, before any byte of data leaves: if it cannot be written the client gets 503 instead of
unaudited data. A change is written with its row in one transaction (:func:`change`), so no change commits
unaudited. A request whose handler raises is recorded with status 500 before the error propagates. Event
streams are recorded once, when they start. A refused request costs one bounded insert (query parameters
are capped in number and length), like any other."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import psycopg
from fastapi import Depends, Request
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import audit_log
from api.audit_log import Action, Entry, clean
from api.deps import POOL_TIMEOUT_S, ApiState

__all__ = ["AUDITED_PREFIXES", "AuditMiddleware", "AuditRecord", "action", "change", "current", "note"]

log = logging.getLogger(__name__)

AUDITED_PREFIXES = (
    "/metrics",
    "/alerts",
    "/costs",
    "/budgets",
    "/recommendations",
    "/silences",
    "/audit",
    "/fleet",
    "/jobs",
    "/whoami",
)
_SCOPE_KEY = "aima.audit"
_MAX_PARAMS = 50


class AuditUnavailable(Exception):
    """The audit row could not be written; the response must not go out."""


@dataclass
class AuditRecord(Entry):
    """The row of one request, filled while it runs."""

    started: float = field(default_factory=time.monotonic)
    written: bool = False
    """Written already, with the change it records (:func:`change`)."""


def current(request: Request) -> AuditRecord | None:
    """The audit record of this request (None for endpoints that are not audited)."""
    record = request.scope.get(_SCOPE_KEY)
    return record if isinstance(record, AuditRecord) else None


def note(
    request: Request,
    *,
    metric: str | None = None,
    rows: int | None = None,
    reason: str | None = None,
    target: str | None = None,
    **parameters: str,
) -> None:
    """Adds what a route learned to its request's audit row: the metric, the rows it returned, why it was
    refused, what it changed, and parameters that are not in the query string."""
    record = current(request)
    if record is None:
        return
    if metric is not None:
        record.metric = metric
    if rows is not None:
        record.row_count = rows
    if reason is not None:
        record.reason = clean(reason)[:100]
    if target is not None:
        record.target = clean(target)
    record.parameters.update({key: clean(value) for key, value in parameters.items()})


def action(name: Action) -> Any:
    """A route's ``dependencies=[audit.action(...)]``: what the request does, noted before authentication
    runs, so a refused attempt is recorded as that action too."""

    async def mark(request: Request) -> None:
        record = current(request)
        if record is not None:
            record.action = name

    return Depends(mark)


@contextlib.contextmanager
def change(request: Request, conn: psycopg.Connection[Any], *, status: int) -> Iterator[AuditRecord | None]:
    """A transaction on ``conn`` for a route's change; the request's row (answered ``status``) is written in
    it as the block ends, so the change and its row commit together or not at all. If the block raises,
    nothing is written here and the row goes out with the error's answer as usual."""
    record = current(request)
    with conn.transaction():
        yield record
        if record is not None:
            _finish(record, status)
            audit_log.insert(conn, record)
    if record is not None:
        record.written = True


def _finish(record: AuditRecord, status: int) -> None:
    record.status = status
    record.duration_ms = round((time.monotonic() - record.started) * 1000, 3)


def _parameters(scope: Scope) -> dict[str, Any]:
    params = QueryParams(scope.get("query_string", b""))
    out: dict[str, Any] = {}
    for key in list(dict.fromkeys(params.keys()))[:_MAX_PARAMS]:
        values = [clean(v) for v in params.getlist(key)]
        out[clean(key)] = values[0] if len(values) == 1 else values
    return out


def _is_audited(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in AUDITED_PREFIXES)


def write(state: ApiState, record: AuditRecord) -> None:
    with state.pool.connection(timeout=POOL_TIMEOUT_S) as conn:
        audit_log.insert(conn, record)


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
            method=clean(scope["method"])[:16],
            endpoint=clean(scope["path"]),
            parameters=_parameters(scope),
            client=clean(str(client[0])) if client else None,
        )
        scope[_SCOPE_KEY] = record
        recorded = False

        async def record_now(status: int) -> None:
            nonlocal recorded
            recorded = True
            path_params = scope.get("path_params") or {}
            if record.metric is None and isinstance(path_params.get("metric_name"), str):
                record.metric = clean(path_params["metric_name"])[:200]
            _finish(record, status)
            try:
                await anyio.to_thread.run_sync(write, state, record)
            except Exception as exc:
                state.metrics.audit_failures.inc()
                log.error("audit row not written: %s", exc, extra={"endpoint": record.endpoint})
                raise AuditUnavailable(str(exc)) from exc

        async def audited_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not recorded and not record.written:
                await record_now(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except AuditUnavailable:
            await _unavailable(send)
        except Exception:
            if not recorded and not record.written:
                record.reason = record.reason or "internal_error"
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
