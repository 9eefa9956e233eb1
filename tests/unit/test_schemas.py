"""The Avro contract (avro/*.avsc) and the metric catalogue that points into it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus import catalogue, schemas
from bus.codec import Codec
from bus.topics import BY_KEY, SCHEMA_LOG_VALUES, TOPICS

T0 = datetime(2025, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
SKETCH = {"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [-230, -229, -115], "counts": [3.0, 1.0, 2.0]}

# One realistic record per schema; fields left out must take their defaults.
EXAMPLES: dict[str, dict[str, Any]] = {
    "GpuSample": {
        "time": T0, "host": "gpu-node-07", "gpu": 3, "gpu_uuid": "GPU-5c1b9a2e-7d0f-4c55-9f1e-2b8b1f0c9a11",
        "gpu_model": "NVIDIA H100 80GB HBM3", "mig_instance": None, "parent_gpu_uuid": None, "source": "nvml",
        "interval_group": "fast", "utilization_percent": 87.0, "memory_used_bytes": 61_203_283_968,
        "memory_total_bytes": 85_520_809_984, "memory_utilization_percent": 71.56,
        "memory_bandwidth_utilization_percent": 42.0, "temperature_celsius": 67.0, "power_watts": 512.3,
        "tensor_core_utilization_percent": 55.5, "pcie_tx_bytes_per_second": 1.2e9,
        "pcie_rx_bytes_per_second": 3.4e9, "energy_joules": 9.87654321e7, "sm_clock_hz": 1_980_000_000,
        "memory_clock_hz": 2_619_000_000, "throttle_reasons": ["sw_power_cap"], "ecc_corrected_errors": 0,
        "ecc_uncorrected_errors": 0, "xid_errors": [], "processes": [
            {"pid": 4242, "name": "python3", "used_memory_bytes": 60_129_542_144},
            {"pid": 4243, "name": None, "used_memory_bytes": None},
        ],
    },
    "SystemSample": {
        "time": T0, "host": "gpu-node-07", "source": "psutil", "cpu_utilization_percent": 23.5,
        "memory_used_bytes": 123_456_789_012, "memory_total_bytes": 540_000_000_000,
        "disks": [{"mountpoint": "/", "used_bytes": 120_000_000_000, "total_bytes": 480_000_000_000}],
        "networks": [
            {"interface": "eth0", "receive_bytes_per_second": 1.5e8, "transmit_bytes_per_second": 2e7},
        ],
        "containers_running": 12,
    },
    "JobEvent": {
        "time": T0, "job_id": "job-2025-0001", "event": "started", "project": "newsroom",
        "user": "u_4f9a1c0b7e2d", "service": "video-tagger", "queue": "gpu-large", "model": "clip-vit-l14",
        "host": "gpu-node-07", "gpu_count": 2, "gpu_model": "NVIDIA H100 80GB HBM3", "provider": "hetzner",
        "pricing": "on_demand", "media_minutes": None, "queue_wait_seconds": 42.5, "error": None,
        "source": "sdk",
    },
    "JobTimings": {
        "time": T0, "interval_start": T0 - timedelta(seconds=10), "job_id": "job-2025-0001",
        "project": "newsroom", "model": "clip-vit-l14", "host": "gpu-node-07", "kind": "data_transfer",
        "kernel": None, "direction": "h2d", "bytes": 1_073_741_824, "count": 250, "sum_seconds": 1.25,
        "min_seconds": 0.003, "max_seconds": 0.011, "sketch": SKETCH, "source": "sdk",
    },
    "QueueSample": {"time": T0, "queue": "gpu-large", "length_jobs": 17, "source": "simulator"},
    "PodStatus": {
        "time": T0, "namespace": "aima", "pod": "tagger-6d9f7b-xk2lp", "host": "gpu-node-07",
        "phase": "Running", "ready": True, "restarts": 1, "source": "kubernetes",
    },
    "Rollup": {
        "series": 'gpu_power_watts{gpu="3",host="gpu-node-07"}', "metric": "gpu_power_watts",
        "labels": {"host": "gpu-node-07", "gpu": "3"}, "tier": "hour",
        "bucket_start": datetime(2025, 3, 14, 9, tzinfo=UTC),
        "bucket_end": datetime(2025, 3, 14, 10, tzinfo=UTC),
        "count": 120, "min": 180.0, "max": 690.5, "sum": 60000.0, "avg": 500.0, "p95": 680.1,
        "sketch": SKETCH,
        "final": False, "watermark": T0, "source": "stream",
    },
    "RollupPartial": {
        "time": T0, "sender_topic": "job.events", "sender_partition": 2, "closed_before": None,
        "rollup": {
            "series": 'job_queue_wait_seconds{project="newsroom",queue="gpu-large"}',
            "metric": "job_queue_wait_seconds", "labels": {"project": "newsroom", "queue": "gpu-large"},
            "tier": "hour", "bucket_start": datetime(2025, 3, 14, 9, tzinfo=UTC),
            "bucket_end": datetime(2025, 3, 14, 10, tzinfo=UTC), "count": 6, "min": 1.5, "max": 42.5,
            "sum": 90.0, "avg": 15.0, "p95": 42.1, "sketch": SKETCH, "final": False, "watermark": T0,
            "source": "stream",
        },
        "source": "stream",
    },
    "CostRecord": {
        "time": datetime(2025, 3, 1, tzinfo=UTC), "period_end": datetime(2025, 4, 1, tzinfo=UTC),
        "kind": "budget", "project": "newsroom", "budget": "newsroom-monthly", "budget_eur": 10_000.0,
        "budget_utilization_percent": 43.2, "forecast_eur": 9_100.0, "source": "stream",
    },
    "GpuEnergy": {
        "time": datetime(2025, 3, 14, 9, tzinfo=UTC), "period_end": datetime(2025, 3, 14, 10, tzinfo=UTC),
        "gpu_uuid": "GPU-5c1b", "gpu_model": "NVIDIA H100 80GB HBM3", "device_hours": 1.0,
        "energy_kwh": 0.42, "energy_cost_eur": 0.126, "currency": "EUR", "source": "stream",
    },
    "AlertEvent": {
        "fingerprint": "8c1f0e3a9b7d2c4e", "rule": "gpu_temperature_high", "status": "firing",
        "severity": "critical", "starts_at": T0, "ends_at": None, "event_time": T0, "value": 88.0,
        "labels": {"host": "gpu-node-07", "gpu": "3"}, "annotations": {"summary": "GPU 3 is at 88 °C"},
        "channels": ["slack", "webhook"], "source": "stream",
    },
    "Anomaly": {
        "time": T0, "series": 'queue_length_jobs{queue="gpu-large"}', "metric": "queue_length_jobs",
        "labels": {"queue": "gpu-large"}, "value": 140.0, "expected": 12.0, "score": 9.3,
        "method": "ewma_zscore", "source": "stream",
    },
    "DeadLetter": {
        "time": T0, "stage": "stream", "origin_topic": "aima.gpu.samples", "origin_partition": 5,
        "origin_offset": 1_234_567, "key": b"gpu-node-07/GPU-5c1b", "value": b"\xc3\x01garbage",
        "reason": "no known writer schema has fingerprint 0011223344556677",
        "error_type": "UnknownFingerprint", "source": "stream",
    },
}  # fmt: skip


def _fields(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every field of a record, nested records (also inside arrays and unions) included, by path."""
    found = []
    for field in schema["fields"]:
        here = f"{path}{field['name']}"
        found.append((here, field))
        for inner, suffix in _records_in(field["type"]):
            found += _fields(inner, f"{here}{suffix}.")
    return found


