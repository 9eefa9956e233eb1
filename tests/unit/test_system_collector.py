"""The system collector: rates, scheduling, disks, the Docker Engine API, and real psutil readings."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.settings import Settings
from bus.validation import check
from producers.k8s import K8sConfig, PodReader
from producers.settings import CollectorSettings
from producers.system import (
    ContainerCounter,
    ContainerRuntimeError,
    CpuMeter,
    NetworkMeter,
    Schedule,
    SystemCollector,
    SystemCollectorMetrics,
    SystemIntervals,
    loop,
    read_disks,
    read_memory,
    run,
)
from tests.unit.test_k8s import EXPECTED, FakeKubernetes

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


class RecordingPublisher:
    """Publisher's interface; validates and encodes as the real one does, and keeps what it was given."""

    def __init__(self) -> None:
        self.codec = Codec()
        self.records: list[tuple[str, str, str, dict[str, Any]]] = []
        self.flushed = 0

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        check(record_name, value)
        self.codec.encode(record_name, value)
        self.records.append((topic_key, key, record_name, value))
        return True

    def poll(self, timeout_s: float = 0.0) -> int:
        return 0

    def flush(self, timeout_s: float = 30.0) -> int:
        self.flushed += 1
        return 0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def no_docker(tmp_path: Path) -> ContainerCounter:
    return ContainerCounter(tmp_path / "no-docker.sock")


