"""The database side on the real Kafka broker and PostgreSQL: migrations, the sink (every record kind, twice
delivered, poison, a PostgreSQL outage) and retention."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry
from psycopg import sql
from pydantic import SecretStr

from bus.catalogue import METRICS
from bus.codec import Codec
from bus.runtime import Service
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name
from consumers import sink
from consumers.migrate import migrate
from consumers.retention import apply_retention
from consumers.tables import TABLES

pytestmark = pytest.mark.integration

CODEC = Codec()
NOW = datetime.now(UTC).replace(microsecond=0)
SKETCH = {"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [10, 11], "counts": [2.0, 3.0]}


# -- records of every kind -------------------------------------------------------------------------------


def gpu_sample(i: int, host: str = "gpu-host-1", mig: str | None = None) -> dict[str, Any]:
    return {
        "time": NOW - timedelta(seconds=10 * i),
        "host": host,
        "gpu": i % 2,
        "gpu_uuid": f"GPU-{i % 2}" if mig is None else "MIG-7",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "mig_instance": mig,
        "parent_gpu_uuid": None if mig is None else "GPU-0",
        "source": "test",
        "interval_group": "fast",
        "utilization_percent": float(i % 100),
        "memory_used_bytes": 1_000_000 + i,
        "memory_total_bytes": 80_000_000_000,
        "memory_utilization_percent": 12.5,
        "memory_bandwidth_utilization_percent": None,
        "temperature_celsius": 61.0,
        "power_watts": 350.5,
        "tensor_core_utilization_percent": None,
        "pcie_tx_bytes_per_second": 1e9,
        "pcie_rx_bytes_per_second": 2e9,
        "energy_joules": 1e6 + i,
        "sm_clock_hz": 1_980_000_000,
        "memory_clock_hz": 2_619_000_000,
        "throttle_reasons": ["sw_power_cap"],
        "ecc_corrected_errors": 0,
        "ecc_uncorrected_errors": 0,
        "xid_errors": [],
        "processes": [{"pid": 4242, "name": "python", "used_memory_bytes": 1_000_000}],
    }


def every_kind() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(topic key, message key, record name, value): at least one record of each kind."""
    t = NOW - timedelta(minutes=5)
    hour = t.replace(minute=0, second=0)
    timing = {
        "time": t,
        "interval_start": t - timedelta(seconds=10),
        "job_id": "job-1",
        "project": "proj-a",
        "model": "yolo",
        "host": "gpu-host-1",
        "kernel": None,
        "direction": None,
        "bytes": None,
        "count": 5,
        "sum_seconds": 0.5,
        "min_seconds": 0.05,
        "max_seconds": 0.2,
        "sketch": SKETCH,
        "source": "test",
    }
    cost = {
        "time": hour,
        "period_end": hour + timedelta(hours=1),
        "kind": "gpu_hours",
        "project": "proj-a",
        "gpu_model": "H100",
        "provider": "cloud-x",
        "pricing": "on_demand",
        "job_id": None,
        "budget": None,
        "gpu_hours": 2.0,
        "device_hours": 4.0,
        "idle_gpu_hours": None,
        "cost_estimated_eur": 6.0,
        "job_cost_eur": None,
        "job_cost_per_media_minute_eur": None,
        "budget_eur": None,
        "budget_utilization_percent": None,
        "forecast_eur": None,
        "currency": "EUR",
        "source": "test",
    }
    rollup = {
        "series": 'gpu_power_watts{host="gpu-host-1"}',
        "metric": "gpu_power_watts",
        "labels": {"host": "gpu-host-1"},
        "tier": "hour",
        "bucket_start": hour,
        "bucket_end": hour + timedelta(hours=1),
        "count": 10,
        "min": 300.0,
        "max": 360.0,
        "sum": 3300.0,
        "avg": 330.0,
        "p95": 355.0,
        "sketch": SKETCH,
        "final": False,
        "watermark": t,
        "source": "test",
    }
    return [
        ("gpu.samples", "gpu-host-1/GPU-0", "GpuSample", gpu_sample(0)),
        ("gpu.samples", "gpu-host-1/GPU-1", "GpuSample", gpu_sample(1)),
        ("gpu.samples", "gpu-host-1/MIG-7", "GpuSample", gpu_sample(2, mig="1g.10gb:gi1")),
        (
            "system.samples",
            "gpu-host-1",
            "SystemSample",
            {
                "time": t,
                "host": "gpu-host-1",
                "source": "test",
                "cpu_utilization_percent": 42.0,
                "memory_used_bytes": 8_000_000_000,
                "memory_total_bytes": 64_000_000_000,
                "disks": [
                    {"mountpoint": "/", "used_bytes": 10_000, "total_bytes": 100_000},
                    {"mountpoint": "/data", "used_bytes": 20_000, "total_bytes": 200_000},
                ],
                "networks": [
                    {"interface": "eth0", "receive_bytes_per_second": 1e6, "transmit_bytes_per_second": 2e6}
                ],
                "containers_running": 7,
            },
        ),
        ("job.timings", "job-1", "JobTimings", timing | {"kind": "frame"}),
        ("job.timings", "job-1", "JobTimings", timing | {"kind": "cuda_kernel", "kernel": "gemm_fp16"}),
        (
            "job.timings",
            "job-1",
            "JobTimings",
            timing | {"kind": "data_transfer", "direction": "h2d", "bytes": 1_000_000},
        ),
        (
            "job.events",
            "job-1",
            "JobEvent",
            {
                "time": t,
                "job_id": "job-1",
                "event": "started",
                "project": "proj-a",
                "user": "u-3f9a",
                "service": "media",
                "queue": "gpu-large",
                "model": "yolo",
                "host": "gpu-host-1",
                "gpu_count": 1,
                "gpu_model": "H100",
                "provider": "cloud-x",
                "pricing": "spot",
                "media_minutes": None,
                "queue_wait_seconds": 12.5,
                "error": None,
                "source": "test",
            },
        ),
        (
            "queue.samples",
            "gpu-large",
            "QueueSample",
            {"time": t, "queue": "gpu-large", "length_jobs": 3, "source": "test"},
        ),
        (
            "k8s.pods",
            "media/worker-0",
            "PodStatus",
            {
                "time": t,
                "namespace": "media",
                "pod": "worker-0",
                "host": "gpu-host-1",
                "phase": "Running",
                "ready": True,
                "restarts": 2,
                "source": "test",
                # From the Metrics Server (producers/k8s_usage.py).
                "cpu_usage_cores": 0.25,
                "memory_usage_bytes": 512 * 2**20,
            },
        ),
        ("rollups", "r1", "Rollup", rollup),
        ("costs", "proj-a", "CostRecord", cost),
        (
            "costs",
            "proj-a",
            "CostRecord",
            cost
            | {
                "kind": "job_cost",
                "gpu_model": None,
                "provider": None,
                "pricing": None,
                "job_id": "job-1",
                "gpu_hours": None,
                "device_hours": None,
                "cost_estimated_eur": None,
                "job_cost_eur": 3.25,
                "job_cost_per_media_minute_eur": 0.1,
            },
        ),
        (
            "costs",
            "proj-a",
            "CostRecord",
            cost
            | {
                "kind": "budget",
                "gpu_model": None,
                "provider": None,
                "pricing": None,
                "budget": "monthly",
                "gpu_hours": None,
                "device_hours": None,
                "cost_estimated_eur": None,
                "budget_eur": 1000.0,
                "budget_utilization_percent": 12.0,
                "forecast_eur": 900.0,
            },
        ),
        (
            "energy",
            "GPU-0|hour",
            "GpuEnergy",
            {
                "time": hour,
                "period_end": hour + timedelta(hours=1),
                "gpu_uuid": "GPU-0",
                "gpu_model": "NVIDIA H100 80GB HBM3",
                "device_hours": 1.0,
                "energy_kwh": 0.5,
                "energy_cost_eur": 0.15,
                "currency": "EUR",
                "source": "stream",
            },
        ),
        (
            "alerts",
            "fp-1",
            "AlertEvent",
            {
                "fingerprint": "fp-1",
                "rule": "gpu_hot",
                "status": "firing",
                "severity": "critical",
                "starts_at": t,
                "ends_at": None,
                "event_time": t,
                "value": 90.0,
                "labels": {"host": "gpu-host-1"},
                "annotations": {"summary": "hot"},
                "channels": ["webhook"],
                "source": "test",
            },
        ),
        (
            "anomalies",
            "s1",
            "Anomaly",
            {
                "time": t,
                "series": 'gpu_power_watts{host="gpu-host-1"}',
                "metric": "gpu_power_watts",
                "labels": {"host": "gpu-host-1"},
                "value": 900.0,
                "expected": 350.0,
                "score": 8.5,
                "method": "ewma_zscore",
                "source": "test",
            },
        ),
        (
            "deadletter",
            "aima.gpu.samples",
            "DeadLetter",
            {
                "time": t,
                "stage": "producer",
                "origin_topic": "aima.gpu.samples",
                "origin_partition": None,
                "origin_offset": None,
                "key": b"k",
                "value": b"{}",
                "reason": "utilization_percent: 140 > 100",
                "error_type": "InvalidRecord",
                "source": "producer",
            },
        ),
    ]


