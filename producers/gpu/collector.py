"""The GPU collector: NVML -> GpuSample records on ``gpu.samples`` (keyed ``host/gpu_uuid``), plus the
current values for Prometheus on their own port.

Two interval groups run on their own schedule (time.monotonic). A GPU that fails a read is logged,
counted, released and skipped; the others go on, and it is probed afresh when NVML answers for it again.
Without NVML (no library, no driver, no device) the collector says so and keeps serving its own metrics.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from bus import self_metrics
from bus.settings import Settings
from producers.gpu.exporter import GpuExporter
from producers.gpu.probe import Device, attach, release
from producers.gpu.reader import GROUPS, DeviceReadError, Group, read_group

if TYPE_CHECKING:
    from bus.runtime import Service
    from producers.publisher import Publisher

__all__ = ["GpuCollector", "GpuCollectorMetrics", "run"]

log = logging.getLogger(__name__)

TOPIC_KEY = "gpu.samples"
RECORD = "GpuSample"
DEFAULT_EXPORTER_PORT = 9400
GPM_ONCE_WINDOW_S = 0.5
"""In --once mode, the least time between GPM's two samples, so tensor-core use is not a 1 ms guess."""


class GpuCollectorMetrics:
    """The GPU collector's own health metrics (A5); names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = self_metrics.counter("aima_gpu_collector_samples_total", registry)
        self.errors = self_metrics.counter("aima_gpu_collector_errors_total", registry)
        self.devices = self_metrics.gauge("aima_gpu_collector_devices", registry)
        self.duration = self_metrics.histogram(
            "aima_gpu_collector_collection_duration_seconds",
            registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )


class GpuCollector:
    """Keeps the attached devices and schedules the groups. ``step(now)`` does whatever is due at
    monotonic time ``now`` and returns the GpuSample values read; it never sleeps."""

    def __init__(
        self,
        nvml: Any,
        *,
        host: str,
        metrics: GpuCollectorMetrics,
        exporter: GpuExporter | None = None,
        fast_interval_s: float = 10.0,
        slow_interval_s: float = 30.0,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if fast_interval_s <= 0 or slow_interval_s <= 0:
            raise ValueError(f"intervals must be positive, got {fast_interval_s} and {slow_interval_s}")
        self.nvml = nvml
        self.host = host
        self.metrics = metrics
        self.exporter = exporter
        self.interval_s: dict[Group, float] = {"fast": fast_interval_s, "slow": slow_interval_s}
        self.wall_clock = wall_clock
        self.devices: dict[int, Device] = {}
        self._next_due: dict[Group, float | None] = dict.fromkeys(GROUPS)
        self._failing: set[int] = set()  # indices whose failure was already logged as a warning
        self._seen: set[str] = set()  # UUIDs ever attached, to tell "found" from "back"
        self._count: int | None = None

    # -- schedule ------------------------------------------------------------------------------------------

    def step(self, now: float) -> list[dict[str, Any]]:
        due = [group for group in GROUPS if (at := self._next_due[group]) is None or now >= at]
        if not due:
            return []
        # Look for new and returning GPUs every slow round, and every round while one is missing.
        if "slow" in due or self._missing():
            self.rescan()
        records: list[dict[str, Any]] = []
        for group in due:
            records.extend(self.collect(group))
            self._next_due[group] = self._advance(self._next_due[group], self.interval_s[group], now)
        return records

    def next_due(self) -> float:
        """Monotonic time of the next round (now, before the first)."""
        return min((at for at in self._next_due.values() if at is not None), default=float("-inf"))

    @staticmethod
    def _advance(due: float | None, interval_s: float, now: float) -> float:
        # Keep the cadence; after a stall (suspend, overload) start afresh instead of catching up.
        if due is None or due + interval_s <= now:
            return now + interval_s
        return due + interval_s

    def _missing(self) -> bool:
        return self._count is not None and len(self.devices) < self._count

    # -- devices -------------------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Attach every GPU NVML counts that is not attached yet; release those it no longer counts."""
        nvml = self.nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            self.metrics.errors.labels("nvml").inc()
            log.warning("cannot count NVML devices", extra={"error": _describe(exc)})
            return
        for index in [index for index in self.devices if index >= count]:
            self._lose(self.devices[index], f"NVML now counts {count} devices")
        for index in range(count):
            if index not in self.devices:
                self._attach(index)
        if count == 0 and self._count != 0:
            log.warning("no NVML device found: NVML counts 0 GPUs")
        self._count = count
        self.metrics.devices.set(len(self.devices))

    def _attach(self, index: int) -> None:
        try:
            device = attach(self.nvml, index)
        except Exception as exc:
            self.metrics.errors.labels("probe").inc()
            level = logging.DEBUG if index in self._failing else logging.WARNING
            log.log(level, "cannot read GPU", extra={"gpu": index, "error": _describe(exc)})
            self._failing.add(index)
            return
        self._failing.discard(index)
        self.devices[index] = device
        for entity in device.entities:
            log.info(
                "GPU back" if entity.uuid in self._seen else "GPU found",
                extra={
                    "gpu": index,
                    "gpu_uuid": entity.uuid,
                    "gpu_model": entity.model,
                    "mig_instance": entity.mig_instance,
                    "supported": sorted(entity.supported),
                },
            )
            self._seen.add(entity.uuid)

    def _lose(self, device: Device, reason: str) -> None:
        log.warning("GPU gone", extra={"gpu": device.index, "gpu_uuid": device.uuid, "reason": reason})
        release(self.nvml, device)
        del self.devices[device.index]
        self._failing.add(device.index)
        if self.exporter is not None:
            for entity in device.entities:
                self.exporter.forget(entity.uuid)
        self.metrics.devices.set(len(self.devices))

    def close(self) -> None:
        for device in list(self.devices.values()):
            release(self.nvml, device)
        self.devices.clear()

    # -- reading -------------------------------------------------------------------------------------------

    def collect(self, group: Group) -> list[dict[str, Any]]:
        """One record per GPU and MIG instance; a GPU that fails is skipped and released."""
        started = time.perf_counter()
        taken = self.wall_clock()
        records: list[dict[str, Any]] = []
        for device in list(self.devices.values()):
            try:
                batch = [read_group(self.nvml, e, group, self.host, taken) for e in device.entities]
            except Exception as exc:
                self.metrics.errors.labels("read").inc()
                self._lose(device, _describe(exc))
                continue
            records.extend(batch)
        if self.exporter is not None:
            for record in records:
                self.exporter.update(record)
        self.metrics.samples.labels(group).inc(len(records))
        self.metrics.duration.labels(group).observe(time.perf_counter() - started)
        return records

    def has_gpm(self) -> bool:
        return any(e.gpm is not None for device in self.devices.values() for e in device.entities)


