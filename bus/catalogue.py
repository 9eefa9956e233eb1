"""The metric catalogue (requirements M1-M26) in code: every metric's name, unit, source, interval, labels,
and the one Avro field that carries it. Collectors, rollups, sinks, the API and the dashboards all look
metrics up here, so a name exists once.

Field paths: ``utilization_percent`` is a top-level field; ``disks[].used_bytes`` is a field of every item of
the array ``disks``, one series per item, labelled from the item (``disks[].mountpoint``; the label
``process_name`` is the item field ``processes[].name``). ``where`` selects
the records that carry the metric (``JobTimings`` with ``kind == "frame"``). Labels whose value is null in a
record (e.g. ``mig_instance`` of a whole GPU) are left out of that record's series.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

__all__ = ["BY_NAME", "METRICS", "Metric", "UnknownMetric", "get"]

NS = "aima.metrics"
MetricType = Literal["gauge", "counter", "summary"]


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    source: str
    """Where the value comes from: nvml, psutil, container_runtime, kubernetes, sdk, queue_sampler,
    job_events, cost_processor."""
    interval: str
    """Default collection interval as in the requirements: ``10s``, ``5m``, ``1h``; ``per ...`` for
    event-driven metrics."""
    labels: tuple[str, ...]
    """Label names identifying a series (host included where the record has one)."""
    record: str
    """Full name of the Avro record carrying the metric."""
    field: str
    """Path of the value within the record (see the module doc)."""
    description: str
    req_id: str
    """Requirement row (M1-M26), or ``extra`` for what the best GPU exporters carry beyond the catalogue."""
    where: tuple[tuple[str, str], ...] = ()
    """(field, value) pairs a record must match to carry this metric."""
    type: MetricType = "gauge"
    """gauge: one value per sample. counter: monotonic total. summary: the record is a per-interval summary
    (count, sum_seconds, min_seconds, max_seconds, sketch) and ``field`` is its sum."""
    spans_partitions: bool = False
    """Its labels do not include its topic's message key (bus/topics.py), so one series is spread over
    several partitions of the topic (job events are keyed by job_id, the queue wait is labelled by queue
    and project): each partition's rollup is only a part, and the stream app merges the parts
    (streams/rollups/merge.py) before it publishes the rollup."""
    per_process: bool = False
    """One series per process (labelled by pid): every run of a job makes new series, and a process can
    be any team's. So it is kept raw only (24 h, like the raw samples) and never rolled up, which would
    keep every pid ever seen in the rollup state and the year tier; and a user token reads only the rows of
    hosts its projects' jobs held alone at the time (api/process_sql.py)."""

    @property
    def label_fields(self) -> tuple[str, ...]:
        """Field path of each label: item labels of an array metric live in the same item."""
        return tuple(self.label_field(label) for label in self.labels)

    def label_field(self, label: str) -> str:
        if label not in self.labels:
            raise KeyError(f"{self.name} has no label {label!r}; labels: {', '.join(self.labels)}")
        prefix, _, _ = self.field.rpartition("[].")
        return f"{prefix}[].{_ITEM_LABELS[label]}" if prefix and label in _ITEM_LABELS else label

    @property
    def interval_seconds(self) -> float | None:
        """The default interval in seconds, None for event-driven metrics."""
        match = re.fullmatch(r"(\d+)(s|m|h|d)", self.interval)
        if match is None:
            return None
        return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]

    def selects(self, record: Mapping[str, Any]) -> bool:
        """Whether a decoded record of ``self.record`` carries this metric."""
        return all(record.get(key) == value for key, value in self.where)