# Rows each table gets from every_kind(), once.
EXPECTED_ROWS = {
    "gpu_samples": 3,
    "gpu_process_samples": 3,  # one process in each GPU sample
    "system_samples": 1,
    "system_disk_samples": 2,
    "system_network_samples": 1,
    "job_timings": 3,
    "job_events": 1,
    "queue_samples": 1,
    "pod_status": 1,
    "rollups": 1,
    "costs": 3,
    "gpu_energy": 1,
    "alert_history": 1,
    "anomalies": 1,
    "dead_letters": 1,
}


# -- helpers ---------------------------------------------------------------------------------------------


def produce(settings: Settings, records: list[tuple[str, str, str, Any]]) -> None:
    """Publish (topic key, key, record name, value); a bytes value goes out as it is (poison)."""
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    failed: list[object] = []
    for topic_key, key, name, value in records:
        topic = topic_name(settings, topic_key)
        data = value if isinstance(value, bytes) else CODEC.encode(name, value, topic)
        producer.produce(topic, value=data, key=key.encode(), on_delivery=lambda e, m: e and failed.append(e))
        producer.poll(0)
    assert producer.flush(30) == 0 and failed == []


@contextlib.contextmanager
def running_sink(settings: Settings, schema: str, **options: Any) -> Iterator[tuple[Service, dict[str, Any]]]:
    """The sink in a thread; on leaving, stops it, joins it and re-raises what it raised."""
    registry = CollectorRegistry()
    service = Service("sink", settings, registry=registry)
    outcome: dict[str, Any] = {"registry": registry}
    options = {"batch_timeout_s": 0.2, "group_id": f"sink-{settings.topic_prefix}", **options}

    def target() -> None:
        try:
            outcome["stats"] = sink.run(
                settings, service=service, schema=schema, registry=registry, **options
            )
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="sink", daemon=True)
    thread.start()
    try:
        yield service, outcome
    finally:
        service.stopping.set()
        thread.join(90)
        assert not thread.is_alive(), "the sink did not stop"
    if "error" in outcome:
        raise outcome["error"]