def run(
    settings: Settings,
    *,
    once: bool = False,
    service: Service | None = None,
    nvml: Any = None,
    publisher: Publisher | None = None,
    fast_interval_s: float = 10,
    slow_interval_s: float = 30,
    exporter_port: int | None = DEFAULT_EXPORTER_PORT,
    registry: CollectorRegistry | None = None,
    host: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Collect GPU samples and publish them to ``gpu.samples``.

    ``once``: probe, read both groups once, publish, flush and return the (record name, value) pairs
    ([] when no NVML device is found). Otherwise loop until ``service.stopping`` is set, serving the
    current values on ``exporter_port`` (None: not at all), and flush the publisher on the way out.
    ``nvml`` defaults to the pynvml module; ``registry`` (default: the service's, else a new one) gets
    the collector's and the publisher's own metrics, which the exporter port serves as well."""
    if nvml is None:
        import pynvml as nvml
    if registry is None:
        registry = service.registry if service is not None else CollectorRegistry()
    stopping = service.stopping if service is not None else threading.Event()
    metrics = GpuCollectorMetrics(registry)
    exporter = GpuExporter()
    collector = GpuCollector(
        nvml,
        host=host or socket.gethostname(),
        metrics=metrics,
        exporter=exporter,
        fast_interval_s=fast_interval_s,
        slow_interval_s=slow_interval_s,
    )
    if once:
        return _run_once(settings, collector, publisher, registry, stopping)
    _run_loop(settings, collector, publisher, registry, service, exporter, exporter_port)
    return []


def _run_once(
    settings: Settings,
    collector: GpuCollector,
    publisher: Publisher | None,
    registry: CollectorRegistry,
    stopping: threading.Event,
) -> list[tuple[str, dict[str, Any]]]:
    if not _init_nvml(collector, first=True):
        return []
    try:
        probed = time.monotonic()
        collector.rescan()
        if not collector.devices:
            return []
        if collector.has_gpm():
            stopping.wait(max(0.0, GPM_ONCE_WINDOW_S - (time.monotonic() - probed)))
        records = [(RECORD, value) for group in GROUPS for value in collector.collect(group)]
        publisher = publisher or _new_publisher(settings, registry)
        _publish(publisher, collector, records)
        publisher.flush()
        return records
    finally:
        collector.close()
        _shutdown_nvml(collector.nvml)


def _run_loop(
    settings: Settings,
    collector: GpuCollector,
    publisher: Publisher | None,
    registry: CollectorRegistry,
    service: Service | None,
    exporter: GpuExporter,
    exporter_port: int | None,
) -> None:
    stopping = service.stopping if service is not None else threading.Event()
    server = _serve(exporter, registry, exporter_port)
    nvml_up = False
    init_attempts = 0
    next_init = time.monotonic()
    try:
        while not stopping.is_set():
            now = time.monotonic()
            if not nvml_up:
                if now >= next_init:
                    nvml_up = _init_nvml(collector, first=init_attempts == 0)
                    init_attempts += 1
                    next_init = now + collector.interval_s["slow"]
                if not nvml_up:
                    stopping.wait(max(0.0, next_init - time.monotonic()))
                    continue
            records = collector.step(now)
            if records:
                publisher = publisher or _new_publisher(settings, registry)
                _publish(publisher, collector, [(RECORD, value) for value in records])
            if publisher is not None:
                publisher.poll(0)
            stopping.wait(max(0.0, collector.next_due() - time.monotonic()))
    finally:
        if publisher is not None:
            from producers.publisher import last_flush_s  # a publisher exists: Kafka is imported already

            # Within the stop bound (with the broker away a full flush would outlast it).
            publisher.flush(last_flush_s(service, settings))
        collector.close()
        if nvml_up:
            _shutdown_nvml(collector.nvml)
        if server is not None:
            server.shutdown()
            server.server_close()


def _init_nvml(collector: GpuCollector, *, first: bool) -> bool:
    try:
        collector.nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ... never a crash
        collector.metrics.errors.labels("init").inc()
        log.log(
            logging.WARNING if first else logging.DEBUG,
            f"no NVML device found: {_describe(exc)}",
            extra={"error": _describe(exc)},
        )
        return False
    return True


def _shutdown_nvml(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:
        log.debug("NVML shutdown failed", extra={"error": _describe(exc)})


def _new_publisher(settings: Settings, registry: CollectorRegistry) -> Publisher:
    # Imported here: a process without GPUs never needs a Kafka client.
    from producers.publisher import Publisher

    return Publisher(settings, registry=registry, source="gpu-collector")


def _publish(publisher: Any, collector: GpuCollector, records: list[tuple[str, dict[str, Any]]]) -> None:
    for name, value in records:
        if not publisher.publish(TOPIC_KEY, f"{collector.host}/{value['gpu_uuid']}", name, value):
            collector.metrics.errors.labels("publish").inc()


class _Forward(Collector):
    """Serves another registry's metrics (the collector's own) on the exporter port too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Any:
        return self._registry.collect()


def _serve(exporter: GpuExporter, registry: CollectorRegistry, port: int | None) -> Any:
    if port is None:
        return None
    served = CollectorRegistry(auto_describe=False)
    served.register(exporter)
    served.register(_Forward(registry))
    try:
        server, _thread = start_http_server(port, registry=served)
    except OSError as exc:  # the port is taken: Kafka publishing matters more than the scrape target
        log.error("cannot serve GPU metrics", extra={"port": port, "error": str(exc)})
        return None
    log.info("serving GPU metrics", extra={"port": server.server_port})
    return server


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DeviceReadError):  # name the read that failed and NVML's own error
        return f"{exc.read}: {_describe(exc.cause)}"
    return f"{type(exc).__name__}: {exc}"
