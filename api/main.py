"""Runs the API under uvicorn as a long-running service (`aima-metrics api`): structured logs, the
service's own metrics, HTTPS when AIMA_API_TLS_CERT and AIMA_API_TLS_KEY are set (P2), and a clean stop
on SIGTERM or SIGINT: open alert streams end, requests in flight finish (up to ``GRACE_S``, or a third of
the stop bound when that is shorter), the connection pool closes. A request still waiting on the database
after that (it is away, or a query runs long) is abandoned rather than waited for: its thread cannot be
cancelled, and the API holds nothing that needs it to finish."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Generator
from typing import Any

import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.config import ApiSettings
from api.deps import ApiState
from bus.health import database_check
from bus.runtime import Service, exit_now
from bus.settings import Settings

__all__ = ["ApiServer", "run"]

log = logging.getLogger(__name__)
GRACE_S = 10.0


class ApiServer(uvicorn.Server):
    """A uvicorn server that stops when ``stop`` is set (signals are the caller's: :class:`Service`
    turns them into that event) and ends the app's event streams before it waits for open connections,
    which streams would otherwise hold forever. ``abandon``: called when requests are still running once
    the shutdown is done (their threads blocked on the database), instead of waiting for them."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        stop: threading.Event | None = None,
        abandon: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.api: ApiState = app.state.api
        self.stop = stop or threading.Event()
        self.abandon = abandon

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if self.stop.is_set():
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.api.stopping.set()
        await super().shutdown(sockets)
        left = [task for task in self.server_state.tasks if not task.done()]
        if left and self.abandon is not None:
            self.abandon(len(left))


def server(
    app: FastAPI,
    config: ApiSettings,
    stop: threading.Event | None = None,
    abandon: Callable[[int], None] | None = None,
    **uvicorn_options: Any,
) -> ApiServer:
    """An :class:`ApiServer` for ``app`` on ``config.host``:``config.port``, with TLS when configured."""
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACE_S,
        "server_header": False,
    }
    if config.tls:
        options.update(ssl_certfile=str(config.tls_cert), ssl_keyfile=str(config.tls_key))
    options.update(uvicorn_options)
    return ApiServer(uvicorn.Config(app, **options), app, stop, abandon)


def run(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    service: Service | None = None,
    log_level: str = "INFO",
    config: ApiSettings | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. ``config`` defaults to the environment's :class:`ApiSettings`, read here
    once; ``host``/``port`` override its AIMA_API_HOST/AIMA_API_PORT (127.0.0.1:8000).
    ``service``: the process's :class:`Service` (one named ``api`` is started when None); the API's request
    metrics go to its registry, so its metrics port shows them too."""
    config = config or ApiSettings()
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        config = config.model_copy(update=overrides)
    if service is None:
        # The API reads only the database (no Kafka): that is what its metrics port's /readyz checks.
        service = Service("api", settings, checks={"database": database_check(settings.database_dsn())})
        service.start(log_level)
    from bus.tracing import open_tracing

    tracing = open_tracing("aima-api")
    app = create_app(settings, config=config, registry=service.registry, tracing=tracing)
    scheme = "https" if config.tls else "http"
    log.info("serving the API", extra={"url": f"{scheme}://{config.host}:{config.port}", "docs": "/docs"})

    def abandon(requests: int) -> None:
        log.warning("requests still waiting on the database are abandoned", extra={"requests": requests})
        service.stopped()
        exit_now(0)

    grace_s = min(GRACE_S, settings.stop_timeout_s / 3)
    server(app, config, service.stopping, abandon, timeout_graceful_shutdown=grace_s).run()
    tracing.flush(min(5.0, service.time_left_s()))
    service.stopped()