def wait_until(check: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        t.name: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t.name))).fetchone()[0]
        for t in TABLES
    }


def metric_total(registry: CollectorRegistry, name: str) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


# -- migrations ------------------------------------------------------------------------------------------


def test_migrations_create_every_table_and_view(db: psycopg.Connection, db_schema: str) -> None:
    relations = dict(
        db.execute(
            "SELECT relname, relkind FROM pg_class WHERE relnamespace = %s::regnamespace", (db_schema,)
        ).fetchall()
    )
    for table in TABLES:
        assert relations.get(table.name) in ("r", "p"), table.name
        columns = {
            name
            for (name,) in db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (db_schema, table.name),
            )
        }
        assert set(table.column_names) <= columns, (table.name, set(table.column_names) - columns)
    for name in ("retention_policies", "api_tokens", "audit_log"):
        assert relations.get(name) == "r", name
    for view in ("budgets", "metrics_long", *(m.name for m in METRICS)):
        assert relations.get(view) == "v", view
    mode = db.execute("SELECT mode FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()[0]
    if mode == "postgres":
        partitioned = {
            name
            for (name,) in db.execute(
                "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
                "WHERE c.relnamespace = %s::regnamespace",
                (db_schema,),
            )
        }
        raw = {r for (r,) in db.execute("SELECT relation FROM retention_policies WHERE tier = ''")}
        assert partitioned == raw
        today = NOW.date()
        for day in (today - timedelta(days=1), today, today + timedelta(days=7)):
            assert relations.get(f"gpu_samples_p{day:%Y%m%d}") == "r"
        assert relations.get("gpu_samples_default") == "r"
    # Every view answers (empty) with time and value first.
    for metric in METRICS:
        cursor = db.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(sql.Identifier(metric.name)))
        names = [c.name for c in cursor.description]
        assert names == ["time", "value", *metric.labels], metric.name


