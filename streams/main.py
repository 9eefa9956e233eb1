"""One worker of the stream app (``aima-metrics stream``, ``python -m streams.main``): every processor in
one Faust app. Run several with the same app id and they share the partitions. SIGTERM or SIGINT stops a
worker cleanly: it finishes the batch in hand, flushes its outputs and changelogs, commits, and exits 0.

Configuration (read by :func:`run`, never at import), besides the ``AIMA_*`` settings of bus/settings.py:

| variable | default | meaning |
|---|---|---|
| ``AIMA_STREAMS_APP_ID`` | ``aima-streams`` | consumer group and prefix of the app's internal topics |
| ``AIMA_STREAMS_BATCH_MAX`` | ``10000`` | most records per fetched batch |
| ``AIMA_STREAMS_COMMIT_INTERVAL_S`` | ``2.8`` | how often acknowledged offsets are committed |
| ``AIMA_STREAMS_SESSION_TIMEOUT_S`` | ``30`` | how long the group waits for a silent (killed) worker |
| ``AIMA_STREAMS_WEB_PORT`` | unset (off) | port of Faust's own web server |
| ``AIMA_STREAMS_LOG_LEVEL`` | ``info`` | crit, error, warn, info or debug |
| ``AIMA_STREAMS_LATENESS_S`` | ``600`` | rollups: allowed lateness behind the partition's watermark |
| ``AIMA_STREAMS_EMIT_INTERVAL_S`` | ``60`` | event time between two non-final upserts of one bucket |

Self-metrics are served on ``AIMA_METRICS_PORT`` when it is set (bus/runtime.py).

Stopping: a worker exits within ``AIMA_STOP_TIMEOUT_S`` (default 30 s) of SIGTERM or SIGINT whatever it is
doing, and a second signal ends it at once (bus/runtime.py's stop bound). Before the service starts a
signal ends the process (exit 0: nothing started, nothing to flush); while it waits for the broker, creates
topics or builds the app, the stop is seen between those steps; once Faust runs, streams/transport.py routes
the signals through the same stop request into Faust's graceful stop, whose steps share the bound. The
modules this worker runs are imported inside :func:`run` and :func:`default_processors`, so that
``python -m streams.main`` holds the signals within milliseconds of starting rather than after the
seconds that importing Faust takes on a loaded machine.

While the broker is away (at start or later) the worker backs off with bounded exponential delays and
logs a repeated error once a minute with a count (bus/logs.py); it resumes by itself when the broker
returns.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bus.runtime import Service
    from bus.settings import Settings
    from streams.processor import Processor

__all__ = ["StreamsConfig", "default_processors", "main", "run"]

log = logging.getLogger(__name__)
_LOG_LEVELS = ("crit", "error", "warn", "info", "debug")


@dataclass(frozen=True)
class StreamsConfig:
    app_id: str = "aima-streams"
    batch_max: int = 10000
    commit_interval_s: float = 2.8
    session_timeout_s: float = 30.0
    web_port: int | None = None
    log_level: str = "info"
    lateness: timedelta = timedelta(minutes=10)
    emit_interval: timedelta = timedelta(seconds=60)
    gc_threshold: tuple[int, int, int] = (50_000, 20, 100)
    """Python's collector thresholds (gc.set_threshold). The worker allocates a few objects per sample and
    keeps large state; at Python's default (700, 10, 10) the young-generation passes took about a third
    of the rollup processor's time in the bench. Cycles are rare here, so passes can be rarer."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> StreamsConfig:
        def number(name: str, default: float) -> float:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {raw!r}")
            return value

        level = environ.get("AIMA_STREAMS_LOG_LEVEL", "info").lower()
        if level not in _LOG_LEVELS:
            raise ValueError(f"AIMA_STREAMS_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")
        web = environ.get("AIMA_STREAMS_WEB_PORT")
        gc_raw = environ.get("AIMA_STREAMS_GC_THRESHOLD", "").strip()
        return cls(
            app_id=environ.get("AIMA_STREAMS_APP_ID") or cls.app_id,
            batch_max=max(1, int(number("AIMA_STREAMS_BATCH_MAX", cls.batch_max))),
            commit_interval_s=number("AIMA_STREAMS_COMMIT_INTERVAL_S", cls.commit_interval_s),
            session_timeout_s=number("AIMA_STREAMS_SESSION_TIMEOUT_S", cls.session_timeout_s),
            web_port=int(web) if web else None,
            log_level=level,
            lateness=timedelta(seconds=number("AIMA_STREAMS_LATENESS_S", 600)),
            emit_interval=timedelta(seconds=number("AIMA_STREAMS_EMIT_INTERVAL_S", 60)),
            gc_threshold=_gc_threshold(gc_raw) if gc_raw else cls.gc_threshold,
        )