def _errors(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("aima_system_collector_errors_total", {"kind": kind}) or 0.0


# -- network rates ---------------------------------------------------------------------------------------


def test_the_first_network_read_has_no_rate() -> None:
    assert NetworkMeter().update({"eth0": (1000, 500)}, at=100.0) is None


def test_network_rate_is_the_counter_delta_per_second() -> None:
    meter = NetworkMeter()
    meter.update({"eth0": (1_000, 500), "lo": (10, 10)}, at=100.0)
    rates = meter.update({"eth0": (31_000, 3_500), "lo": (10, 10)}, at=130.0)
    assert rates == [
        {"interface": "eth0", "receive_bytes_per_second": 1000.0, "transmit_bytes_per_second": 100.0},
        {"interface": "lo", "receive_bytes_per_second": 0.0, "transmit_bytes_per_second": 0.0},
    ]


def test_a_counter_reset_gives_no_rate_for_that_interface_until_the_next_read() -> None:
    meter = NetworkMeter()
    meter.update({"eth0": (9_000_000, 500), "eth1": (100, 100)}, at=0.0)
    # eth0 went back (driver reload, interface re-created): no rate, not a negative or a huge one.
    rates = meter.update({"eth0": (300, 600), "eth1": (400, 100)}, at=10.0)
    assert [rate["interface"] for rate in rates or []] == ["eth1"]
    # The reset value is the new baseline.
    rates = meter.update({"eth0": (1_300, 1_600), "eth1": (400, 100)}, at=20.0)
    assert rates is not None and rates[0] == {
        "interface": "eth0",
        "receive_bytes_per_second": 100.0,
        "transmit_bytes_per_second": 100.0,
    }


def test_only_resets_and_new_interfaces_give_null_not_an_empty_list() -> None:
    meter = NetworkMeter()
    meter.update({"eth0": (5_000, 5_000)}, at=0.0)
    assert meter.update({"eth0": (10, 10), "wg0": (10, 10)}, at=10.0) is None


def test_no_time_passed_gives_no_rate() -> None:
    meter = NetworkMeter()
    meter.update({"eth0": (0, 0)}, at=5.0)
    assert meter.update({"eth0": (100, 100)}, at=5.0) is None


def test_network_meter_reads_real_counters_with_its_clock() -> None:
    now = iter([10.0, 12.0])
    meter = NetworkMeter(clock=lambda: next(now))
    assert meter.read() is None
    rates = meter.read()
    assert rates is not None
    assert {rate["interface"] for rate in rates} <= set(psutil.net_if_stats())
    assert all(rate["receive_bytes_per_second"] >= 0 for rate in rates)


# -- CPU -------------------------------------------------------------------------------------------------


def test_cpu_percent_between_two_reads() -> None:
    times = iter(
        [
            {"user": 100.0, "system": 50.0, "idle": 800.0, "iowait": 50.0, "guest": 20.0},
            # +30 user (of which 10 guest, already inside user), +10 system, +50 idle, +10 iowait.
            {"user": 130.0, "system": 60.0, "idle": 850.0, "iowait": 60.0, "guest": 30.0},
        ]
    )
    meter = CpuMeter(times=lambda: next(times))
    assert meter.read() is None
    assert meter.read() == pytest.approx(100.0 * 40 / 100)


def test_cpu_without_time_passed_is_null() -> None:
    same = {"user": 1.0, "idle": 1.0}
    meter = CpuMeter(times=lambda: same)
    meter.read()
    assert meter.read() is None


# -- memory and disks ------------------------------------------------------------------------------------


class _Memory(NamedTuple):
    total: int
    available: int
    used: int


def test_memory_used_is_total_minus_available() -> None:
    memory = read_memory(lambda: _Memory(total=100, available=30, used=50))
    assert memory == {"memory_used_bytes": 70, "memory_total_bytes": 100}


class _Partition(NamedTuple):
    device: str
    mountpoint: str
    fstype: str


def test_pseudo_filesystems_bind_mounted_files_and_repeated_devices_are_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    docker = tmp_path / "var-lib-docker"
    gone = tmp_path / "gone"
    for folder in (data, docker, gone):
        folder.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    partitions = [
        _Partition("/dev/vda1", "/", "ext4"),
        _Partition("tmpfs", "/dev/shm", "tmpfs"),
        _Partition("proc", "/proc", "proc"),
        _Partition("/dev/loop3", "/snap/core20/2015", "squashfs"),
        _Partition("overlay", str(docker), "overlay"),
        _Partition("/dev/vda1", str(hosts), "ext4"),  # a container's /etc/hosts
        _Partition("/dev/vda1", str(docker), "ext4"),  # the same disk again
        _Partition("/dev/vdb1", str(data), "xfs"),
        _Partition("/dev/vdc1", str(gone), "ext4"),
    ]

    def usage(path: str) -> Any:
        if path == str(gone):
            raise FileNotFoundError(path)  # unmounted between listing and stat
        return psutil.disk_usage(path)

    disks = read_disks(lambda: partitions, usage)
    assert [disk["mountpoint"] for disk in disks] == sorted(["/", str(data)])
    assert all(0 <= disk["used_bytes"] <= disk["total_bytes"] for disk in disks)


def test_real_disks_are_listed() -> None:
    disks = read_disks()
    assert disks, "psutil lists no real file system here"
    assert all(0 <= disk["used_bytes"] <= disk["total_bytes"] for disk in disks)


# -- containers (Docker Engine API on a unix socket) -----------------------------------------------------

CONTAINERS = [
    {
        "Id": "8dfafdbc3a40" + "0" * 52,
        "Names": ["/grafana"],
        "Image": "grafana/grafana:11.2.0",
        "Command": "/run.sh",
        "Created": 1741943213,
        "State": "running",
        "Status": "Up 2 hours",
        "Ports": [{"PrivatePort": 3000, "PublicPort": 3000, "Type": "tcp"}],
        "Labels": {"com.docker.compose.project": "aima"},
    },
    {
        "Id": "9cd87474be90" + "0" * 52,
        "Names": ["/kafka"],
        "Image": "apache/kafka:4.1.1",
        "Command": "/etc/kafka/docker/run",
        "Created": 1741943100,
        "State": "running",
        "Status": "Up 2 hours (healthy)",
        "Ports": [],
        "Labels": {},
    },
]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    status = 200
    requests: list[str]


class _DockerEngine(BaseHTTPRequestHandler):
    server: _UnixHTTPServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path == "/containers/json" and self.server.status == 200:
            status, body = 200, json.dumps(CONTAINERS).encode()
        elif self.server.status != 200:
            status, body = self.server.status, b'{"message":"server error"}'
        else:
            status, body = 404, b'{"message":"page not found"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Api-Version", "1.47")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # and the default would fail: a unix-socket client has no address


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A unix socket path must stay under about 100 bytes; pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="aima-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def docker_engine(short_dir: Path) -> Iterator[_UnixHTTPServer]:
    server = _UnixHTTPServer(str(short_dir / "docker.sock"), _DockerEngine)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_no_docker_socket_gives_null(no_docker: ContainerCounter) -> None:
    assert no_docker.read() is None
    assert no_docker.read() is None


def test_the_docker_engine_api_counts_running_containers(docker_engine: _UnixHTTPServer) -> None:
    counter = ContainerCounter(docker_engine.server_address)
    try:
        assert counter.read() == 2
        assert counter.read() == 2
    finally:
        counter.close()
    assert docker_engine.requests == ["/containers/json", "/containers/json"]


def test_a_docker_engine_error_is_raised(docker_engine: _UnixHTTPServer) -> None:
    docker_engine.status = 500
    counter = ContainerCounter(docker_engine.server_address)
    with pytest.raises(ContainerRuntimeError):
        counter.read()
    counter.close()


def test_a_socket_nobody_answers_is_null_and_counted_once_per_read(
    short_dir: Path, registry: CollectorRegistry
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "docker.sock"))  # bound, never listening: what a dead daemon leaves
    try:
        collector = SystemCollector(
            "node-1", SystemCollectorMetrics(registry), containers=ContainerCounter(stale.getsockname())
        )
        assert collector.collect({"containers"}) == []  # nothing measured, so no record
        assert collector.collect({"containers", "memory"})[0].value["containers_running"] is None
        assert _errors(registry, "containers") == 2
    finally:
        stale.close()


