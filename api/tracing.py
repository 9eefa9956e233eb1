"""A span per API request (A6, bus/tracing.py), named by method and route template (``GET
/v1/metrics/{metric}``); a request that carries a W3C ``traceparent`` header continues that trace. Added
only with tracing on (api/app.py), so it costs nothing when off."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import method_of, route_of
from bus.tracing import TRACEPARENT, Tracing

_HEADER = TRACEPARENT.encode()


class TracingMiddleware:
    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app, self.tracing = app, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self.tracing.start_ns()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            # Made at the end: the route (and so the span's name) is known only once routing is done.
            incoming = [(TRACEPARENT, v) for k, v in scope.get("headers", ()) if k == _HEADER]
            span = self.tracing.batch_span(
                f"{method_of(scope)} {route_of(scope)}",
                self.tracing.context(incoming),
                (),
                started,
                {"http.request.method": method_of(scope), "http.route": route_of(scope)},
            )
            self.tracing.end(
                span,
                f"status {status}" if status >= 500 else None,
                {"http.response.status_code": status},
            )