def _gc_threshold(raw: str) -> tuple[int, int, int]:
    try:
        values = [int(part) for part in raw.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"AIMA_STREAMS_GC_THRESHOLD must be three positive integers a,b,c, got {raw!r}")
    return values[0], values[1], values[2]


def default_processors(settings: Settings, config: StreamsConfig | None = None) -> list[Processor]:
    """Every processor the stream app runs by default (``config`` defaults to the environment's)."""
    from streams.alerts import alert_processors_from_environ
    from streams.anomaly import AnomalyConfig, AnomalyProcessor
    from streams.costs import cost_processors_from_environ
    from streams.rollup_merge import RollupMerger
    from streams.rollups import RollupProcessor

    config = config or StreamsConfig.from_env(os.environ)
    processors: list[Processor] = [
        RollupProcessor(lateness=config.lateness, emit_interval=config.emit_interval),
        RollupMerger(),
        *cost_processors_from_environ(),
        *alert_processors_from_environ(),
        AnomalyProcessor(AnomalyConfig.from_environ()),
    ]
    names = [p.name for p in processors]
    if len(set(names)) != len(names):
        raise ValueError(f"processor names must be unique: {names}")
    return processors


def run(
    settings: Settings,
    *,
    processors: Sequence[Processor] | None = None,
    app_id: str | None = None,
    service: Service | None = None,
    config: StreamsConfig | None = None,
) -> int:
    """Run one worker until SIGTERM or SIGINT; returns the exit code (0 after a clean stop).
    ``app_id`` defaults to ``AIMA_STREAMS_APP_ID``, then ``aima-streams``; ``processors`` to
    :func:`default_processors`; ``service`` (its registry carries the self-metrics) to a new one."""
    from prometheus_client import CollectorRegistry

    from bus.kafka import ensure_topics
    from bus.runtime import Service
    from streams.app import StreamOptions, create_app
    from streams.transport import StreamsWorker

    config = config or StreamsConfig.from_env(os.environ)
    app_id = app_id or config.app_id
    service = service or Service("streams", settings, registry=CollectorRegistry())
    service.start(log_level=config.log_level.replace("crit", "critical").replace("warn", "warning"))
    if not _broker_answers(settings, service):
        return _stopped_before_faust(service)
    ensure_topics(settings)
    chosen = list(processors) if processors is not None else default_processors(settings, config)
    options = StreamOptions(
        app_id=app_id,
        batch_max=config.batch_max,
        commit_interval_s=config.commit_interval_s,
        session_timeout_s=config.session_timeout_s,
        web_port=config.web_port,
    )
    if service.stopping.is_set():
        return _stopped_before_faust(service)
    app = create_app(settings, chosen, options=options, registry=service.registry)
    # What start-up made lives as long as the worker: out of the collector's sight, and rarer passes.
    gc.freeze()
    gc.set_threshold(*config.gc_threshold)
    log.info("stream app starting", extra={"app_id": app_id, "processors": [p.name for p in chosen]})
    worker = StreamsWorker(
        app,
        loglevel=config.log_level,
        quiet=True,
        redirect_stdouts=False,
        logging_config=_logging_config(config.log_level),
        request_stop=service.request_stop,
        stop_requested=service.stopping.is_set,
        time_left_s=service.time_left_s,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    else:  # pragma: no cover - execute_from_commandline always exits
        code = 0
    finally:
        # Closing Faust's loop gave the signals back to their defaults: a second one while the process
        # winds down must still end it at once, with exit 0.
        _route_signals(service)
    service.stopped()
    return code


def _route_signals(service: Service) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        service.request_stop(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)


def _stopped_before_faust(service: Service) -> int:
    log.info("stopped before the stream app started")
    service.stopped()
    return 0


def _broker_answers(settings: Settings, service: Service) -> bool:
    """Wait for the broker as long as it takes, backing off and watching the stop; False when a stop
    came first."""
    from bus.kafka import broker_metadata_unless_stopped

    return broker_metadata_unless_stopped(settings, service.stopping) is not None


def _logging_config(level: str) -> dict[str, object]:
    """Faust's worker sets logging up itself; this makes it write bus/logs.py's JSON lines."""
    names = {"crit": "CRITICAL", "error": "ERROR", "warn": "WARNING", "info": "INFO", "debug": "DEBUG"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "bus.logs.JsonFormatter"}},
        "filters": {"repeats": {"()": "bus.logs.RepeatFilter"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["repeats"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": names[level], "handlers": ["default"]},
    }


def _exit_before_start(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)  # nothing has started: nothing to flush or commit


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_before_start)
    from bus.settings import Settings

    sys.exit(run(Settings()))


if __name__ == "__main__":
    main()