# -- scheduling ------------------------------------------------------------------------------------------


def test_groups_are_due_on_their_own_intervals() -> None:
    schedule = Schedule(
        SystemIntervals(), ["cpu", "memory", "disk", "network", "containers", "pods"], start=0.0
    )
    assert schedule.due(0.0) == {"cpu", "memory", "disk", "network", "containers", "pods"}
    assert schedule.due(5.0) == set()
    assert schedule.next_at() == 10.0
    assert schedule.due(10.0) == {"cpu", "memory"}
    assert schedule.due(20.0) == {"cpu", "memory"}
    assert schedule.due(30.0) == {"cpu", "memory", "network", "pods"}
    assert schedule.due(40.0) == {"cpu", "memory"}
    assert schedule.due(50.0) == {"cpu", "memory"}
    assert schedule.due(60.0) == {"cpu", "memory", "network", "containers", "pods"}
    for at in range(70, 300, 10):
        assert "disk" not in schedule.due(float(at))
    assert "disk" in schedule.due(300.0)


def test_a_late_tick_does_not_fire_the_missed_ones_back_to_back() -> None:
    schedule = Schedule(SystemIntervals(cpu_s=10), ["cpu"], start=0.0)
    schedule.due(0.0)
    assert schedule.due(35.0) == {"cpu"}  # three intervals late
    assert schedule.due(36.0) == set()
    assert schedule.next_at() == 45.0


def test_intervals_from_env() -> None:
    intervals = CollectorSettings.from_environ(
        {
            "AIMA_SYSTEM_CPU_INTERVAL_S": "2.5",
            "AIMA_SYSTEM_DISK_INTERVAL_S": "60",
            "AIMA_SYSTEM_PODS_INTERVAL_S": " ",
        }
    ).system_intervals()
    assert intervals == SystemIntervals(cpu_s=2.5, disk_s=60.0)
    with pytest.raises(ValueError, match="AIMA_SYSTEM_NETWORK_INTERVAL_S"):
        CollectorSettings.from_environ({"AIMA_SYSTEM_NETWORK_INTERVAL_S": "30s"})
    with pytest.raises(ValueError, match="AIMA_SYSTEM_MEMORY_INTERVAL_S"):
        CollectorSettings.from_environ({"AIMA_SYSTEM_MEMORY_INTERVAL_S": "0"})
    with pytest.raises(ValueError, match="memory_s"):
        SystemIntervals(memory_s=0)


