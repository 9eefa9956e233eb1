"""The lifecycle every long-running process shares: structured logs, a Prometheus endpoint about itself,
and a bounded stop on SIGTERM or SIGINT: the process flushes what it holds and exits; if it is still there
when ``stop_timeout_s`` (AIMA_STOP_TIMEOUT_S) has passed, whatever it is doing (blocked on a broker or a
database that is away, stuck in a library), :class:`StopBound` ends it. Nothing unsafe has been committed
at that point (offsets follow writes), so the next start resumes from what was committed. A second stop
request ends the process at once."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType

from prometheus_client import REGISTRY, CollectorRegistry

from bus import logs, self_metrics
from bus.health import Check, HealthServer, kafka_check
from bus.settings import Settings

log = logging.getLogger(__name__)

EXIT_RESERVE_S = 2.0
"""Of the stop bound, what a process keeps for closing its clients and exiting after its last flush."""


def exit_now(code: int = 0) -> None:
    """End the process at once (no cleanup beyond flushing the log handlers and standard streams)."""
    # A broken log pipe must not keep the process alive.
    for flushable in [*logging.getLogger().handlers, sys.stdout, sys.stderr]:
        with contextlib.suppress(Exception):
            flushable.flush()
    os._exit(code)


def bounded_call(call: Callable[[], object], timeout_s: float, what: str) -> bool:
    """Run ``call`` on a daemon thread and wait at most ``timeout_s`` for it: for a client's close that
    can hang while its server is away (a Kafka consumer leaving its group). True when it finished in
    time (re-raising what it raised); False when it was left behind, to end with the process."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"bounded-{what.replace(' ', '-')}", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout_s))
    if thread.is_alive():
        log.warning(f"{what} did not finish in time; going on without it", extra={"timeout_s": timeout_s})
        return False
    if errors:
        raise errors[0]
    return True


class StopBound:
    """Once :meth:`request` is called, the process has ``timeout_s`` to stop by itself; a daemon thread ends
    it when that passes (a little before, so the bound holds as seen from outside). A second request ends
    it at once. ``on_overdue`` (tests) replaces the exit."""

    _MARGIN_S = 1.0

    def __init__(self, timeout_s: float, on_overdue: Callable[[int], None] = exit_now) -> None:
        self.timeout_s = timeout_s
        self._exit = on_overdue
        self._requested = threading.Event()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._deadline: float | None = None

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def remaining_s(self) -> float:
        """Seconds left before the bound ends the process; the whole bound while no stop is requested.
        What a process spends on its way out (a final flush) is sized by this."""
        if self._deadline is None:
            return max(0.0, self.timeout_s - self._MARGIN_S)
        return max(0.0, self._deadline - time.monotonic())

    def request(self, why: str) -> bool:
        """The first request arms the bound and returns True; a later one exits at once."""
        with self._lock:
            if self._requested.is_set():
                log.warning("second stop request: exiting now", extra={"why": why})
                self._exit(0)
                return False
            self._requested.set()
            delay = max(0.0, self.timeout_s - self._MARGIN_S)
            self._deadline = time.monotonic() + delay
            self._timer = threading.Timer(delay, self._overdue, args=(why,))
            self._timer.daemon = True
            self._timer.name = "stop-bound"
            self._timer.start()
            return True

    def cancel(self) -> None:
        """The process stopped in time (tests that run a service in-process call this)."""
        if self._timer is not None:
            self._timer.cancel()

    def _overdue(self, why: str) -> None:
        log.warning(
            "still running when the stop bound passed: exiting without waiting further",
            extra={"why": why, "stop_timeout_s": self.timeout_s},
        )
        self._exit(0)


class Service:
    """Call :meth:`start` once in the main thread; loop until :attr:`stopping` is set; then flush.
    :meth:`stopped` ends the stop bound's watch.

    The metrics port also answers the probes of bus/health.py: ``/healthz`` and ``/readyz``, ready while
    every one of :attr:`checks` passes. ``checks`` defaults to the Kafka bootstrap servers (every pipeline
    process reads or writes Kafka); a process that needs more adds them with :meth:`add_check`."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        registry: CollectorRegistry = REGISTRY,
        host: str = "0.0.0.0",
        checks: Mapping[str, Check] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.registry = registry
        self.host = host
        self.stopping = threading.Event()
        self.bound = StopBound(settings.stop_timeout_s)
        self.metrics_port: int | None = None
        self.checks: dict[str, Check] = (
            dict(checks) if checks is not None else {"kafka": kafka_check(settings.kafka_bootstrap)}
        )
        self.http: HealthServer | None = None
        self._up = self_metrics.gauge("aima_service_up", registry)
        self._started = self_metrics.gauge("aima_service_start_time_seconds", registry)
        self._info = self_metrics.info("aima_service_info", registry)

    def start(self, log_level: str = "INFO") -> None:
        logs.configure(log_level, service=self.name)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # SIGUSR1 writes every thread's stack to stderr (the log): how a process that hangs is diagnosed.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        if self.settings.metrics_port:
            self.http = HealthServer(
                self.registry, self.checks, self.stopping, self.host, self.settings.metrics_port
            ).start()
            self.metrics_port = self.http.port
        self._info.info({"service": self.name, "kafka": self.settings.kafka_bootstrap})
        self._up.labels(self.name).set(1)
        self._started.labels(self.name).set(time.time())
        log.info("started", extra={"metrics_port": self.metrics_port, "kafka": self.settings.kafka_bootstrap})

    def add_check(self, name: str, check: Check) -> None:
        """Make readiness (``/readyz``) depend on ``check`` too (e.g. the database of a sink)."""
        self.checks[name] = check

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, why: str) -> None:
        """What SIGTERM and SIGINT do: set :attr:`stopping` and arm the stop bound (a second request exits
        at once). Processes whose framework owns the signals (the Faust worker) call it from there."""
        if self.bound.request(why):
            log.info("stop requested", extra={"signal": why, "stop_timeout_s": self.bound.timeout_s})
        self.stopping.set()

    def time_left_s(self) -> float:
        """Seconds the process may still spend on its way out (a last flush): what the stop bound leaves
        (:meth:`StopBound.remaining_s`) less ``EXIT_RESERVE_S`` for closing clients and exiting."""
        return max(0.0, self.bound.remaining_s() - EXIT_RESERVE_S)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was requested meanwhile."""
        return self.stopping.wait(seconds)

    def stopped(self) -> None:
        self.bound.cancel()
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
