"""Every error the API answers has one JSON shape: ``{"error": "<code>", "detail": "<what is wrong, naming
the parameter>"}``. Bad input is a 4xx, never a 500: FastAPI's own validation errors, PostgreSQL's data
exceptions (SQLSTATE class 22, e.g. a time out of range) and unknown routes are all turned into that shape
here. A 5xx means the server or its database failed, not the request. Each answer notes its reason (the
error code, or an :class:`ApiError`'s finer ``reason``) in the request's audit row."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg_pool
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import audit
from api.responses import ApiJSON

__all__ = ["ApiError", "ErrorBody", "error_responses", "install"]

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    """Raise from a route to answer ``status`` with ``{"error": error, "detail": detail}``. ``reason``: what
    the audit row records (default ``error``), e.g. ``insufficient_scope`` for a 403."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers
        self.reason = reason or error


def bad_request(detail: str) -> ApiError:
    return ApiError(400, "invalid_parameter", detail)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` documenting the error shape for these status codes."""
    return {code: {"model": ErrorBody} for code in codes}


def _body(
    status: int,
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    request: Request | None = None,
    reason: str | None = None,
) -> ApiJSON:
    if request is not None:
        audit.note(request, reason=reason or error)
    return ApiJSON({"error": error, "detail": detail}, status_code=status, headers=headers)


def _where(loc: Sequence[Any]) -> str:
    if not loc:
        return "request"
    kind, *rest = loc
    name = ".".join(str(part) for part in rest)
    if kind == "body":
        return f"body field {name!r}" if name else "request body"
    return f"{kind} parameter {name!r}" if name else f"{kind} parameters"


def describe_validation(errors: Sequence[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        text = f"{_where(err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        if "input" in err and err.get("type") != "missing" and not isinstance(err["input"], dict | list):
            text += f" (got {str(err['input'])[:80]!r})"
        parts.append(text)
    return "; ".join(parts)


async def _api_error(request: Request, exc: Exception) -> ApiJSON:
    assert isinstance(exc, ApiError)
    return _body(exc.status, exc.error, exc.detail, exc.headers, request=request, reason=exc.reason)


async def _validation(request: Request, exc: Exception) -> ApiJSON:
    assert isinstance(exc, RequestValidationError)
    return _body(422, "invalid_parameter", describe_validation(exc.errors()), request=request)


async def _http(request: Request, exc: Exception) -> ApiJSON:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no endpoint at {request.url.path}; see /docs for the API"
    return _body(
        exc.status_code, codes.get(exc.status_code, "http_error"), detail, exc.headers, request=request
    )


async def _data_error(request: Request, exc: Exception) -> ApiJSON:
    """SQLSTATE class 22 (data exception): a value the database cannot take, e.g. a time out of its range."""
    assert isinstance(exc, psycopg.Error)
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None else None) or str(exc)
    return _body(400, "invalid_value", f"the database rejected a parameter value: {message}", request=request)


_AWAY_CLASSES = ("08", "53", "57")
"""SQLSTATE classes of a database that is away or overloaded, not of a wrong query: connection exception,
insufficient resources, operator intervention (shutdown, crash recovery, cannot connect now)."""
_NOT_MIGRATED = ("42P01", "42703", "42883")
"""Undefined table, column or function: the schema lacks a migration this API needs."""


async def _database_error(request: Request, exc: Exception) -> ApiJSON:
    """By SQLSTATE, not message text: bad input is a 400 (class 22), a database that is away or a query
    cut short a 503 the client may retry, a schema behind the code a 503 naming it, anything else (a query
    the code got wrong) a 500 logged with its traceback."""
    assert isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout)
    sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    if sqlstate is not None and sqlstate.startswith("22"):
        return await _data_error(request, exc)
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return _body(
            503,
            "query_timeout",
            "the query ran longer than the server allows; narrow the time range",
            request=request,
        )
    # No SQLSTATE: the server never answered (connection refused or lost) or the pool had no connection.
    if sqlstate is None or sqlstate.startswith(_AWAY_CLASSES):
        log.warning("database error on %s: %s", request.url.path, exc)
        return _body(
            503,
            "database_unavailable",
            "the database is not available right now; retry later",
            request=request,
        )
    if sqlstate in _NOT_MIGRATED:
        log.error("the database schema is behind the API on %s: %s", request.url.path, exc)
        return _body(
            503,
            "schema_not_migrated",
            "the database schema lacks what this request needs; run `aima-metrics db migrate`",
            request=request,
        )
    log.error("database error on %s (SQLSTATE %s)", request.url.path, sqlstate, exc_info=exc)
    return _body(500, "internal_error", "the server failed to answer this request", request=request)


async def _unicode(request: Request, exc: Exception) -> ApiJSON:
    return _body(400, "invalid_value", f"a text value is not valid Unicode: {exc}", request=request)


async def _unexpected(request: Request, exc: Exception) -> ApiJSON:
    log.exception("unexpected error on %s", request.url.path, exc_info=exc)
    return _body(500, "internal_error", "the server failed to answer this request")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(psycopg.DataError, _data_error)
    app.add_exception_handler(psycopg.Error, _database_error)
    app.add_exception_handler(psycopg_pool.PoolTimeout, _database_error)
    app.add_exception_handler(UnicodeError, _unicode)
    app.add_exception_handler(Exception, _unexpected)
