"""The current GPU values in Prometheus text format (the original's scrape target gpu-exporter:9400, A5).

A custom prometheus_client Collector: the GPU collector hands it every record it publishes, and a scrape
renders the latest values of each GPU and MIG instance. Names are the catalogue's (bus.catalogue) with the
``aima_`` prefix, labels ``host, gpu, gpu_uuid, gpu_model, mig_instance`` (empty for a whole GPU). A value
the device does not support has no sample at all, never a 0.

Per-process GPU memory is the catalogue's ``gpu_process_memory_used_bytes`` (``aima_`` prefixed: an item
field of the ``processes`` array, so a family of its own) with ``pid`` and ``process_name`` (the
executable's base name) added: the series are those of the processes in the latest slow record, so a
process that ended disappears at the next slow read and the cardinality is bounded by the processes a GPU
runs at once, not by all it ever ran. The pid is needed to tell two workers of one name apart; a
process whose memory the driver does not report has no sample. A MIG parent lists its instances'
processes too (as NVML does), so sum per instance, not over parent and instances.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bus.catalogue import GPU_LABELS, METRICS
from bus.catalogue import get as catalogue_metric

__all__ = ["PREFIX", "GpuExporter"]

PREFIX = "aima_"
# Top-level fields, one sample per GPU; a metric of the items of an array (processes) has its own family.
_GPU_METRICS = tuple(m for m in METRICS if m.record == "aima.metrics.GpuSample" and "[]." not in m.field)
_PROCESS_MEMORY = catalogue_metric("gpu_process_memory_used_bytes")


class GpuExporter(Collector):
    """Thread-safe for one writer (the collector loop) and any number of scrapes: each update replaces a
    GPU's entry as a whole, and a scrape reads a snapshot."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Mapping[str, Any]]] = {}
        self._xids: dict[str, Counter[int]] = {}

    def update(self, record: Mapping[str, Any]) -> None:
        """Keep ``record`` (a GpuSample value) as the latest of its GPU and interval group."""
        uuid = record["gpu_uuid"]
        groups = dict(self._latest.get(uuid, {}))
        groups[record["interval_group"]] = record
        self._latest[uuid] = groups
        if record.get("xid_errors"):
            counts = Counter(self._xids.get(uuid, Counter()))
            counts.update(record["xid_errors"])
            self._xids[uuid] = counts

    def forget(self, uuid: str) -> None:
        """Drop a GPU that is gone, so a scrape does not show its last values as current."""
        self._latest.pop(uuid, None)
        self._xids.pop(uuid, None)

    def describe(self) -> list[Metric]:
        return []  # unchecked registration: the families depend on what the GPUs support

    def collect(self) -> Iterator[Metric]:
        snapshot = list(self._latest.items())
        xids = dict(self._xids)
        families = [_family(metric.name, metric.description, metric.type) for metric in _GPU_METRICS]
        memory_total = GaugeMetricFamily(
            f"{PREFIX}gpu_memory_total_bytes", "Framebuffer memory capacity", labels=GPU_LABELS
        )
        throttle = GaugeMetricFamily(
            f"{PREFIX}gpu_clock_throttle_reason",
            "1 for each active clock throttle reason",
            labels=(*GPU_LABELS, "reason"),
        )
        xid_total = CounterMetricFamily(
            f"{PREFIX}gpu_xid_errors",
            "XID errors seen since the collector started, by code",
            labels=(*GPU_LABELS, "xid"),
        )
        process_memory = GaugeMetricFamily(
            f"{PREFIX}{_PROCESS_MEMORY.name}", _PROCESS_MEMORY.description, labels=_PROCESS_MEMORY.labels
        )
        for uuid, groups in snapshot:
            values: dict[str, Any] = {}
            for record in groups.values():
                values.update((key, value) for key, value in record.items() if value is not None)
            labels = [
                str(values["host"]),
                str(values["gpu"]),
                uuid,
                str(values["gpu_model"]),
                values.get("mig_instance") or "",
            ]
            for metric, family in zip(_GPU_METRICS, families, strict=True):
                value = values.get(metric.field)
                if value is not None:
                    family.add_metric(labels, float(value))
            if values.get("memory_total_bytes") is not None:
                memory_total.add_metric(labels, float(values["memory_total_bytes"]))
            for reason in values.get("throttle_reasons") or ():
                throttle.add_metric([*labels, reason], 1.0)
            for process in values.get("processes") or ():
                if process.get("used_memory_bytes") is not None:
                    process_labels = [*labels, str(process["pid"]), process.get("name") or ""]
                    process_memory.add_metric(process_labels, float(process["used_memory_bytes"]))
            for code, count in sorted(xids.get(uuid, Counter()).items()):
                xid_total.add_metric([*labels, str(code)], float(count))
        for family in (*families, memory_total, throttle, xid_total, process_memory):
            if family.samples:  # a metric no GPU supports is left out entirely
                yield family


def _family(name: str, description: str, kind: str) -> GaugeMetricFamily | CounterMetricFamily:
    if kind == "counter":  # exposed as <name>_total
        return CounterMetricFamily(f"{PREFIX}{name}", description, labels=GPU_LABELS)
    return GaugeMetricFamily(f"{PREFIX}{name}", description, labels=GPU_LABELS)