def _records_in(type_: Any, suffix: str = "") -> list[tuple[dict[str, Any], str]]:
    if isinstance(type_, list):
        return [found for branch in type_ for found in _records_in(branch, suffix)]
    if isinstance(type_, dict) and type_.get("type") == "record":
        return [(type_, suffix)]
    if isinstance(type_, dict) and type_.get("type") == "array":
        return _records_in(type_["items"], suffix + "[]")
    return []


def _non_null(type_: Any) -> Any:
    if isinstance(type_, list):
        branches = [branch for branch in type_ if branch != "null"]
        return branches[0] if len(branches) == 1 else type_
    return type_


def test_one_schema_per_topic_and_record() -> None:
    expected = {f"aima.metrics.{name}" for name in EXAMPLES}
    assert set(schemas.names()) == expected
    assert {topic.schema for topic in TOPICS if topic.key != "schemas"} <= expected
    assert BY_KEY["schemas"].schema == SCHEMA_LOG_VALUES  # the schemas themselves, not a record
    for name in schemas.names():
        raw = schemas.raw(name)
        assert raw["namespace"] == "aima.metrics"
        assert raw.get("doc")
        assert "schema_version" not in {field["name"] for field in raw["fields"]}
        assert "source" in {field["name"] for field in raw["fields"]}, name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_round_trips(name: str) -> None:
    codec = Codec()
    data = codec.encode(name, EXAMPLES[name])
    full_name, value = codec.decode(data)
    assert full_name == f"aima.metrics.{name}"
    defaults = {
        field["name"]: field["default"] for field in schemas.raw(name)["fields"] if "default" in field
    }
    assert value == {**defaults, **EXAMPLES[name]}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_field_has_a_doc_with_its_unit(name: str) -> None:
    for path, field in _fields(schemas.raw(name)):
        doc = field.get("doc", "")
        assert doc.strip(), f"{name}.{path} has no doc"
        assert "unit:" in doc or "milliseconds since the Unix epoch" in doc, (
            f"{name}.{path} doc names no unit"
        )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_timestamps_and_optionals_follow_the_conventions(name: str) -> None:
    for path, field in _fields(schemas.raw(name)):
        type_ = field["type"]
        if isinstance(type_, list):
            assert type_[0] == "null" and len(type_) == 2, f"{name}.{path}: optional is ['null', T]"
            assert field.get("default", "missing") is None, f"{name}.{path}: optional defaults to null"
        inner = _non_null(type_)
        if isinstance(inner, dict) and inner.get("logicalType"):
            assert inner == {"type": "long", "logicalType": "timestamp-millis"}, f"{name}.{path}"
        if path in {"time", "starts_at", "ends_at", "event_time", "bucket_start", "bucket_end", "watermark"}:
            assert isinstance(inner, dict) and inner.get("logicalType") == "timestamp-millis", (
                f"{name}.{path}"
            )


