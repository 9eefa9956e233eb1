"""What every route shares, kept on the application: the connection pool, the database schema, the
configuration, the self-metrics and the stop signal for long-lived streams. Routes reach it through
:func:`api_state` (or the :func:`connection` dependency), never through module globals."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from psycopg_pool import ConnectionPool

from api.config import ApiSettings
from api.metrics import ApiMetrics

__all__ = ["ApiState", "Conn", "api_state", "connection"]

POOL_TIMEOUT_S = 10.0


@dataclass
class ApiState:
    pool: ConnectionPool[Any]
    dsn: str
    schema: str | None
    """The schema the data lives in (None: the connection's default search_path)."""
    config: ApiSettings
    metrics: ApiMetrics
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the server shuts down: open event streams end at once rather than hold the shutdown."""
    streams: int = 0
    streams_lock: threading.Lock = field(default_factory=threading.Lock)


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


def connection(request: Request) -> Iterator[psycopg.Connection[Any]]:
    """FastAPI dependency: a pooled connection (autocommit, search_path set) for the request."""
    with api_state(request).pool.connection(timeout=POOL_TIMEOUT_S) as conn:
        yield conn


Conn = Annotated[psycopg.Connection[Any], Depends(connection)]
"""A route parameter of this type gets a pooled connection for the request."""