class _FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _FakeService:
    """Service's stop protocol on a fake clock: waiting moves the clock instead of sleeping."""

    def __init__(self, clock: _FakeClock, until: float) -> None:
        self.clock, self.until = clock, until
        self.stopping = threading.Event()

    def wait(self, seconds: float) -> bool:
        self.clock.t += seconds
        if self.clock.t >= self.until:
            self.stopping.set()
        return self.stopping.is_set()


def _fake_collector(
    registry: CollectorRegistry, clock: _FakeClock, containers: ContainerCounter
) -> SystemCollector:
    cpu_reads = iter(range(1000))
    nic_reads = iter(range(1000))

    def cpu_times() -> dict[str, float]:
        n = next(cpu_reads)
        return {"user": 1.0 * n, "idle": 3.0 * n}  # 25 % busy between any two reads

    def counters() -> dict[str, tuple[int, int]]:
        n = next(nic_reads)
        return {"eth0": (1000 * n, 500 * n)}

    return SystemCollector(
        "node-1",
        SystemCollectorMetrics(registry),
        cpu=CpuMeter(cpu_times),
        network=NetworkMeter(counters, clock),
        disks=lambda: [{"mountpoint": "/", "used_bytes": 40, "total_bytes": 100}],
        memory=lambda: {"memory_used_bytes": 70, "memory_total_bytes": 100},
        containers=containers,
        now=lambda: T0,
    )


def test_the_loop_carries_only_the_groups_due_in_each_tick(
    registry: CollectorRegistry, no_docker: ContainerCounter
) -> None:
    clock = _FakeClock(1000.0)
    service = _FakeService(clock, until=1000.0 + 1.0 + 61.0)  # settle, then ticks at 0, 10, ... 60 s
    publisher = RecordingPublisher()
    loop(_fake_collector(registry, clock, no_docker), publisher, service, SystemIntervals(), clock)  # type: ignore[arg-type]

    samples = [value for _, _, name, value in publisher.records if name == "SystemSample"]
    assert len(samples) == 7
    assert {key for _, key, _, _ in publisher.records} == {"node-1"}
    assert all(s["cpu_utilization_percent"] == pytest.approx(25.0) for s in samples)
    assert all(s["memory_used_bytes"] == 70 for s in samples)
    assert [s["disks"] is not None for s in samples] == [True] + [False] * 6
    assert [s["networks"] is not None for s in samples] == [True, False, False, True, False, False, True]
    # Primed 1 s before the first tick, then 30 s between reads, 1000 and 500 bytes a read.
    assert samples[0]["networks"][0]["receive_bytes_per_second"] == pytest.approx(1000.0)
    assert samples[3]["networks"][0]["transmit_bytes_per_second"] == pytest.approx(500 / 30)
    assert all(s["containers_running"] is None for s in samples)
    assert registry.get_sample_value("aima_system_collector_samples_total") == 7
    assert (
        registry.get_sample_value(
            "aima_system_collector_collection_duration_seconds_count", {"group": "disk"}
        )
        == 1
    )


def test_a_collect_carries_only_what_was_asked(
    registry: CollectorRegistry, no_docker: ContainerCounter
) -> None:
    collector = _fake_collector(registry, _FakeClock(0.0), no_docker)
    collector.prime()
    (record,) = collector.collect({"memory"})
    assert record.topic_key == "system.samples" and record.record_name == "SystemSample"
    assert record.value == {
        "time": T0,
        "host": "node-1",
        "source": "psutil",
        "cpu_utilization_percent": None,
        "memory_used_bytes": 70,
        "memory_total_bytes": 100,
        "disks": None,
        "networks": None,
        "containers_running": None,
    }