def _schema_field(record: str, path: str) -> dict[str, Any]:
    """The field at ``path`` (``a``, ``items[].b``) of a schema; KeyError naming what is missing."""
    by_path = dict(_fields(schemas.raw(record)))
    if path not in by_path:
        raise KeyError(f"{record} has no field {path!r}; fields: {', '.join(by_path)}")
    return by_path[path]


@pytest.mark.parametrize("metric", catalogue.METRICS, ids=lambda metric: metric.name)
def test_catalogue_points_at_one_existing_field(metric: catalogue.Metric) -> None:
    field = _schema_field(metric.record, metric.field)
    assert _non_null(field["type"]) in {"int", "long", "double", "float", "boolean"}, "value must be numeric"
    for label_path in metric.label_fields:
        _schema_field(metric.record, label_path)
    for key, value in metric.where:
        selector = _non_null(_schema_field(metric.record, key)["type"])
        if isinstance(selector, dict) and selector.get("type") == "enum":
            assert value in selector["symbols"], f"{metric.name}: {key}={value!r} is not a symbol"
    if metric.type == "summary":
        for part in ("count", "sum_seconds", "min_seconds", "max_seconds", "sketch"):
            _schema_field(metric.record, part)


def test_catalogue_covers_every_requirement_row_with_unique_names() -> None:
    assert {metric.req_id for metric in catalogue.METRICS} >= {f"M{n}" for n in range(1, 27)}
    assert len(catalogue.BY_NAME) == len(catalogue.METRICS)
    for metric in catalogue.METRICS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", metric.name), metric.name
        assert catalogue.get(metric.name) is metric
    m8 = {m.name for m in catalogue.METRICS if m.req_id == "M8"}
    m19 = {m.name for m in catalogue.METRICS if m.req_id == "M19"}
    assert m8 == {"gpu_pcie_tx_bytes_per_second", "gpu_pcie_rx_bytes_per_second"}
    assert m19 == {"host_network_receive_bytes_per_second", "host_network_transmit_bytes_per_second"}
    assert "gpu_memory_bandwidth_utilization_percent" in catalogue.BY_NAME


def test_catalogue_helpers() -> None:
    disk = catalogue.get("host_disk_used_bytes")
    assert disk.label_fields == ("host", "disks[].mountpoint")
    assert disk.interval_seconds == 300
    frames = catalogue.get("job_frame_processing_seconds")
    assert frames.interval_seconds is None
    assert frames.selects({"kind": "frame"}) and not frames.selects({"kind": "batch"})
    with pytest.raises(catalogue.UnknownMetric, match="gpu_utilization_percent") as raised:
        catalogue.get("gpu_utilization")
    assert isinstance(raised.value, KeyError)


def test_fingerprints_are_eight_bytes_and_distinct() -> None:
    prints = {name: schemas.fingerprint(name) for name in schemas.names()}
    assert all(len(value) == 8 for value in prints.values())
    assert len(set(prints.values())) == len(prints)
    assert schemas.fingerprint("GpuSample") == schemas.fingerprint("aima.metrics.GpuSample")
    with pytest.raises(KeyError, match="unknown Avro record"):
        schemas.load("NoSuchRecord")
