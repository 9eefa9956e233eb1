"""GPU samples from an existing dcgm-exporter endpoint instead of NVML: its Prometheus text parsed and
mapped onto the GpuSample contract (mapping), read on the GPU collector's interval groups (collector)."""

from producers.dcgm.collector import run

__all__ = ["run"]
