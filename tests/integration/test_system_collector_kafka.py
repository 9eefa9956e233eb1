"""The system collector's real psutil readings and a Kubernetes API's pods, through the real broker."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from producers.k8s import K8sConfig
from producers.publisher import Publisher
from producers.system import run
from tests.unit.test_k8s import EXPECTED, POD_METRICS, USAGE, FakeKubernetes

pytestmark = pytest.mark.integration


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes().start()
    yield server
    server.stop()


def _consume(settings: Settings, unique: str, topic_keys: list[str], expected: int) -> list[tuple[str, Any]]:
    """(message key, decoded record) of the first ``expected`` records on the topics, oldest first."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"g{unique}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic_name(settings, key) for key in topic_keys])
    codec = Codec()
    received: list[tuple[str, Any]] = []
    deadline = time.monotonic() + 60
    try:
        while len(received) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=1.0):
                assert message.error() is None, message.error()
                received.append((message.key().decode(), codec.decode(message.value())))
    finally:
        consumer.close()
    return received


def test_real_readings_arrive_plausible(topics: Settings, unique: str, tmp_path: Path) -> None:
    publisher = Publisher(topics, registry=CollectorRegistry(), source="system-test")
    returned = run(topics, once=True, publisher=publisher, docker_socket=tmp_path / "no-docker.sock")
    assert [name for name, _ in returned] == ["SystemSample"]
    assert publisher.delivered == 1 and publisher.failed == publisher.invalid == 0

    ((key, (name, sample)),) = _consume(topics, unique, ["system.samples"], expected=1)
    assert name == "aima.metrics.SystemSample"
    assert key == sample["host"] == socket.gethostname()
    assert sample["source"] == "psutil"
    assert 0.0 <= sample["cpu_utilization_percent"] <= 100.0
    assert 0 < sample["memory_used_bytes"] <= sample["memory_total_bytes"]
    assert sample["memory_total_bytes"] == psutil.virtual_memory().total
    assert len(sample["disks"]) >= 1
    for disk in sample["disks"]:
        assert 0 <= disk["used_bytes"] <= disk["total_bytes"]
        assert disk["mountpoint"] in {p.mountpoint for p in psutil.disk_partitions(all=False)}
    assert len(sample["networks"]) >= 1
    for rate in sample["networks"]:
        assert rate["interface"] in psutil.net_if_stats()
        # Plausible for one second of any NIC up to 400 Gbit/s.
        assert 0.0 <= rate["receive_bytes_per_second"] < 50e9
        assert 0.0 <= rate["transmit_bytes_per_second"] < 50e9
    # No Docker engine answers here: null, not zero.
    assert sample["containers_running"] is None
    # Sampled just now, in UTC.
    assert abs(sample["time"].timestamp() - time.time()) < 60


def test_pods_arrive_from_the_kubernetes_api(
    topics: Settings, unique: str, tmp_path: Path, kube: FakeKubernetes
) -> None:
    registry = CollectorRegistry()
    publisher = Publisher(topics, registry=registry, source="system-test")
    returned = run(
        topics,
        once=True,
        publisher=publisher,
        docker_socket=tmp_path / "no-docker.sock",
        k8s=K8sConfig(api_url=kube.url, token="t0k3n"),
        registry=registry,
    )
    assert [name for name, _ in returned] == ["SystemSample"] + ["PodStatus"] * len(EXPECTED)
    assert kube.requests[0][2]["Authorization"] == "Bearer t0k3n"

    received = _consume(topics, unique, ["k8s.pods"], expected=len(EXPECTED))
    assert len(received) == len(EXPECTED)
    by_key = {key: value for key, (name, value) in received if name == "aima.metrics.PodStatus"}
    assert set(by_key) == {f"{pod['namespace']}/{pod['pod']}" for pod in EXPECTED}
    for pod in EXPECTED:
        value = by_key[f"{pod['namespace']}/{pod['pod']}"]
        assert {k: value[k] for k in pod} == pod
        assert value["source"] == "kubernetes"
    assert registry.get_sample_value("aima_system_collector_pod_records_total") == len(EXPECTED)
    assert registry.get_sample_value("aima_system_collector_errors_total", {"kind": "pods"}) is None


def test_pod_usage_from_the_metrics_server_arrives_beside_the_status(
    topics: Settings, unique: str, tmp_path: Path
) -> None:
    kube = FakeKubernetes(pod_metrics=POD_METRICS).start()
    try:
        registry = CollectorRegistry()
        publisher = Publisher(topics, registry=registry, source="system-test")
        run(
            topics,
            once=True,
            publisher=publisher,
            docker_socket=tmp_path / "no-docker.sock",
            k8s=K8sConfig(api_url=kube.url, token="t0k3n"),
            registry=registry,
        )
        metrics_requests = [r for r in kube.requests if r[0] == "/apis/metrics.k8s.io/v1beta1/pods"]
        assert len(metrics_requests) == 1 and metrics_requests[0][2]["Authorization"] == "Bearer t0k3n"
    finally:
        kube.stop()
    received = _consume(topics, unique, ["k8s.pods"], expected=len(EXPECTED))
    by_pod = {value["pod"]: value for _, (name, value) in received if name == "aima.metrics.PodStatus"}
    assert set(by_pod) == {pod["pod"] for pod in EXPECTED}
    for name, value in by_pod.items():
        cpu, memory = USAGE.get(name, (None, None))
        assert value["cpu_usage_cores"] == (pytest.approx(cpu) if cpu is not None else None), name
        assert value["memory_usage_bytes"] == memory, name
    # Reported as the API does: 250m + 1200n cores, 512Mi + 1048576Ki.
    assert by_pod["worker-7d9f8b6c4d-x2k9p"]["memory_usage_bytes"] == 1_610_612_736
    assert registry.get_sample_value("aima_system_collector_errors_total", {"kind": "pod_usage"}) is None


def test_without_a_metrics_server_the_status_still_arrives_with_null_usage(
    topics: Settings, unique: str, tmp_path: Path, kube: FakeKubernetes
) -> None:
    registry = CollectorRegistry()
    publisher = Publisher(topics, registry=registry, source="system-test")
    run(
        topics,
        once=True,
        publisher=publisher,
        docker_socket=tmp_path / "no-docker.sock",
        k8s=K8sConfig(api_url=kube.url),
        registry=registry,
    )
    received = _consume(topics, unique, ["k8s.pods"], expected=len(EXPECTED))
    assert len(received) == len(EXPECTED)
    for _, (_, value) in received:
        assert value["cpu_usage_cores"] is None and value["memory_usage_bytes"] is None
    assert registry.get_sample_value("aima_system_collector_errors_total", {"kind": "pod_usage"}) == 1
    assert registry.get_sample_value("aima_system_collector_errors_total", {"kind": "pods"}) is None
