"""System collector (M16-M21): this host's CPU, memory, disks and network rates from psutil, its running
containers from the Docker Engine API, and Kubernetes pod status when configured.

Every group is read on its own interval (monotonic clock). One SystemSample per tick carries the groups due
in that tick and null for the others, so null always means "not measured this time", never zero."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import httpx
import psutil
from prometheus_client import CollectorRegistry

from bus import self_metrics
from bus.runtime import Service
from bus.settings import Settings
from producers.k8s import K8sApiError, K8sConfig, PodReader
from producers.publisher import Publisher, last_flush_s

__all__ = [
    "GROUPS",
    "ContainerCounter",
    "ContainerRuntimeError",
    "CpuMeter",
    "NetworkMeter",
    "Outgoing",
    "Schedule",
    "SystemCollector",
    "SystemCollectorMetrics",
    "SystemIntervals",
    "loop",
    "publish",
    "read_disks",
    "read_memory",
    "run",
]

log = logging.getLogger(__name__)

GROUPS = ("cpu", "memory", "disk", "network", "containers", "pods")
SAMPLE_GROUPS = frozenset(GROUPS) - {"pods"}
DOCKER_SOCKET = "/var/run/docker.sock"
SETTLE_S = 1.0
"""Time between the baseline reads and the first sample, so CPU and network have a rate to report."""

# Kernel and container file systems that hold no user data; psutil's all=False already drops most.
PSEUDO_FSTYPES = frozenset(
    {
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts", "devtmpfs",
        "efivarfs", "fuse.lxcfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay", "proc", "pstore",
        "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "squashfs", "sysfs", "tmpfs", "tracefs",
    }
)  # fmt: skip


@dataclass(frozen=True)
class SystemIntervals:
    """Seconds between two reads of each group (defaults from M16-M21; AIMA_SYSTEM_<GROUP>_INTERVAL_S
    through producers/settings.py)."""

    cpu_s: float = 10.0
    memory_s: float = 10.0
    disk_s: float = 300.0
    network_s: float = 30.0
    containers_s: float = 60.0
    pods_s: float = 30.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"interval {item.name} must be a positive number of seconds, got {value!r}")

    def of(self, group: str) -> float:
        return float(getattr(self, f"{group}_s"))


class Schedule:
    """When each group is next due. A late tick moves that group's next read to a full interval after it,
    rather than firing the missed ones back to back."""

    def __init__(self, intervals: SystemIntervals, groups: Iterable[str], start: float) -> None:
        self._every = {group: intervals.of(group) for group in groups}
        self._next = dict.fromkeys(self._every, start)

    def due(self, now: float) -> frozenset[str]:
        """The groups due at ``now``; each is then scheduled for its next interval."""
        due = frozenset(group for group, at in self._next.items() if at <= now)
        for group in due:
            following = self._next[group] + self._every[group]
            self._next[group] = following if following > now else now + self._every[group]
        return due

    def next_at(self) -> float:
        return min(self._next.values())


# -- readers ---------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU busy percent between two reads of the cumulative CPU times, computed as psutil's cpu_percent does,
    but with a baseline of its own: psutil keeps one per module, which any other caller would move."""

    def __init__(
        self, times: Callable[[], Mapping[str, float]] = lambda: psutil.cpu_times()._asdict()
    ) -> None:
        self._times = times
        self._last: Mapping[str, float] | None = None

    def read(self) -> float | None:
        """None on the first read (no baseline yet) or when no CPU time has passed."""
        current = self._times()
        last, self._last = self._last, current
        if last is None:
            return None
        total = _total_cpu(current) - _total_cpu(last)
        if total <= 0:
            return None
        idle = _idle_cpu(current) - _idle_cpu(last)
        return min(100.0, max(0.0, 100.0 * (total - idle) / total))


def _total_cpu(times: Mapping[str, float]) -> float:
    # Linux already counts guest time inside user and nice.
    return sum(times.values()) - times.get("guest", 0.0) - times.get("guest_nice", 0.0)


