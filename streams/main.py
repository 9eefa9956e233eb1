"""One worker of the stream app (``aima-metrics stream``, ``python -m streams.main``): every processor in
one Faust app. Run several with the same app id and they share the partitions. SIGTERM or SIGINT stops a
worker cleanly: it finishes the batch in hand, flushes its outputs and changelogs, commits, and exits 0.

Configuration: :class:`streams.settings.WorkerSettings` (the app's ``AIMA_STREAMS_*`` and the processor
families' variables, listed in the README), built by :func:`run` when the worker starts, never at import,
besides the shared ``AIMA_*`` settings of bus/settings.py. Self-metrics are served on
``AIMA_METRICS_PORT`` when it is set (bus/runtime.py).

Stopping: a worker exits within ``AIMA_STOP_TIMEOUT_S`` (default 30 s) of SIGTERM or SIGINT whatever it is
doing, and a second signal ends it at once (bus/runtime.py's stop bound). Before the service starts a
signal ends the process (exit 0: nothing started, nothing to flush); while it waits for the broker, creates
topics or builds the app, the stop is seen between those steps; once Faust runs, streams/runtime/transport.py
routes the signals through the same stop request into Faust's graceful stop, whose steps share the bound. The
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
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bus.runtime import Service
    from bus.settings import Settings
    from streams.runtime.processor import Processor
    from streams.settings import WorkerSettings

__all__ = ["default_processors", "main", "run"]

log = logging.getLogger(__name__)


def default_processors(
    settings: Settings, worker: WorkerSettings, *, job_event_partitions: int | None = None
) -> list[Processor]:
    """Every processor the stream app runs by default, configured by ``worker``; ``job_event_partitions``:
    how many partitions ``job.events`` has on the broker (None: the catalogue's count), which the cost
    clock waits for."""
    from streams.alerts.processor import alert_processors_from_settings
    from streams.anomaly.processor import AnomalyProcessor
    from streams.costs import cost_processors_from_settings
    from streams.rollups.merge import RollupMerger
    from streams.rollups.processor import RollupProcessor

    processors: list[Processor] = [
        RollupProcessor(lateness=worker.app.lateness, emit_interval=worker.app.emit_interval),
        RollupMerger(),
        *cost_processors_from_settings(worker.costs, upstream_partitions=job_event_partitions),
        *alert_processors_from_settings(worker.alerts),
        AnomalyProcessor(worker.anomaly.config()),
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
    config: WorkerSettings | None = None,
) -> int:
    """Run one worker until SIGTERM or SIGINT; returns the exit code (0 after a clean stop).
    ``config`` defaults to the environment's (read here, once); ``app_id`` to its ``AIMA_STREAMS_APP_ID``;
    ``processors`` to :func:`default_processors`; ``service`` (its registry carries the self-metrics) to a
    new one."""
    from prometheus_client import CollectorRegistry

    from bus.kafka import ensure_topics, partition_count
    from bus.runtime import Service
    from bus.topics import BY_KEY
    from bus.tracing import open_tracing
    from streams.runtime.app import create_app
    from streams.runtime.transport import StreamsWorker
    from streams.settings import WorkerSettings

    config = config or WorkerSettings.load()
    options = config.app.model_copy(update={"app_id": app_id}) if app_id else config.app
    app_id = options.app_id
    service = service or Service("streams", settings, registry=CollectorRegistry())
    service.start(log_level=options.log_level.replace("crit", "critical").replace("warn", "warning"))
    if not _broker_answers(settings, service):
        return _stopped_before_faust(service)
    ensure_topics(settings)
    if processors is not None:
        chosen = list(processors)
    else:
        # The topic as it is, not as the catalogue would make it: one created earlier with fewer partitions
        # would otherwise hold the cost clock for AIMA_COST_UPSTREAM_STALE_S on the partitions it lacks.
        job_event_partitions = partition_count(settings, "job.events")
        if job_event_partitions != BY_KEY["job.events"].partitions:
            log.info(
                "job.events has another partition count than the catalogue's; the cost clock follows it",
                extra={"partitions": job_event_partitions, "catalogue": BY_KEY["job.events"].partitions},
            )
        chosen = default_processors(settings, config, job_event_partitions=job_event_partitions)
    if service.stopping.is_set():
        return _stopped_before_faust(service)
    tracing = open_tracing("aima-streams")
    app = create_app(settings, chosen, options=options, registry=service.registry, tracing=tracing)
    # What start-up made lives as long as the worker: out of the collector's sight, and rarer passes.
    gc.freeze()
    gc.set_threshold(*options.gc_threshold)
    log.info("stream app starting", extra={"app_id": app_id, "processors": [p.name for p in chosen]})
    worker = StreamsWorker(
        app,
        loglevel=options.log_level,
        quiet=True,
        redirect_stdouts=False,
        logging_config=_logging_config(options.log_level),
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
    tracing.flush(min(5.0, service.time_left_s()))
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