def test_a_failing_group_is_null_and_counted_while_the_others_are_read(
    registry: CollectorRegistry, no_docker: ContainerCounter
) -> None:
    def broken() -> list[dict[str, Any]]:
        raise PermissionError("/proc/mounts")

    collector = _fake_collector(registry, _FakeClock(0.0), no_docker)
    collector.disks = broken
    (record,) = collector.collect({"disk", "memory"})
    assert record.value["disks"] is None and record.value["memory_used_bytes"] == 70
    assert _errors(registry, "disk") == 1


def test_a_failing_group_is_logged_when_it_starts_failing_not_every_time(
    registry: CollectorRegistry, no_docker: ContainerCounter, caplog: pytest.LogCaptureFixture
) -> None:
    failing = True

    def disks() -> list[dict[str, Any]]:
        if failing:
            raise PermissionError("/proc/mounts")
        return [{"mountpoint": "/", "used_bytes": 1, "total_bytes": 2}]

    collector = _fake_collector(registry, _FakeClock(0.0), no_docker)
    collector.disks = disks
    with caplog.at_level(logging.INFO, logger="producers"):
        for _ in range(3):
            collector.collect({"disk", "containers"})
        failing = False
        collector.collect({"disk"})
        failing = True
        collector.collect({"disk"})
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("reading failed") == 2
    assert messages.count("reading recovered") == 1
    assert messages.count("no Docker engine socket; containers_running stays null") == 1
    assert _errors(registry, "disk") == 4


def test_pods_are_keyed_by_namespace_and_name_and_api_errors_are_counted(
    registry: CollectorRegistry, no_docker: ContainerCounter
) -> None:
    kube = FakeKubernetes().start()
    collector = _fake_collector(registry, _FakeClock(0.0), no_docker)
    collector.pods = PodReader(K8sConfig(api_url=kube.url))
    try:
        assert "pods" in collector.groups
        records = collector.collect({"pods"})
        assert [r.key for r in records] == [f"{pod['namespace']}/{pod['pod']}" for pod in EXPECTED]
        assert {(r.topic_key, r.record_name) for r in records} == {("k8s.pods", "PodStatus")}
        kube.fail_with = 500
        (sample,) = collector.collect({"pods", "memory"})  # the host's sample still goes out
        assert sample.record_name == "SystemSample"
        assert _errors(registry, "pods") == 1
        kube.fail_with = None
        del kube.pods[0]["metadata"]["name"]
        assert len(collector.collect({"pods"})) == len(EXPECTED) - 1
        assert _errors(registry, "pods") == 2
    finally:
        collector.close()
        kube.stop()


# -- real readings ---------------------------------------------------------------------------------------


def test_real_psutil_readings_pass_validation(tmp_path: Path, registry: CollectorRegistry) -> None:
    publisher = RecordingPublisher()
    records = run(
        Settings(state_dir=tmp_path),
        once=True,
        publisher=publisher,  # type: ignore[arg-type]
        docker_socket=tmp_path / "no-docker.sock",
        registry=registry,
    )
    assert publisher.flushed == 1
    ((name, sample),) = records
    assert name == "SystemSample"
    check("SystemSample", sample)  # and RecordingPublisher encoded it with the codec
    assert publisher.records[0][:3] == ("system.samples", socket.gethostname(), "SystemSample")
    assert sample["source"] == "psutil"
    assert 0.0 <= sample["cpu_utilization_percent"] <= 100.0
    assert 0 < sample["memory_used_bytes"] <= sample["memory_total_bytes"] == psutil.virtual_memory().total
    assert sample["disks"] and sample["networks"]
    assert {rate["interface"] for rate in sample["networks"]} <= set(psutil.net_if_stats())
    assert sample["containers_running"] is None
    assert registry.get_sample_value("aima_system_collector_samples_total") == 1


def test_the_loop_needs_a_service(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="service"):
        run(Settings(state_dir=tmp_path), publisher=RecordingPublisher())  # type: ignore[arg-type]
