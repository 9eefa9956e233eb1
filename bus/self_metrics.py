"""Every Prometheus metric our processes expose about themselves (A5), defined once: name, type, help text
and label names. The data metrics (GPU, system and job samples) are a different catalogue: bus/catalogue.py.

Names are written as Prometheus exposes them (a counter with its ``_total``, an info with its ``_info``);
the name types below are Literals, so a type checker rejects a name that is not listed here, and the
factories reject one at run time. Modules build their metrics only through :func:`counter`, :func:`gauge`,
:func:`histogram`, :func:`info` and :func:`gauge_family`; tests/unit/test_self_metrics.py starts every
component's bundle and fails when what it registers and this catalogue drift apart. Dashboards and alerts
read these names: a rename is a breaking change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

__all__ = [
    "CATALOGUE",
    "Component",
    "CounterName",
    "GaugeName",
    "HistogramName",
    "InfoName",
    "Kind",
    "MetricDef",
    "MetricName",
    "UndefinedMetric",
    "counter",
    "gauge",
    "gauge_family",
    "histogram",
    "info",
]

Kind = Literal["counter", "gauge", "histogram", "info"]
Component = Literal[
    "runtime",  # bus/runtime.py Service: every long-running process
    "publisher",  # producers/publisher.py: the collectors, the simulator, the job SDK
    "gpu_collector",  # producers/gpu/collector.py
    "system_collector",  # producers/system.py
    "dcgm_collector",  # producers/dcgm/collector.py
    "stream",  # streams/runtime/app.py
    "sink",  # consumers/sink_metrics.py
    "notifier",  # consumers/notify/delivery.py
    "api",  # api/metrics.py
    "webhook_receiver",  # aima_metrics/webhook_receiver.py (development)
]

CounterName = Literal[
    "aima_producer_records_total",
    "aima_gpu_collector_samples_total",
    "aima_gpu_collector_errors_total",
    "aima_system_collector_samples_total",
    "aima_system_collector_pod_records_total",
    "aima_system_collector_errors_total",
    "aima_dcgm_collector_samples_total",
    "aima_dcgm_collector_errors_total",
    "aima_stream_events_total",
    "aima_stream_dead_letters_total",
    "aima_stream_late_records_total",
    "aima_stream_outputs_total",
    "aima_stream_handed_records_total",
    "aima_sink_records_total",
    "aima_sink_rows_total",
    "aima_sink_rows_filtered_total",
    "aima_sink_batches_total",
    "aima_sink_dead_letters_total",
    "aima_sink_db_retries_total",
    "aima_sink_dead_letter_failures_total",
    "aima_sink_commit_failures_total",
    "aima_archive_objects_total",
    "aima_archive_rows_total",
    "aima_archive_failures_total",
    "aima_notifier_alerts_received_total",
    "aima_notifier_notifications_total",
    "aima_notifier_retries_total",
    "aima_notifier_dead_letters_total",
    "aima_notifier_silenced_alerts_total",
    "aima_api_requests_total",
    "aima_api_audit_failures_total",
    "aima_webhook_receiver_deliveries_total",
]
GaugeName = Literal[
    "aima_service_up",
    "aima_service_start_time_seconds",
    "aima_gpu_collector_devices",
    "aima_dcgm_collector_devices",
    "aima_dcgm_collector_endpoint_up",
    "aima_stream_watermark_seconds",
    "aima_stream_watermark_lag_seconds",
    "aima_sink_consumer_lag_records",
    "aima_sink_paused",
    "aima_archive_held_back_drops",
    "aima_notifier_pending_records",
    "aima_notifier_groups",
    "aima_api_alert_streams",
]
HistogramName = Literal[
    "aima_producer_send_latency_seconds",
    "aima_gpu_collector_collection_duration_seconds",
    "aima_system_collector_collection_duration_seconds",
    "aima_dcgm_collector_scrape_duration_seconds",
    "aima_stream_batch_records",
    "aima_stream_batch_seconds",
    "aima_sink_batch_records",
    "aima_sink_batch_duration_seconds",
    "aima_notifier_delivery_latency_seconds",
    "aima_api_request_duration_seconds",
]
InfoName = Literal["aima_service_info"]
MetricName = Literal[CounterName, GaugeName, HistogramName, InfoName]


class UndefinedMetric(LookupError):
    """A metric built from a name this catalogue does not list, or as a type other than its own."""


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: MetricName
    """As exposed (a counter's ``_total`` and an info's ``_info`` included)."""
    kind: Kind
    help: str
    labels: tuple[str, ...]
    component: Component
    """The bundle that registers it (tests/unit/test_self_metrics.py starts each one)."""

    @property
    def family(self) -> str:
        """The name prometheus_client gives the family (``registry.collect()``): the exposed name less
        a counter's ``_total`` and an info's ``_info``."""
        suffix = {"counter": "_total", "info": "_info"}.get(self.kind, "")
        return self.name.removesuffix(suffix)


def _d(name: MetricName, kind: Kind, component: Component, help: str, *labels: str) -> MetricDef:
    return MetricDef(name, kind, help, labels, component)


_DEFS = (
    # -- every long-running process (bus/runtime.py) ---------------------------------------------------
    _d("aima_service_up", "gauge", "runtime", "1 while the service runs", "service"),
    _d("aima_service_start_time_seconds", "gauge", "runtime", "Unix time the service started", "service"),
    _d("aima_service_info", "info", "runtime", "what this process is", "service", "kafka"),
    # -- the Kafka publisher of the collectors, the simulator and the job SDK ----------------------------
    _d(
        "aima_producer_records_total",
        "counter",
        "publisher",
        "Records by outcome: queued, delivered, failed (delivery error), invalid, dropped (queue full)",
        "topic",
        "outcome",
    ),
    _d(
        "aima_producer_send_latency_seconds",
        "histogram",
        "publisher",
        "Time from produce to the broker's acknowledgement",
    ),
    # -- the GPU collector --------------------------------------------------------------------------------
    _d("aima_gpu_collector_samples_total", "counter", "gpu_collector", "GpuSample records read", "group"),
    _d(
        "aima_gpu_collector_errors_total",
        "counter",
        "gpu_collector",
        "Failures by kind: init (NVML unusable), nvml (device count), probe, read (a GPU failed mid-read), "
        "publish (record not queued)",
        "kind",
    ),
    _d("aima_gpu_collector_devices", "gauge", "gpu_collector", "Physical GPUs being read"),
    _d(
        "aima_gpu_collector_collection_duration_seconds",
        "histogram",
        "gpu_collector",
        "Time to read one interval group from every GPU",
        "group",
    ),
    # -- the system collector -----------------------------------------------------------------------------
    _d(
        "aima_system_collector_samples_total", "counter", "system_collector", "SystemSample records published"
    ),
    _d(
        "aima_system_collector_pod_records_total",
        "counter",
        "system_collector",
        "PodStatus records published",
    ),
    _d(
        "aima_system_collector_errors_total",
        "counter",
        "system_collector",
        "Failed reads by group (cpu, memory, disk, network, containers, pods, pod_usage: the Metrics Server) "
        "and rejected publishes",
        "kind",
    ),
    _d(
        "aima_system_collector_collection_duration_seconds",
        "histogram",
        "system_collector",
        "Time to read one group",
        "group",
    ),
    # -- the dcgm-exporter collector -----------------------------------------------------------------------
    _d("aima_dcgm_collector_samples_total", "counter", "dcgm_collector", "GpuSample records read", "group"),
    _d(
        "aima_dcgm_collector_errors_total",
        "counter",
        "dcgm_collector",
        "Failures by kind: scrape (no answer, timeout, HTTP error), parse (not exposition text), labels "
        "(a DCGM sample naming no GPU), publish (record not queued)",
        "kind",
    ),
    _d(
        "aima_dcgm_collector_devices",
        "gauge",
        "dcgm_collector",
        "GPUs and MIG instances in the last exposition read",
    ),
    _d(
        "aima_dcgm_collector_endpoint_up",
        "gauge",
        "dcgm_collector",
        "1 when the last read of the dcgm-exporter endpoint succeeded, 0 when it failed",
    ),
    _d(
        "aima_dcgm_collector_scrape_duration_seconds",
        "histogram",
        "dcgm_collector",
        "Time to read and parse the dcgm-exporter endpoint once",
    ),
    # -- the stream app -----------------------------------------------------------------------------------
    _d("aima_stream_events_total", "counter", "stream", "Records consumed", "topic"),
    _d(
        "aima_stream_dead_letters_total",
        "counter",
        "stream",
        "Records dead-lettered, by error type",
        "topic",
        "kind",
    ),
    _d(
        "aima_stream_late_records_total",
        "counter",
        "stream",
        "Records later than the allowed lateness",
        "processor",
        "topic",
    ),
    _d("aima_stream_outputs_total", "counter", "stream", "Records published by the processors", "topic"),
    _d("aima_stream_batch_records", "histogram", "stream", "Records per partition batch", "topic"),
    _d(
        "aima_stream_handed_records_total",
        "counter",
        "stream",
        "Records handed to the processors, by form: columns (the partition batch was read natively and is "
        "all valid) or records (decoded and checked one by one)",
        "topic",
        "form",
    ),
    _d(
        "aima_stream_batch_seconds",
        "histogram",
        "stream",
        "Time to process one fetched batch, outputs handed to the producer",
    ),
    _d(
        "aima_stream_watermark_seconds",
        "gauge",
        "stream",
        "Event-time watermark (Unix time)",
        "topic",
        "partition",
    ),
    _d(
        "aima_stream_watermark_lag_seconds",
        "gauge",
        "stream",
        "Wall clock minus the event-time watermark",
        "topic",
        "partition",
    ),
    # -- the sink -----------------------------------------------------------------------------------------
    _d("aima_sink_records_total", "counter", "sink", "Kafka records read, by topic", "topic"),
    _d(
        "aima_sink_rows_total",
        "counter",
        "sink",
        "Rows written per table: stored (inserted or updated) or skipped (stored already, or a newer "
        "version is)",
        "table",
        "outcome",
    ),
    _d(
        "aima_sink_rows_filtered_total",
        "counter",
        "sink",
        "Raw rows selective storage (D6, bus/selective_storage.yaml) left out, per table: no metric moved "
        "beyond its deadband and no heartbeat was due; their records are committed, never dead-lettered",
        "table",
    ),
    _d("aima_sink_batches_total", "counter", "sink", "Batches committed"),
    _d("aima_sink_batch_records", "histogram", "sink", "Records per batch"),
    _d(
        "aima_sink_batch_duration_seconds",
        "histogram",
        "sink",
        "Batch timings: fill (first record to hand-over), write (database, retries included), commit "
        "(offset commit), total (first record to offsets committed)",
        "phase",
    ),
    _d(
        "aima_sink_dead_letters_total",
        "counter",
        "sink",
        "Records dead-lettered by the sink",
        "topic",
        "error_type",
    ),
    _d(
        "aima_sink_db_retries_total",
        "counter",
        "sink",
        "Batch writes retried because the database was unavailable, by SQLSTATE",
        "sqlstate",
    ),
    _d(
        "aima_sink_dead_letter_failures_total",
        "counter",
        "sink",
        "Sends of a dead letter the broker refused or that failed (each is sent again; the offsets wait)",
        "error",
    ),
    _d("aima_sink_commit_failures_total", "counter", "sink", "Offset commits the broker refused"),
    _d("aima_sink_paused", "gauge", "sink", "1 while the sink has paused its partitions (database away)"),
    _d(
        "aima_sink_consumer_lag_records",
        "gauge",
        "sink",
        "Records in the partition not yet read by the sink (high watermark - position)",
        "topic",
        "partition",
    ),
    # -- the archive (D5; run by the sink's retention, consumers/archive/) ---------------------------------
    _d(
        "aima_archive_objects_total",
        "counter",
        "sink",
        "Parquet objects written to the archive, by table and rollup tier ('' for a raw table)",
        "table",
        "tier",
    ),
    _d("aima_archive_rows_total", "counter", "sink", "Rows written to the archive", "table", "tier"),
    _d(
        "aima_archive_failures_total",
        "counter",
        "sink",
        "Archive attempts that failed (reason: unavailable, refused, error); the drop waits for a later run",
        "table",
        "tier",
        "reason",
    ),
    _d(
        "aima_archive_held_back_drops",
        "gauge",
        "sink",
        "Expired days whose drop waits because their archive failed in the last run (0: none)",
        "table",
        "tier",
    ),
    # -- the notifier -------------------------------------------------------------------------------------
    _d(
        "aima_notifier_alerts_received_total",
        "counter",
        "notifier",
        "Alert records read from the alerts topic",
        "status",
    ),
    _d(
        "aima_notifier_notifications_total",
        "counter",
        "notifier",
        "Notifications settled, by receiver, channel and outcome (delivered, dead_lettered, duplicate, "
        "not_owed)",
        "receiver",
        "channel",
        "outcome",
    ),
    _d(
        "aima_notifier_delivery_latency_seconds",
        "histogram",
        "notifier",
        "From the newest alert's event_time to the channel accepting the notification",
        "channel",
    ),
    _d(
        "aima_notifier_retries_total",
        "counter",
        "notifier",
        "Delivery attempts that failed and were retried",
        "channel",
    ),
    _d(
        "aima_notifier_dead_letters_total",
        "counter",
        "notifier",
        "Records sent to the dead-letter topic (channel 'decode' for undecodable alert records)",
        "channel",
        "error_type",
    ),
    _d(
        "aima_notifier_silenced_alerts_total",
        "counter",
        "notifier",
        "Alerts left out of a notification because a silence matched them",
    ),
    _d(
        "aima_notifier_pending_records",
        "gauge",
        "notifier",
        "Alert records read but not yet settled (offsets held)",
    ),
    _d("aima_notifier_groups", "gauge", "notifier", "Aggregation groups held in memory"),
    # -- the API ------------------------------------------------------------------------------------------
    _d("aima_api_requests_total", "counter", "api", "HTTP requests answered", "method", "route", "status"),
    _d(
        "aima_api_request_duration_seconds",
        "histogram",
        "api",
        "Time to answer a request, up to the start of the response",
        "method",
        "route",
    ),
    _d("aima_api_alert_streams", "gauge", "api", "Open /alerts/stream clients"),
    _d("aima_api_audit_failures_total", "counter", "api", "Audit rows that could not be written"),
    # -- the development webhook receiver -----------------------------------------------------------------
    _d(
        "aima_webhook_receiver_deliveries_total",
        "counter",
        "webhook_receiver",
        "Webhook deliveries by signature check",
        "signature",
    ),
)

CATALOGUE: Mapping[str, MetricDef] = {definition.name: definition for definition in _DEFS}


def _defined(name: str, kind: Kind) -> MetricDef:
    definition = CATALOGUE.get(name)
    if definition is None:
        raise UndefinedMetric(f"{name!r} is not in bus/self_metrics.py")
    if definition.kind != kind:
        raise UndefinedMetric(f"{name!r} is a {definition.kind}, not a {kind}")
    return definition


def counter(name: CounterName, registry: CollectorRegistry) -> Counter:
    definition = _defined(name, "counter")
    return Counter(definition.name, definition.help, definition.labels, registry=registry)


def gauge(name: GaugeName, registry: CollectorRegistry) -> Gauge:
    definition = _defined(name, "gauge")
    return Gauge(definition.name, definition.help, definition.labels, registry=registry)


def histogram(name: HistogramName, registry: CollectorRegistry, buckets: Sequence[float]) -> Histogram:
    """``buckets``: the caller's, as they depend on what it measures."""
    definition = _defined(name, "histogram")
    return Histogram(
        definition.name, definition.help, definition.labels, registry=registry, buckets=tuple(buckets)
    )


def info(name: InfoName, registry: CollectorRegistry) -> Info:
    """The label names are the keys its value must carry (``Info.info``); they are not declared to
    prometheus_client, which takes them from the value."""
    definition = _defined(name, "info")
    return Info(definition.family, definition.help, registry=registry)


def gauge_family(name: GaugeName) -> GaugeMetricFamily:
    """An empty family for a collector that computes its values at scrape time."""
    definition = _defined(name, "gauge")
    return GaugeMetricFamily(definition.name, definition.help, labels=definition.labels)