# -- the sink --------------------------------------------------------------------------------------------


def test_sink_stores_every_kind_once(topics: Settings, db_schema: str, db: psycopg.Connection) -> None:
    records = every_kind()
    produce(topics, records)
    produce(topics, records)  # delivered twice
    started = time.monotonic()
    with running_sink(topics, db_schema) as (_, outcome):
        wait_until(lambda: counts(db) == EXPECTED_ROWS, what="every record stored")
        wait_until(lambda: outcome["registry"].get_sample_value("aima_sink_batches_total") >= 1)
        # Lag per partition is exported (and, everything read, zero).
        wait_until(
            lambda: any(
                s.name == "aima_sink_consumer_lag_records" and s.labels["topic"].endswith("gpu.samples")
                for m in outcome["registry"].collect()
                for s in m.samples
            ),
            what="lag samples",
        )
        assert metric_total(outcome["registry"], "aima_sink_consumer_lag_records") == 0
    assert outcome["stats"].records == 2 * len(records)
    elapsed = time.monotonic() - started

    # A second consumer group reads everything again: still stored once.
    with running_sink(topics, db_schema, group_id=f"again-{topics.topic_prefix}") as (_, again):
        wait_until(
            lambda: (
                again["registry"].get_sample_value(
                    "aima_sink_records_total", {"topic": topic_name(topics, "deadletter")}
                )
                == 2
            ),
            what="re-read",
        )
    assert again["stats"].records == 2 * len(records)
    assert counts(db) == EXPECTED_ROWS

    rows = db.execute(
        "SELECT time, value, host, gpu, mig_instance FROM gpu_utilization_percent ORDER BY time"
    ).fetchall()
    assert rows == [
        (NOW - timedelta(seconds=20), 2.0, "gpu-host-1", "0", "1g.10gb:gi1"),
        (NOW - timedelta(seconds=10), 1.0, "gpu-host-1", "1", None),
        (NOW, 0.0, "gpu-host-1", "0", None),
    ]
    assert db.execute("SELECT count(*) FROM gpu_tensor_core_utilization_percent").fetchone()[0] == 0  # null
    disks = db.execute("SELECT mountpoint, value FROM host_disk_used_bytes ORDER BY mountpoint").fetchall()
    assert disks == [("/", 10_000.0), ("/data", 20_000.0)]
    assert db.execute("SELECT value, namespace, pod, phase FROM k8s_pod_status").fetchall() == [
        (1.0, "media", "worker-0", "Running")
    ]
    assert db.execute("SELECT value, namespace, pod FROM k8s_pod_cpu_usage_cores").fetchall() == [
        (0.25, "media", "worker-0")
    ]
    assert db.execute("SELECT value, namespace, pod FROM k8s_pod_memory_usage_bytes").fetchall() == [
        (float(512 * 2**20), "media", "worker-0")
    ]
    assert db.execute("SELECT value, queue, project FROM job_queue_wait_seconds").fetchall() == [
        (12.5, "gpu-large", "proj-a")
    ]
    assert db.execute("SELECT value, job_id, kernel FROM cuda_kernel_duration_seconds").fetchall() == [
        (0.5, "job-1", "gemm_fp16")
    ]
    assert db.execute("SELECT value, direction FROM job_data_transfer_bytes").fetchall() == [(1e6, "h2d")]
    assert db.execute("SELECT value, project, budget FROM budget_utilization_percent").fetchall() == [
        (12.0, "proj-a", "monthly")
    ]
    assert db.execute("SELECT project, budget, spent_eur FROM budgets").fetchall() == [
        ("proj-a", "monthly", 120.0)
    ]
    labels = db.execute(
        "SELECT labels FROM metrics_long WHERE metric = 'gpu_power_watts' AND labels ? 'mig_instance'"
    ).fetchall()
    assert labels == [
        (
            {
                "host": "gpu-host-1",
                "gpu": "0",
                "gpu_uuid": "MIG-7",
                "gpu_model": "NVIDIA H100 80GB HBM3",
                "mig_instance": "1g.10gb:gi1",
            },
        )
    ]
    by_metric = dict(db.execute("SELECT metric, count(*) FROM metrics_long GROUP BY metric").fetchall())
    assert by_metric["gpu_power_watts"] == 3 and by_metric["host_network_transmit_bytes_per_second"] == 1
    assert db.execute("SELECT stage, letter_partition IS NOT NULL FROM dead_letters").fetchall() == [
        ("producer", True)
    ]
    assert elapsed < 60


