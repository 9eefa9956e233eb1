"""The REST API application (A1-A3): metric data, alerts, costs, budgets and silences over the database,
with bearer-token authentication, an audit row per data access (the trail readable by admins at /audit),
its own Prometheus metrics and an OpenAPI document at /openapi.json (browsable at /docs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from psycopg import sql
from psycopg_pool import ConnectionPool

from api import errors
from api.audit import AuditMiddleware
from api.config import ApiSettings
from api.deps import POOL_TIMEOUT_S, ApiState
from api.metrics import ApiMetrics, MetricsMiddleware
from api.responses import ApiJSON
from api.routes import (
    alerts,
    audit,
    costs,
    fleet,
    health,
    jobs,
    metrics,
    processes,
    recommendations,
    silences,
    ui,
)
from bus.settings import Settings
from bus.tracing import OFF, Tracing

__all__ = ["create_app"]

STATEMENT_TIMEOUT_MS = 30_000
POOL_MAX = 10


def _configure(schema: str | None) -> Callable[[psycopg.Connection[Any]], None]:
    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(STATEMENT_TIMEOUT_MS)))
        if schema is not None:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))

    return configure


def create_app(
    settings: Settings,
    *,
    pool: ConnectionPool[Any] | None = None,
    schema: str | None = None,
    config: ApiSettings | None = None,
    registry: CollectorRegistry | None = None,
    tracing: Tracing = OFF,
) -> FastAPI:
    """The API over ``settings.database_dsn()``. ``pool``: an open pool of autocommit connections whose
    search_path reaches the tables (the caller opens and closes it); without one the application opens its
    own for as long as it runs (its lifespan). ``schema``: the schema holding the tables (tests use one per
    test); None uses the connection's default. ``registry``: where the self-metrics go (default: a new
    one, served at /internal/metrics). ``config``: the process's :class:`ApiSettings` (api.main.run builds
    them at the start); without them, their defaults. ``tracing``: a span per request (api/tracing.py)."""
    dsn = settings.database_dsn()
    owned = pool is None
    if pool is None:
        pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=POOL_MAX,
            kwargs={"autocommit": True, "application_name": "aima-api"},
            configure=_configure(schema),
            # A connection the server ended (a restart, an outage) is replaced before a request gets it,
            # instead of failing that request with 503: one empty round trip per request.
            check=ConnectionPool.check_connection,
            timeout=POOL_TIMEOUT_S,
            name="aima-api",
            open=False,
        )
    state = ApiState(
        pool=pool,
        dsn=dsn,
        schema=schema,
        config=config or ApiSettings.from_environ({}),
        metrics=ApiMetrics(registry or CollectorRegistry()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            # Without waiting: the API starts while the database is away, answering 503 until it is back.
            state.pool.open(wait=False)
        try:
            yield
        finally:
            state.stopping.set()
            if owned:
                state.pool.close()

    app = FastAPI(
        title="aima-metrics API",
        version="1.0",
        description=__doc__,
        lifespan=lifespan,
        default_response_class=ApiJSON,
    )
    app.state.api = state
    errors.install(app)
    routers = (metrics, alerts, costs, recommendations, silences, audit, health, fleet, processes, jobs, ui)
    for module in routers:
        app.include_router(module.router)
    app.add_middleware(AuditMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    if tracing.on:
        from api.tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware, tracing=tracing)
    return app
