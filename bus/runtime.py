"""The lifecycle every long-running process shares: structured logs, a Prometheus endpoint about itself,
and a clean stop on SIGTERM or SIGINT (the process flushes what it holds, then exits)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Info, start_http_server

from bus import logs
from bus.settings import Settings

log = logging.getLogger(__name__)


class Service:
    """Call :meth:`start` once in the main thread; loop until :attr:`stopping` is set; then flush."""

    def __init__(
        self, name: str, settings: Settings, registry: CollectorRegistry = REGISTRY, host: str = "0.0.0.0"
    ) -> None:
        self.name = name
        self.settings = settings
        self.registry = registry
        self.host = host
        self.stopping = threading.Event()
        self.metrics_port: int | None = None
        self._up = Gauge("aima_service_up", "1 while the service runs", ["service"], registry=registry)
        self._started = Gauge(
            "aima_service_start_time_seconds", "Unix time the service started", ["service"], registry=registry
        )
        self._info = Info("aima_service", "what this process is", registry=registry)

    def start(self, log_level: str = "INFO") -> None:
        logs.configure(log_level, service=self.name)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr=self.host, registry=self.registry)
            self.metrics_port = self.settings.metrics_port
        self._info.info({"service": self.name, "kafka": self.settings.kafka_bootstrap})
        self._up.labels(self.name).set(1)
        self._started.labels(self.name).set(time.time())
        log.info("started", extra={"metrics_port": self.metrics_port, "kafka": self.settings.kafka_bootstrap})

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        self.stopping.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was requested meanwhile."""
        return self.stopping.wait(seconds)

    def stopped(self) -> None:
        self._up.labels(self.name).set(0)
        log.info("stopped")


class Progress:
    """Logs progress of long work at most every ``every_s`` seconds: done, total, rate."""

    def __init__(self, what: str, total: int | None = None, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self._t0 = self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total is not None and self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            log.info(
                "progress",
                extra={
                    "work": self.what,
                    "done": self.done,
                    "total": self.total,
                    "per_second": round(rate, 1),
                },
            )
