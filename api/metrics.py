"""The API's own Prometheus metrics (A5): requests by route and status, their latency, open alert streams.
Routes are labelled by their template (``/metrics/raw/{metric_name}``), never by the raw path, so a scan of
made-up paths cannot blow up the series count. Served at ``GET /internal/metrics``."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bus import self_metrics

__all__ = ["ApiMetrics", "MetricsMiddleware"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    """Names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = self_metrics.counter("aima_api_requests_total", registry)
        self.latency = self_metrics.histogram("aima_api_request_duration_seconds", registry, buckets=_BUCKETS)
        self.streams = self_metrics.gauge("aima_api_alert_streams", registry)
        self.audit_failures = self_metrics.counter("aima_api_audit_failures_total", registry)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_of(scope: Scope) -> str:
    method = scope.get("method", "")
    return method if method in _METHODS else "other"


def route_of(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.latency.labels(method_of(scope), route_of(scope)).observe(
                    time.monotonic() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.requests.labels(method_of(scope), route_of(scope), str(status)).inc()
