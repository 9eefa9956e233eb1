"""The GPU collector, run once against the NVML fake, through a real Publisher and the real broker: every
record decodes, is keyed host/gpu_uuid, and carries every catalogue GPU metric exactly where the fake
device supports it (null elsewhere, never 0)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry

from bus.catalogue import METRICS
from bus.codec import Codec
from bus.kafka import client_config
from bus.settings import Settings
from bus.topics import topic_name
from producers.gpu.collector import run
from producers.publisher import Publisher
from tests.fakes.nvml import FakeNvml, FakeProcess, a100, h100, mig

pytestmark = pytest.mark.integration

HOST = "itest-gpu-host"
# The top-level fields; per-process memory (an item of processes) is checked below.
GPU_METRICS = [m for m in METRICS if m.record == "aima.metrics.GpuSample" and "[]." not in m.field]


def _consume(settings: Settings, group: str, expected: int) -> list[Any]:
    consumer = Consumer(client_config(settings, **{"group.id": group, "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic_name(settings, "gpu.samples")])
    messages: list[Any] = []
    deadline = time.monotonic() + 60
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=1.0):
                assert message.error() is None, message.error()
                messages.append(message)
    finally:
        consumer.close()
    return messages


def test_collector_once_publishes_decodable_samples_with_catalogue_metrics(
    topics: Settings, unique: str
) -> None:
    ampere = a100(
        0, unsupported={"nvmlDeviceGetTotalEccErrors"}, processes=[FakeProcess(11, "train", 1 << 30)]
    )
    hopper = h100(1, mig_mode=True, migs=[mig(1, 1), mig(1, 2, processes=[FakeProcess(12, "infer", None)])])
    nvml = FakeNvml([ampere, hopper])
    registry = CollectorRegistry()
    publisher = Publisher(topics, registry=registry, source="gpu-collector-test")

    pairs = run(topics, once=True, nvml=nvml, publisher=publisher, host=HOST, registry=registry)

    assert len(pairs) == 2 * 4  # fast and slow for two GPUs and two MIG instances
    assert (publisher.delivered, publisher.failed, publisher.invalid) == (len(pairs), 0, 0)

    codec = Codec()
    received: dict[tuple[str, str], dict[str, Any]] = {}
    for message in _consume(topics, f"g{unique}", len(pairs)):
        name, value = codec.decode(message.value())
        assert name == "aima.metrics.GpuSample"
        assert message.key().decode() == f"{HOST}/{value['gpu_uuid']}"
        assert value["source"] == "nvml" and value["host"] == HOST
        received[(value["gpu_uuid"], value["interval_group"])] = value
    assert set(received) == {(value["gpu_uuid"], value["interval_group"]) for _, value in pairs}

    # What each entity lacks, from the fake's configuration (not from the collector's probe).
    mig_has = {
        "memory_used_bytes",
        "memory_utilization_percent",
        "tensor_core_utilization_percent",
        "utilization_percent",  # SM activity from GPM per GPU instance
    }
    missing = {
        ampere.uuid: {"tensor_core_utilization_percent", "ecc_corrected_errors", "ecc_uncorrected_errors"},
        # In MIG mode NVML has no utilization rates for the parent; its utilization is GPM SM activity.
        hopper.uuid: {"memory_bandwidth_utilization_percent"},
        **{instance.uuid: {m.field for m in GPU_METRICS} - mig_has for instance in hopper.migs},
    }
    for uuid, lacks in missing.items():
        values: dict[str, Any] = {}
        for (record_uuid, _group), value in received.items():
            if record_uuid == uuid:
                values.update({k: v for k, v in value.items() if v is not None})
        for metric in GPU_METRICS:
            if metric.field in lacks:
                assert metric.field not in values, f"{uuid} {metric.name} should be null"
            else:
                assert metric.field in values, f"{uuid} {metric.name} missing"

    for instance in hopper.migs:
        fast = received[(instance.uuid, "fast")]
        assert fast["parent_gpu_uuid"] == hopper.uuid and fast["gpu"] == 1
        assert fast["mig_instance"] == f"gi{instance.gpu_instance_id}/ci0"
    assert received[(hopper.migs[1].uuid, "slow")]["processes"] == [
        {"pid": 12, "name": "infer", "used_memory_bytes": None}
    ]
    assert received[(ampere.uuid, "slow")]["xid_errors"] == []
    assert received[(hopper.migs[0].uuid, "slow")]["xid_errors"] is None