class UnknownMetric(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Labels that come from the items of an array field rather than from the record: label -> item field. A
# process's "name" is labelled process_name, as the exporter and Prometheus conventions name it.
_ITEM_LABELS: Mapping[str, str] = MappingProxyType(
    {"mountpoint": "mountpoint", "interface": "interface", "pid": "pid", "process_name": "name"}
)

_GPU = f"{NS}.GpuSample"
_SYS = f"{NS}.SystemSample"
_TIM = f"{NS}.JobTimings"
_JOB = f"{NS}.JobEvent"
_QUEUE = f"{NS}.QueueSample"
_POD = f"{NS}.PodStatus"
_COST = f"{NS}.CostRecord"
GPU_LABELS = ("host", "gpu", "gpu_uuid", "gpu_model", "mig_instance")
JOB_LABELS = ("job_id", "project", "model")
TRANSFER_LABELS = (*JOB_LABELS, "direction")


def _gpu(
    name: str,
    unit: str,
    interval: str,
    field: str,
    req: str,
    desc: str,
    type: MetricType = "gauge",
) -> Metric:
    return Metric(name, unit, "nvml", interval, GPU_LABELS, _GPU, field, desc, req, type=type)


def _timing(name: str, kind: str, req: str, desc: str, labels: tuple[str, ...] = JOB_LABELS) -> Metric:
    interval = "per kernel call" if kind == "cuda_kernel" else f"per {kind.replace('_', ' ')}"
    return Metric(
        name, "s", "sdk", interval, labels, _TIM, "sum_seconds", desc, req, (("kind", kind),), "summary"
    )


def _cost(
    name: str, unit: str, interval: str, labels: tuple[str, ...], field: str, kind: str, req: str, desc: str
) -> Metric:
    return Metric(name, unit, "cost_processor", interval, labels, _COST, field, desc, req, (("kind", kind),))


# A table, so kept as one: one row per metric.
# fmt: off
METRICS: tuple[Metric, ...] = (
    _gpu("gpu_utilization_percent", "%", "10s", "utilization_percent", "M1", "Time a kernel was running"),
    _gpu("gpu_memory_used_bytes", "bytes", "10s", "memory_used_bytes", "M2", "Framebuffer memory in use"),
    _gpu("gpu_memory_utilization_percent", "%", "10s", "memory_utilization_percent", "M3",
         "Memory in use as a share of capacity (used / total)"),
    _gpu("gpu_memory_bandwidth_utilization_percent", "%", "10s", "memory_bandwidth_utilization_percent", "M3",
         "Time the memory controller was busy (NVML utilization.memory)"),
    _gpu("gpu_temperature_celsius", "°C", "30s", "temperature_celsius", "M4", "GPU core temperature"),
    _gpu("gpu_power_watts", "W", "30s", "power_watts", "M5", "Board power draw"),
    _gpu("gpu_tensor_core_utilization_percent", "%", "10s", "tensor_core_utilization_percent", "M7",
         "Tensor pipe activity (NVML GPM, Hopper and newer; absent elsewhere)"),
    _gpu("gpu_pcie_tx_bytes_per_second", "B/s", "30s", "pcie_tx_bytes_per_second", "M8", "PCIe GPU to host"),
    _gpu("gpu_pcie_rx_bytes_per_second", "B/s", "30s", "pcie_rx_bytes_per_second", "M8", "PCIe host to GPU"),
    _gpu("gpu_energy_joules", "J", "30s", "energy_joules", "extra", "Energy since driver load", "counter"),
    _gpu("gpu_sm_clock_hz", "Hz", "30s", "sm_clock_hz", "extra", "Streaming-multiprocessor clock"),
    _gpu("gpu_memory_clock_hz", "Hz", "30s", "memory_clock_hz", "extra", "Memory clock"),
    _gpu("gpu_ecc_corrected_errors", "count", "30s", "ecc_corrected_errors", "extra",
         "Corrected ECC errors since driver load", "counter"),
    _gpu("gpu_ecc_uncorrected_errors", "count", "30s", "ecc_uncorrected_errors", "extra",
         "Uncorrected ECC errors since driver load", "counter"),
    Metric("gpu_process_memory_used_bytes", "bytes", "nvml", "30s", (*GPU_LABELS, "pid", "process_name"),
           _GPU, "processes[].used_memory_bytes", "GPU memory a running process holds", "extra",
           per_process=True),

    _timing("cuda_kernel_duration_seconds", "cuda_kernel", "M6", "CUDA kernel run time",
            ("job_id", "kernel")),
    _timing("job_frame_processing_seconds", "frame", "M9", "Time to process one frame"),
    _timing("job_inference_seconds", "inference", "M10", "Inference time, mean per step"),
    _timing("job_batch_processing_seconds", "batch", "M11", "Time to process one batch"),
    _timing("job_model_load_seconds", "model_load", "M12", "Time to load the model"),
    _timing("job_data_transfer_seconds", "data_transfer", "M13", "Host-device copy time", TRANSFER_LABELS),
    Metric("job_data_transfer_bytes", "bytes", "sdk", "per transfer", TRANSFER_LABELS, _TIM, "bytes",
           "Bytes copied between host and device in the interval", "M13", (("kind", "data_transfer"),)),

    Metric("queue_length_jobs", "count", "queue_sampler", "10s", ("queue",), _QUEUE, "length_jobs",
           "Jobs waiting in the queue", "M14"),
    Metric("job_queue_wait_seconds", "s", "job_events", "per job", ("queue", "project"), _JOB,
           "queue_wait_seconds", "Time from queued to started", "M15", (("event", "started"),),
           spans_partitions=True),

    Metric("host_cpu_utilization_percent", "%", "psutil", "10s", ("host",), _SYS, "cpu_utilization_percent",
           "CPU busy, all cores", "M16"),
    Metric("host_memory_used_bytes", "bytes", "psutil", "10s", ("host",), _SYS, "memory_used_bytes",
           "Memory in use (total minus available)", "M17"),
    Metric("host_disk_used_bytes", "bytes", "psutil", "5m", ("host", "mountpoint"), _SYS,
           "disks[].used_bytes", "File system space in use", "M18"),
    Metric("host_network_receive_bytes_per_second", "B/s", "psutil", "30s", ("host", "interface"), _SYS,
           "networks[].receive_bytes_per_second", "Network receive throughput", "M19"),
    Metric("host_network_transmit_bytes_per_second", "B/s", "psutil", "30s", ("host", "interface"), _SYS,
           "networks[].transmit_bytes_per_second", "Network transmit throughput", "M19"),
    Metric("host_containers_running", "count", "container_runtime", "1m", ("host",), _SYS,
           "containers_running", "Containers running on the host", "M20"),
    # A pod's state as numbers, as kube-state-metrics does: readiness (1/0) labelled with the phase.
    Metric("k8s_pod_status", "state", "kubernetes", "30s", ("namespace", "pod", "phase"), _POD, "ready",
           "Pod readiness (1 ready, 0 not), labelled with the pod phase", "M21"),
    Metric("k8s_pod_restarts", "count", "kubernetes", "30s", ("namespace", "pod"), _POD, "restarts",
           "Container restarts of the pod", "M21", type="counter"),
    # Beside the status, the pod's usage from the Metrics Server (seed §3.2, metrics.k8s.io).
    Metric("k8s_pod_cpu_usage_cores", "cores", "kubernetes", "30s", ("namespace", "pod"), _POD,
           "cpu_usage_cores", "CPU the pod's containers use (Metrics Server)", "M21"),
    Metric("k8s_pod_memory_usage_bytes", "bytes", "kubernetes", "30s", ("namespace", "pod"), _POD,
           "memory_usage_bytes", "Working-set memory of the pod's containers (Metrics Server)", "M21"),

    _cost("gpu_hours", "h", "1h", ("project", "gpu_model"), "gpu_hours", "gpu_hours", "M22",
          "GPU time used by jobs"),
    _cost("gpu_idle_hours", "h", "1h", ("gpu_model",), "idle_gpu_hours", "gpu_hours", "extra",
          "GPU time available but used by no job (which GPUs sit idle)"),
    _cost("cost_estimated_eur", "EUR", "1h", ("project", "provider"), "cost_estimated_eur", "gpu_hours",
          "M23", "Estimated cost of the GPU time used"),
    _cost("job_cost_eur", "EUR", "per job", ("job_id", "project"), "job_cost_eur", "job_cost", "M24",
          "Cost of one finished job"),
    _cost("job_cost_per_media_minute_eur", "EUR/min", "per job", ("job_id", "project"),
          "job_cost_per_media_minute_eur", "job_cost", "M25", "Job cost per media minute processed"),
    _cost("budget_utilization_percent", "%", "1d", ("project", "budget"), "budget_utilization_percent",
          "budget", "M26", "Share of the budget spent in the period so far"),
    _cost("budget_forecast_eur", "EUR", "1d", ("project", "budget"), "forecast_eur", "budget", "extra",
          "Cost forecast to the period's end at the current rate"),
)
# fmt: on

BY_NAME: Mapping[str, Metric] = MappingProxyType({metric.name: metric for metric in METRICS})


def get(name: str) -> Metric:
    """The catalogue entry for ``name``; UnknownMetric (a KeyError) names the close matches."""
    try:
        return BY_NAME[name]
    except KeyError:
        close = [known for known in BY_NAME if name and (name in known or known in name)]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(BY_NAME)}"
        raise UnknownMetric(f"unknown metric {name!r}{hint}") from None