def _idle_cpu(times: Mapping[str, float]) -> float:
    return times.get("idle", 0.0) + times.get("iowait", 0.0)


def _nic_counters() -> dict[str, tuple[int, int]]:
    # nowrap=False: a counter that went back stays visible, and NetworkMeter skips it instead of psutil
    # guessing it wrapped.
    counters = psutil.net_io_counters(pernic=True, nowrap=False)
    return {name: (nic.bytes_recv, nic.bytes_sent) for name, nic in counters.items()}


class NetworkMeter:
    """Receive and transmit bytes per second per interface, from the counter deltas between two reads."""

    def __init__(
        self,
        counters: Callable[[], Mapping[str, tuple[int, int]]] = _nic_counters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counters = counters
        self._clock = clock
        self._last: tuple[float, Mapping[str, tuple[int, int]]] | None = None

    def read(self) -> list[dict[str, Any]] | None:
        return self.update(self._counters(), self._clock())

    def update(self, counters: Mapping[str, tuple[int, int]], at: float) -> list[dict[str, Any]] | None:
        """Rates since the previous update; None when no interface has one (first read), never zeros."""
        last, self._last = self._last, (at, dict(counters))
        if last is None or at <= last[0]:
            return None
        seconds = at - last[0]
        rates = []
        for interface, (received, sent) in sorted(counters.items()):
            before = last[1].get(interface)
            if before is None or received < before[0] or sent < before[1]:
                continue  # new interface, or its counters were reset: a rate again from the next read
            rates.append(
                {
                    "interface": interface,
                    "receive_bytes_per_second": (received - before[0]) / seconds,
                    "transmit_bytes_per_second": (sent - before[1]) / seconds,
                }
            )
        return rates or None


class Partition(Protocol):
    device: str
    mountpoint: str
    fstype: str


class Usage(Protocol):
    used: int
    total: int


def read_disks(
    partitions: Callable[[], Iterable[Partition]] = lambda: psutil.disk_partitions(all=False),
    usage: Callable[[str], Usage] = psutil.disk_usage,
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> list[dict[str, Any]]:
    """Used and total bytes per real mounted file system; one mountpoint per device (the shortest), since
    bind mounts of one device would repeat its numbers."""
    by_device: dict[str, str] = {}
    for part in partitions():
        # Bind-mounted files (a container's /etc/hosts) are listed as mounts of the host's disk.
        if part.fstype in PSEUDO_FSTYPES or not is_dir(part.mountpoint):
            continue
        known = by_device.get(part.device)
        if known is None or len(part.mountpoint) < len(known):
            by_device[part.device] = part.mountpoint
    disks = []
    for mountpoint in sorted(by_device.values()):
        try:
            space = usage(mountpoint)
        except OSError as exc:  # unmounted meanwhile, or not ours to stat: the others still count
            log.debug("disk usage unreadable", extra={"mountpoint": mountpoint, "error": str(exc)})
            continue
        if space.total > 0:
            disks.append({"mountpoint": mountpoint, "used_bytes": space.used, "total_bytes": space.total})
    return disks


def read_memory(virtual_memory: Callable[[], Any] = psutil.virtual_memory) -> dict[str, int]:
    memory = virtual_memory()
    # Used as M17 defines it: total minus available (psutil's own "used" leaves out some reclaimable cache).
    return {"memory_used_bytes": memory.total - memory.available, "memory_total_bytes": memory.total}


class ContainerRuntimeError(RuntimeError):
    """The Docker Engine socket exists but gave no usable answer."""


class ContainerCounter:
    """Running containers from the Docker Engine API over its unix socket (``GET /containers/json`` lists
    the running ones). None when there is no socket: zero would claim a measurement."""

    def __init__(self, socket_path: str | Path = DOCKER_SOCKET, timeout_s: float = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self._timeout_s = timeout_s
        self._client: httpx.Client | None = None
        self._said_absent = False

    def read(self) -> int | None:
        if not self.socket_path.exists():
            if not self._said_absent:
                log.info(
                    "no Docker engine socket; containers_running stays null",
                    extra={"socket": str(self.socket_path)},
                )
                self._said_absent = True
            return None
        self._said_absent = False
        try:
            response = self._http().get("/containers/json")
            response.raise_for_status()
            containers = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ContainerRuntimeError(f"Docker engine at {self.socket_path}: {exc!r}") from exc
        if not isinstance(containers, list):
            raise ContainerRuntimeError(f"Docker engine at {self.socket_path}: not a container list")
        return len(containers)

    def _http(self) -> httpx.Client:
        if self._client is None:
            transport = httpx.HTTPTransport(uds=str(self.socket_path))
            # The host part is ignored on a unix socket; "docker" is what the Docker CLI sends.
            self._client = httpx.Client(
                transport=transport, base_url="http://docker", timeout=self._timeout_s
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# -- the collector ---------------------------------------------------------------------------------------


class SystemCollectorMetrics:
    """The system collector's own health metrics (A5); names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = self_metrics.counter("aima_system_collector_samples_total", registry)
        self.pods = self_metrics.counter("aima_system_collector_pod_records_total", registry)
        self.errors = self_metrics.counter("aima_system_collector_errors_total", registry)
        self.duration = self_metrics.histogram(
            "aima_system_collector_collection_duration_seconds",
            registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


class Outgoing(NamedTuple):
    topic_key: str
    key: str
    record_name: str
    value: dict[str, Any]


# What a failing reader raises; anything else is a bug and should surface.
_READ_ERRORS = (OSError, psutil.Error, httpx.HTTPError, ContainerRuntimeError, K8sApiError)


class SystemCollector:
    """Reads the groups it is asked for and turns them into records; publishes nothing itself."""

    def __init__(
        self,
        host: str,
        metrics: SystemCollectorMetrics,
        *,
        cpu: CpuMeter | None = None,
        network: NetworkMeter | None = None,
        disks: Callable[[], list[dict[str, Any]]] = read_disks,
        memory: Callable[[], dict[str, int]] = read_memory,
        containers: ContainerCounter | None = None,
        pods: PodReader | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.host = host
        self.metrics = metrics
        self.cpu = cpu or CpuMeter()
        self.network = network or NetworkMeter()
        self.disks = disks
        self.memory = memory
        self.containers = containers or ContainerCounter()
        self.pods = pods
        self._now = now
        self._failing: set[str] = set()

    @property
    def groups(self) -> tuple[str, ...]:
        return GROUPS if self.pods is not None else tuple(g for g in GROUPS if g != "pods")

    def prime(self) -> None:
        """Take the baselines that CPU and network rates are computed against."""
        self._read("cpu", self.cpu.read)
        self._read("network", self.network.read)

    def collect(self, groups: Collection[str]) -> list[Outgoing]:
        sample: dict[str, Any] = {
            "time": self._now(),
            "host": self.host,
            "source": "psutil",
            "cpu_utilization_percent": self._read("cpu", self.cpu.read) if "cpu" in groups else None,
            "memory_used_bytes": None,
            "memory_total_bytes": None,
            "disks": self._read("disk", self.disks) if "disk" in groups else None,
            "networks": self._read("network", self.network.read) if "network" in groups else None,
            "containers_running": (
                self._read("containers", self.containers.read) if "containers" in groups else None
            ),
        }
        if "memory" in groups and (memory := self._read("memory", self.memory)) is not None:
            sample.update(memory)
        out = []
        if any(value is not None for name, value in sample.items() if name not in ("time", "host", "source")):
            out.append(Outgoing("system.samples", self.host, "SystemSample", sample))
        if "pods" in groups and self.pods is not None:
            out.extend(
                Outgoing("k8s.pods", f"{pod['namespace']}/{pod['pod']}", "PodStatus", pod)
                for pod in self._read_pods(self.pods)
            )
        return out

    def _read(self, group: str, read: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            value = read()
        except _READ_ERRORS as exc:
            self.metrics.errors.labels(group).inc()
            # Logged when a group starts failing, not on every interval while it stays broken.
            if group not in self._failing:
                log.warning("reading failed", extra={"group": group, "error": repr(exc)})
                self._failing.add(group)
            return None
        finally:
            self.metrics.duration.labels(group).observe(time.perf_counter() - started)
        if group in self._failing:
            log.info("reading recovered", extra={"group": group})
            self._failing.discard(group)
        return value

    def _read_pods(self, reader: PodReader) -> list[dict[str, Any]]:
        errors_before, usage_errors_before = reader.errors, reader.usage_errors
        # fetch, not read: an API failure is then logged and counted like any other group's.
        pods = self._read("pods", reader.fetch)
        if reader.errors > errors_before:  # malformed pods, skipped by the reader
            self.metrics.errors.labels("pods").inc(reader.errors - errors_before)
        if reader.usage_errors > usage_errors_before:  # no Metrics Server answer: the usage stays null
            self.metrics.errors.labels("pod_usage").inc(reader.usage_errors - usage_errors_before)
        return pods or []

    def close(self) -> None:
        self.containers.close()
        if self.pods is not None:
            self.pods.close()


def publish(
    publisher: Publisher, metrics: SystemCollectorMetrics, records: Iterable[Outgoing]
) -> list[Outgoing]:
    """Hands records to the publisher; returns those it accepted."""
    accepted = []
    for record in records:
        if publisher.publish(*record):
            accepted.append(record)
            (metrics.samples if record.record_name == "SystemSample" else metrics.pods).inc()
        else:
            metrics.errors.labels("publish").inc()
    return accepted


def loop(
    collector: SystemCollector,
    publisher: Publisher,
    service: Service,
    intervals: SystemIntervals,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Collect and publish on schedule until the service is stopping. Primes the baselines first."""
    collector.prime()
    if service.wait(SETTLE_S):
        return
    schedule = Schedule(intervals, collector.groups, start=clock())
    while not service.stopping.is_set():
        due = schedule.due(clock())
        if due:
            publish(publisher, collector.metrics, collector.collect(due))
        publisher.poll(0)
        service.wait(max(0.0, schedule.next_at() - clock()))


def run(
    settings: Settings,
    *,
    once: bool = False,
    service: Service | None = None,
    publisher: Publisher | None = None,
    intervals: SystemIntervals | None = None,
    docker_socket: str | Path = DOCKER_SOCKET,
    k8s: K8sConfig | None = None,
    registry: CollectorRegistry | None = None,
    host: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``once``: one sample set with every group, published and flushed, returned as (record name, value)
    pairs of the records the publisher accepted. Otherwise loops until ``service.stopping`` and returns [].
    Self-metrics go to ``registry``, else the service's, else a private one."""
    if not once and service is None:
        raise ValueError("the collector loop needs a service to tell it when to stop")
    if registry is None:
        registry = service.registry if service is not None else CollectorRegistry()
    publisher = publisher or Publisher(settings, registry=registry, source="system-collector")
    collector = SystemCollector(
        host or socket.gethostname(),
        SystemCollectorMetrics(registry),
        containers=ContainerCounter(docker_socket),
        pods=PodReader(k8s) if k8s is not None else None,
    )
    try:
        if once or service is None:  # service is None only with once (checked above)
            collector.prime()
            time.sleep(SETTLE_S)
            sent = publish(publisher, collector.metrics, collector.collect(collector.groups))
            return [(record.record_name, record.value) for record in sent]
        loop(collector, publisher, service, intervals or SystemIntervals())
        return []
    finally:
        # Within what the stop bound leaves (with the broker away a full flush would outlast it).
        publisher.flush(last_flush_s(service, settings))
        collector.close()