def test_newer_rollups_and_costs_win(topics: Settings, db_schema: str, db: psycopg.Connection) -> None:
    records = {name: value for _, _, name, value in every_kind() if name in ("Rollup", "CostRecord")}
    rollup = records["Rollup"]
    budget = next(v for _, _, n, v in every_kind() if n == "CostRecord" and v["kind"] == "budget")
    later = rollup["watermark"] + timedelta(minutes=1)
    produce(
        topics,
        [
            ("rollups", "r", "Rollup", rollup | {"count": 11, "watermark": later}),
            ("rollups", "r", "Rollup", rollup | {"count": 12, "final": True, "watermark": later}),
            ("rollups", "r", "Rollup", rollup | {"count": 99}),  # an older emission, late: loses
            ("costs", "proj-a", "CostRecord", budget | {"budget_utilization_percent": 20.0}),
            ("costs", "proj-a", "CostRecord", budget | {"budget_utilization_percent": 30.0}),
        ],
    )
    with running_sink(topics, db_schema, topics=("rollups", "costs")):
        wait_until(
            lambda: (
                db.execute("SELECT count(*) FROM rollups").fetchone()[0] == 1
                and db.execute("SELECT count(*) FROM costs").fetchone()[0] == 1
            ),
            what="upserts",
        )
        time.sleep(1.0)
    assert db.execute("SELECT count, final FROM rollups").fetchall() == [(12, True)]
    assert db.execute("SELECT budget_utilization_percent FROM costs").fetchall() == [(30.0,)]


