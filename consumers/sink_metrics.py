"""The sink's own Prometheus metrics: rows per table, batches and their timings, dead letters, database
retries, whether it is paused, and the consumer lag per partition (computed at scrape time)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
        family = GaugeMetricFamily(
            "aima_sink_consumer_lag_records",
            "Records in the partition not yet read by the sink (high watermark - position)",
            labels=["topic", "partition"],
        )
        with self._lock:
            offsets = dict(self._offsets)
        for (topic, partition), (high, position) in sorted(offsets.items()):
            family.add_metric([topic, str(partition)], max(high - position, 0))
        yield family


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "aima_sink_records_total", "Kafka records read, by topic", ["topic"], registry=registry
        )
        self.rows = Counter(
            "aima_sink_rows_total",
            "Rows written per table: stored (inserted or updated) or skipped (stored already, or a newer "
            "version is)",
            ["table", "outcome"],
            registry=registry,
        )
        self.batches = Counter("aima_sink_batches_total", "Batches committed", registry=registry)
        self.batch_records = Histogram(
            "aima_sink_batch_records",
            "Records per batch",
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 50000),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "aima_sink_batch_duration_seconds",
            "Batch timings: fill (first record to hand-over), write (database, retries included), "
            "commit (offset commit), total (first record to offsets committed)",
            ["phase"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "aima_sink_dead_letters_total",
            "Records dead-lettered by the sink",
            ["topic", "error_type"],
            registry=registry,
        )
        self.db_retries = Counter(
            "aima_sink_db_retries_total",
            "Batch writes retried because the database was unavailable, by SQLSTATE",
            ["sqlstate"],
            registry=registry,
        )
        self.dead_letter_failures = Counter(
            "aima_sink_dead_letter_failures_total",
            "Sends of a dead letter the broker refused or that failed (each is sent again; the offsets wait)",
            ["error"],
            registry=registry,
        )
        self.commit_failures = Counter(
            "aima_sink_commit_failures_total", "Offset commits the broker refused", registry=registry
        )
        self.paused = Gauge(
            "aima_sink_paused",
            "1 while the sink has paused its partitions (database away)",
            registry=registry,
        )
        self.lag = LagCollector()
        registry.register(self.lag)
