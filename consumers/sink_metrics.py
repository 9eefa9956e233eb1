"""The sink's own Prometheus metrics: rows per table (and those selective storage left out), batches and
their timings, dead letters, database retries, whether it is paused, and the consumer lag per partition
(computed at scrape time)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bus import self_metrics
from consumers.archive.metrics import ArchiveMetrics

__all__ = ["LagCollector", "SinkMetrics"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class LagCollector(Collector):
    """Consumer lag per partition: the partition's high watermark minus the consumer's position. The
    consumer thread records both with :meth:`update` (a Kafka consumer is not to be called from the
    scrape thread); the difference is taken when Prometheus scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[tuple[str, int], tuple[int, int]] = {}

    def update(self, offsets: dict[tuple[str, int], tuple[int, int]]) -> None:
        """``{(topic, partition): (high watermark, position)}`` for every assigned partition."""
        with self._lock:
            self._offsets = dict(offsets)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self_metrics.gauge_family("aima_sink_consumer_lag_records")
        with self._lock:
            offsets = dict(self._offsets)
        for (topic, partition), (high, position) in sorted(offsets.items()):
            family.add_metric([topic, str(partition)], max(high - position, 0))
        yield family


class SinkMetrics:
    """Names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = self_metrics.counter("aima_sink_records_total", registry)
        self.rows = self_metrics.counter("aima_sink_rows_total", registry)
        self.rows_filtered = self_metrics.counter("aima_sink_rows_filtered_total", registry)
        self.batches = self_metrics.counter("aima_sink_batches_total", registry)
        self.batch_records = self_metrics.histogram(
            "aima_sink_batch_records", registry, buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 50000)
        )
        self.batch_seconds = self_metrics.histogram(
            "aima_sink_batch_duration_seconds", registry, buckets=_SECONDS
        )
        self.dead_letters = self_metrics.counter("aima_sink_dead_letters_total", registry)
        self.db_retries = self_metrics.counter("aima_sink_db_retries_total", registry)
        self.dead_letter_failures = self_metrics.counter("aima_sink_dead_letter_failures_total", registry)
        self.commit_failures = self_metrics.counter("aima_sink_commit_failures_total", registry)
        self.paused = self_metrics.gauge("aima_sink_paused", registry)
        self.lag = LagCollector()
        registry.register(self.lag)
        # The sink's retention archives before it drops (D5): its metrics are the sink's.
        self.archive = ArchiveMetrics(registry)