def test_poison_goes_to_dead_letters_and_the_rest_is_stored(
    topics: Settings, db_schema: str, db: psycopg.Connection
) -> None:
    good = [("gpu.samples", "h/GPU-0", "GpuSample", gpu_sample(i)) for i in range(10)]
    # A NUL character is valid Avro but not PostgreSQL text: the database rejects that one record.
    rejected = gpu_sample(100, host="bad\x00host")
    records = [
        *good[:3],
        ("gpu.samples", "h/GPU-0", "GpuSample", b"not avro at all"),
        *good[3:6],
        ("gpu.samples", "h/GPU-0", "GpuSample", rejected),
        *good[6:],
    ]
    produce(topics, records)
    with running_sink(topics, db_schema, batch_max=50) as (_, outcome):
        wait_until(
            lambda: (
                db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 10
                and db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 2
            ),
            what="good rows and two dead letters",
        )
        # The letters come back from the dead-letter topic, and are still stored once each.
        wait_until(
            lambda: (
                outcome["registry"].get_sample_value(
                    "aima_sink_records_total", {"topic": topic_name(topics, "deadletter")}
                )
                == 2
            ),
            what="letters read back",
        )
    letters = db.execute(
        "SELECT origin_offset, error_type, reason, value FROM dead_letters "
        "WHERE stage = 'sink' ORDER BY origin_offset"
    ).fetchall()
    assert [(o, t) for o, t, _, _ in letters] == [(3, "NotAvro"), (7, "CharacterNotInRepertoire")]
    assert letters[0][3] == b"not avro at all" and "neither Avro" in letters[0][2]
    assert "22" in letters[1][2]  # the SQLSTATE class is in the reason
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 2
    assert metric_total(outcome["registry"], "aima_sink_dead_letters_total") == 2

    consumer = Consumer(
        {
            "bootstrap.servers": topics.kafka_bootstrap,
            "group.id": f"dl-{topics.topic_prefix}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic_name(topics, "deadletter")])
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        for message in consumer.consume(10, timeout=1.0):
            seen.append(CODEC.decode(message.value())[1])
    consumer.close()
    assert sorted((s["origin_offset"], s["stage"], s["error_type"]) for s in seen) == [
        (3, "sink", "NotAvro"),
        (7, "sink", "CharacterNotInRepertoire"),
    ]
    assert all(s["origin_topic"] == topic_name(topics, "gpu.samples") and s["reason"] for s in seen)


# -- retention -------------------------------------------------------------------------------------------


def _insert_gpu(db: psycopg.Connection, when: datetime, host: str) -> None:
    db.execute(
        "INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group, power_watts) "
        "VALUES (%s, %s, 0, 'GPU-0', 'H100', 'test', 'slow', 300)",
        (when, host),
    )


def _insert_rollup(db: psycopg.Connection, tier: str, end: datetime, series: str) -> None:
    db.execute(
        "INSERT INTO rollups (series, metric, labels, tier, bucket_start, bucket_end, count, min, max, "
        "sum, avg, p95, sketch, final, watermark, source, emitted_at) "
        "VALUES (%s, 'm', '{}', %s, %s, %s, 1, 1, 1, 1, 1, 1, '{}', true, %s, 'test', %s)",
        (series, tier, end - timedelta(hours=1), end, end, end),
    )


def test_retention_drops_exactly_the_expired_data(db: psycopg.Connection) -> None:
    mode = db.execute("SELECT mode FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()[0]
    if mode != "postgres":
        pytest.skip("TimescaleDB drops chunks by its own policies")
    today = datetime.combine(NOW.date(), datetime.min.time(), UTC)
    now = today + timedelta(hours=12)  # cutoff for raw data: yesterday 12:00
    # As if the database had been running for days: partitions from 4 days ago on.
    db.execute("SELECT aima_ensure_partitions(%s)", (now - timedelta(days=3),))
    raw = {
        "default-expired": today - timedelta(days=6, hours=-6),  # no partition that day: DEFAULT, expired
        "partition-expired": today - timedelta(days=2, hours=-6),  # its partition ends before the cutoff
        "straddling-old": today - timedelta(hours=18),  # older than the cutoff, partition straddles it: kept
        "recent": today - timedelta(hours=11),
        "future": today + timedelta(days=20),  # DEFAULT, kept
    }
    for host, when in raw.items():
        _insert_gpu(db, when, host)
    rollups = {
        ("hour", "h-expired"): now - timedelta(days=7, seconds=1),
        ("hour", "h-kept"): now - timedelta(days=6),
        ("day", "d-expired"): now - timedelta(days=31),
        ("day", "d-kept"): now - timedelta(days=29),
        ("month", "m-expired"): now - timedelta(days=366),
        ("month", "m-kept"): now - timedelta(days=300),
        ("year", "y-kept"): now - timedelta(days=3650),
    }
    for (tier, series), end in rollups.items():
        _insert_rollup(db, tier, end, series)

    def state() -> tuple[set[str], set[str]]:
        hosts = {h for (h,) in db.execute("SELECT host FROM gpu_samples")}
        series = {s for (s,) in db.execute("SELECT series FROM rollups")}
        return hosts, series

    before = state()
    planned = apply_retention(db, now=now, dry_run=True)
    assert state() == before  # a dry run changes nothing
    drops = {a.target for a in planned if a.kind == "drop_partition"}
    expired_days = [today - timedelta(days=d) for d in (4, 3, 2)]
    assert {d for d in drops if d.startswith("gpu_samples_")} == {
        f"gpu_samples_p{d:%Y%m%d}" for d in expired_days
    }
    assert (
        len(drops) == 3 * db.execute("SELECT count(*) FROM retention_policies WHERE tier = ''").fetchone()[0]
    )
    assert all(not a.done for a in planned)
    deletes = {(a.target, a.tier): a.rows for a in planned if a.kind == "delete_rows" and a.rows}
    assert deletes == {
        ("gpu_samples_default", ""): 1,
        ("rollups", "hour"): 1,
        ("rollups", "day"): 1,
        ("rollups", "month"): 1,
    }

    done = apply_retention(db, now=now)
    assert {a.target for a in done if a.kind == "drop_partition"} == drops
    hosts, series = state()
    assert hosts == {"straddling-old", "recent", "future"}
    assert series == {"h-kept", "d-kept", "m-kept", "y-kept"}
    # Partitions that still hold unexpired time stay, and the next run finds nothing to do.
    assert db.execute(
        "SELECT to_regclass(%s)", (f"gpu_samples_p{(today - timedelta(days=1)):%Y%m%d}",)
    ).fetchone()[0]
    again = apply_retention(db, now=now)
    assert not [a for a in again if a.kind == "drop_partition" or (a.kind == "delete_rows" and a.rows)]


def test_partitions_created_ahead_take_their_rows_from_default(db: psycopg.Connection) -> None:
    mode = db.execute("SELECT mode FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()[0]
    if mode != "postgres":
        pytest.skip("plain PostgreSQL partitions only")
    later = NOW + timedelta(days=20)
    _insert_gpu(db, later, "early-bird")
    assert db.execute("SELECT count(*) FROM gpu_samples_default").fetchone()[0] == 1
    created = db.execute("SELECT aima_ensure_partitions(%s)", (later,)).fetchone()[0]
    assert created > 0
    assert db.execute("SELECT count(*) FROM gpu_samples_default").fetchone()[0] == 0
    part = f"gpu_samples_p{later:%Y%m%d}"
    assert db.execute(sql.SQL("SELECT host FROM {}").format(sql.Identifier(part))).fetchall() == [
        ("early-bird",)
    ]
    assert db.execute("SELECT aima_ensure_partitions(%s)", (later,)).fetchone()[0] == 0


# -- a PostgreSQL outage ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, Callable[[str], None]]]:
    """A PostgreSQL of this test's own (infra/postgres/postgres.sh), to stop and start at will."""
    state = tempfile.mkdtemp(prefix="aima-pg-outage-", dir="/tmp")
    os.chmod(state, 0o755)
    env = dict(os.environ, AIMA_STATE_DIR=state, AIMA_PG_PORT=str(_free_port()))
    script = str(REPO_ROOT / "infra" / "postgres" / "postgres.sh")

    def control(verb: str) -> None:
        subprocess.run([script, verb], env=env, check=True, capture_output=True, timeout=120)

    try:
        control("start")
        dsn = subprocess.run(
            [script, "dsn"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        yield dsn, control
    finally:
        subprocess.run([script, "stop"], env=env, check=False, capture_output=True, timeout=120)
        datadir = Path(state, "postgres", "datadir")
        if datadir.exists() and not Path(datadir.read_text().strip()).is_relative_to(state):
            shutil.rmtree(datadir.read_text().strip(), ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def test_postgres_outage_loses_and_duplicates_nothing(
    topics: Settings, private_postgres: tuple[str, Callable[[str], None]]
) -> None:
    dsn, postgres = private_postgres
    schema = "outage"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, schema=schema)
    settings = topics.model_copy(update={"database_url": SecretStr(dsn)})
    per_round, rounds = 100, 60
    expected: list[tuple[str, datetime, float]] = []

    def round_of(r: int) -> list[tuple[str, str, str, Any]]:
        out = []
        for i in range(per_round):
            host = f"host-{i % 10}"
            value = gpu_sample(r * per_round + i, host=host)
            expected.append((host, value["time"], value["utilization_percent"]))
            out.append(("gpu.samples", f"{host}/GPU-0", "GpuSample", value))
        return out

    def stored() -> list[tuple[str, datetime, float]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            return conn.execute("SELECT host, time, utilization_percent FROM gpu_samples").fetchall()

    with running_sink(settings, schema, retry_max_s=1.0, batch_max=500) as (_, outcome):
        started = time.monotonic()
        for r in range(rounds):  # 30 s of records, 200 a second
            produce(settings, round_of(r))
            if r == 10:
                postgres("stop")
                stopped_at = time.monotonic()
            if r == 50:
                down_s = time.monotonic() - stopped_at
                postgres("start")
            time.sleep(max(0.0, started + 0.5 * (r + 1) - time.monotonic()))
        wait_until(lambda: len(stored()) >= len(expected), timeout_s=90, what="every record after the outage")
        time.sleep(1.0)
        rows = stored()
        registry = outcome["registry"]
        retries = metric_total(registry, "aima_sink_db_retries_total")

    def digest(items: list[tuple[str, datetime, float]]) -> str:
        text = "\n".join(f"{h}|{t.isoformat()}|{v}" for h, t, v in sorted(items))
        return hashlib.sha256(text.encode()).hexdigest()

    assert down_s >= 15
    assert len(rows) == len(expected) == per_round * rounds
    assert len(set(rows)) == len(rows)
    assert digest(rows) == digest(expected)
    assert retries >= 1
    assert outcome["stats"].records >= len(expected)


def test_stop_while_the_database_is_away_commits_nothing(topics: Settings) -> None:
    """Asked to stop while PostgreSQL is unreachable, the sink gives up after its shutdown timeout and
    leaves the offsets uncommitted: the records come again on the next start."""
    away = f"postgresql://aima:x@127.0.0.1:{_free_port()}/aima"
    settings = topics.model_copy(update={"database_url": SecretStr(away)})
    produce(
        settings,
        [("queue.samples", "q", "QueueSample", {"time": NOW, "queue": "q", "length_jobs": 1, "source": "t"})],
    )
    group = f"away-{topics.topic_prefix}"
    options = {"group_id": group, "shutdown_timeout_s": 1.0, "retry_max_s": 0.5}
    with running_sink(settings, "public", **options) as (_, out):
        wait_until(lambda: metric_total(out["registry"], "aima_sink_db_retries_total") >= 2, what="retries")
        assert out["registry"].get_sample_value("aima_sink_paused") == 1
        stop_requested = time.monotonic()
    assert time.monotonic() - stop_requested < 15
    assert out["stats"].batches == 0
    consumer = Consumer({"bootstrap.servers": topics.kafka_bootstrap, "group.id": group})
    topic = topic_name(topics, "queue.samples")
    partitions = [TopicPartition(topic, p) for p in range(2)]
    assert all(tp.offset < 0 for tp in consumer.committed(partitions, timeout=10))
    consumer.close()
