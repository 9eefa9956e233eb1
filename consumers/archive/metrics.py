"""The archive's self-metrics (names, help, labels: bus/self_metrics.py). The sink, which runs retention,
registers them; kept apart from archiver.py so that a sink with the archive off never imports pyarrow."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from bus import self_metrics

__all__ = ["ArchiveMetrics"]


class ArchiveMetrics:
    """The archive's self-metrics (bus/self_metrics.py); the sink, which runs retention, registers them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.objects = self_metrics.counter("aima_archive_objects_total", registry)
        self.rows = self_metrics.counter("aima_archive_rows_total", registry)
        self.failures = self_metrics.counter("aima_archive_failures_total", registry)
        self.held_back = self_metrics.gauge("aima_archive_held_back_drops", registry)
