"""A dcgm-exporter as tests meet it: its /metrics text in the real exporter's shape, and a local HTTP server
that serves it (stdlib http.server in a thread).

The shape follows NVIDIA/dcgm-exporter: one ``# HELP``/``# TYPE`` pair per DCGM field with its help text
from etc/default-counters.csv and etc/dcp-metrics-included.csv, then one row per entity with the labels in
the exporter's order (``gpu``, ``UUID``, ``pci_bus_id``, ``device``, ``modelName``, for a GPU instance
``GPU_I_PROFILE`` and ``GPU_I_ID``, ``Hostname``, the ``DCGM_FI_DRIVER_VERSION`` label field, and the
Kubernetes pod labels); integer fields printed as integers and float fields with six decimals. A GPU in MIG
mode is exported per GPU instance only, every instance's row carrying its parent's UUID, board-level fields
repeated on each, and no DCGM_FI_DEV_GPU_UTIL.

The node: GPU 0 an H100 with the profiling (DCP) fields, ECC counters and throttle reasons; GPU 1 an A100
with the default counters only (no profiling, no ECC); GPU 2 an A100 in MIG mode with instances 1
(3g.20gb) and 2 (1g.5gb).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HOSTNAME", "UUIDS", "FakeDcgmExporter", "exposition"]

HOSTNAME = "dgx-a17"
DRIVER = "550.90.07"
UUIDS = (
    "GPU-5fd4f087-86f3-7a43-b711-4771313afc50",
    "GPU-7099682b-a20d-2bcc-74ab-b9060454d81e",
    "GPU-d6dd33b9-e50e-997c-f303-c8f7312fa498",
)
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"

# (field, Prometheus type, help) in the exporter's order; help texts as its CSV files word them.
_FIELDS = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C)."),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ)."),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %)."),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %)."),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", "Current clock throttle reasons."),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors."),
    (
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "counter",
        "Total number of NVLink bandwidth counters for all lanes.",
    ),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active."),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active."),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads "
        "- in bytes per second.",
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads "
        "- in bytes per second.",
    ),
)  # fmt: skip
_FLOATS = {"DCGM_FI_DEV_POWER_USAGE"} | {name for name, _, _ in _FIELDS if name.startswith("DCGM_FI_PROF_")}


@dataclass
class _Row:
    labels: dict[str, str]
    values: dict[str, float]


def _labels(gpu: int, model: str, gi: tuple[str, int] | None = None, pod: str = "") -> dict[str, str]:
    labels = {
        "gpu": str(gpu),
        "UUID": UUIDS[gpu],
        "pci_bus_id": f"00000000:{0x18 + 0x1F * gpu:02X}:00.0",
        "device": f"nvidia{gpu}",
        "modelName": model,
    }
    if gi is not None:
        labels |= {"GPU_I_PROFILE": gi[0], "GPU_I_ID": str(gi[1])}
    labels |= {"Hostname": HOSTNAME, "DCGM_FI_DRIVER_VERSION": DRIVER}
    labels |= {"container": "trainer" if pod else "", "namespace": "ml" if pod else "", "pod": pod}
    return labels


def _rows(xid_gpu1: int) -> list[_Row]:
    h100 = {
        "DCGM_FI_DEV_SM_CLOCK": 1980,
        "DCGM_FI_DEV_MEM_CLOCK": 2619,
        "DCGM_FI_DEV_MEMORY_TEMP": 58,
        "DCGM_FI_DEV_GPU_TEMP": 64,
        "DCGM_FI_DEV_POWER_USAGE": 512.337,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 123456789012,
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 0,
        "DCGM_FI_DEV_GPU_UTIL": 87,
        "DCGM_FI_DEV_MEM_COPY_UTIL": 41,
        "DCGM_FI_DEV_ENC_UTIL": 0,
        "DCGM_FI_DEV_DEC_UTIL": 0,
        "DCGM_FI_DEV_XID_ERRORS": 0,
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": 4,
        "DCGM_FI_DEV_FB_FREE": 19573,
        "DCGM_FI_DEV_FB_USED": 61440,
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": 3,
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0,
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": 88172,
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.912345,
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.482019,
        "DCGM_FI_PROF_DRAM_ACTIVE": 0.352411,
        "DCGM_FI_PROF_PCIE_TX_BYTES": 1048576000.0,
        "DCGM_FI_PROF_PCIE_RX_BYTES": 2097152000.0,
    }
    a100 = {
        "DCGM_FI_DEV_SM_CLOCK": 1410,
        "DCGM_FI_DEV_MEM_CLOCK": 1215,
        "DCGM_FI_DEV_MEMORY_TEMP": 39,
        "DCGM_FI_DEV_GPU_TEMP": 41,
        "DCGM_FI_DEV_POWER_USAGE": 61.5,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 9876543210,
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 2,
        "DCGM_FI_DEV_GPU_UTIL": 12,
        "DCGM_FI_DEV_MEM_COPY_UTIL": 5,
        "DCGM_FI_DEV_ENC_UTIL": 0,
        "DCGM_FI_DEV_DEC_UTIL": 0,
        "DCGM_FI_DEV_XID_ERRORS": xid_gpu1,
        "DCGM_FI_DEV_FB_FREE": 39512,
        "DCGM_FI_DEV_FB_USED": 1024,
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": 0,
    }
    board = {
        "DCGM_FI_DEV_SM_CLOCK": 1410,
        "DCGM_FI_DEV_MEM_CLOCK": 1215,
        "DCGM_FI_DEV_MEMORY_TEMP": 47,
        "DCGM_FI_DEV_GPU_TEMP": 55,
        "DCGM_FI_DEV_POWER_USAGE": 180.25,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 555000111,
        "DCGM_FI_DEV_XID_ERRORS": 0,
    }
    gi1 = board | {
        "DCGM_FI_DEV_FB_FREE": 9872,
        "DCGM_FI_DEV_FB_USED": 10240,
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.61,
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.33,
        "DCGM_FI_PROF_DRAM_ACTIVE": 0.25,
    }
    gi2 = board | {
        "DCGM_FI_DEV_FB_FREE": 4857, "DCGM_FI_DEV_FB_USED": 6, "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.0,
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.0, "DCGM_FI_PROF_DRAM_ACTIVE": 0.0,
    }  # fmt: skip
    return [
        _Row(_labels(0, H100, pod="train-llm-0"), h100),
        _Row(_labels(1, A100), a100),
        _Row(_labels(2, A100, ("3g.20gb", 1), pod="infer-7f8d4b"), gi1),
        _Row(_labels(2, A100, ("1g.5gb", 2)), gi2),
    ]  # fmt: skip


def _number(name: str, value: float) -> str:
    return f"{value:f}" if name in _FLOATS else str(int(value))


def exposition(*, xid_gpu1: int = 0) -> str:
    """The node's /metrics text; ``xid_gpu1``: the last XID GPU 1 reported (0: none)."""
    rows = _rows(xid_gpu1)
    lines: list[str] = []
    for name, kind, help_text in _FIELDS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for row in rows:
            if name in row.values:
                labels = ",".join(f'{key}="{value}"' for key, value in row.labels.items())
                lines.append(f"{name}{{{labels}}} {_number(name, row.values[name])}")
    return "\n".join(lines) + "\n"


@dataclass
class FakeDcgmExporter:
    """Serves ``body`` at /metrics as dcgm-exporter does (text/plain; version=0.0.4); ``status`` other than
    200 answers that status instead. ``stop()`` closes the port (connection refused), ``start()`` opens the
    same port again."""

    body: str = field(default_factory=exposition)
    status: int = 200
    port: int = 0
    requests: int = 0
    _server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> FakeDcgmExporter:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                exporter.requests += 1
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                data = exporter.body.encode() if exporter.status == 200 else b"unavailable\n"
                self.send_response(exporter.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
