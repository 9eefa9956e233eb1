"""The GPU collector on NVML: probe what every GPU and MIG instance supports, read it in a fast and a slow
interval group, publish GpuSample records and serve the current values to Prometheus.

probe (what each device supports) -> reader (one device, one group -> a GpuSample value) -> collector
(schedule, lost and returning GPUs, publishing) -> exporter (Prometheus text on its own port)."""

from producers.gpu.collector import run

__all__ = ["run"]
