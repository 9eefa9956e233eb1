"""Exports (D4) on the real PostgreSQL and a real Prometheus: JSON and CSV give back exactly the stored
samples; remote write lands every sample in Prometheus, read back through its query API."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from aima_metrics.export import (
    ExportError,
    RemoteWriteError,
    export_command,
    export_rows,
    parse_labels,
    parse_time,
    prometheus_name,
)
from bus.catalogue import get as get_metric
from bus.settings import Settings
from consumers.sink_writer import Entry, Writer
from consumers.tables import Origin, rows_for
from tests.prometheus_server import PrometheusServer, running_prometheus, wait_until

pytestmark = pytest.mark.integration

NS = "aima.metrics."
# Millisecond times, as Avro carries them; recent, so Prometheus accepts them into its head block.
T0 = (datetime.now(UTC) - timedelta(minutes=30)).replace(microsecond=123_000)
GPUS = [
    ("exp-host-a", 0, "GPU-aaaa", None),
    ("exp-host-a", 1, "GPU-bbbb", None),
    ("exp-host-b", 0, "MIG-cc", "gi1/ci0"),
]


def gpu_sample(host: str, gpu: int, uuid: str, mig: str | None, at: datetime, i: int) -> dict[str, Any]:
    return {
        "time": at,
        "host": host,
        "gpu": gpu,
        "gpu_uuid": uuid,
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "mig_instance": mig,
        "parent_gpu_uuid": "GPU-pppp" if mig else None,
        "source": "test",
        "interval_group": "fast",
        # Values that do not survive a careless float format: 1/3 of a percent, and friends.
        "utilization_percent": (i * 7 % 100) + 1 / 3,
        "memory_used_bytes": 1_000_000_007 + i,
        "memory_total_bytes": 80_000_000_000,
        "memory_utilization_percent": 12.5,
        "memory_bandwidth_utilization_percent": None,
        "temperature_celsius": None,
        "power_watts": None,
        "tensor_core_utilization_percent": None,
        "pcie_tx_bytes_per_second": None,
        "pcie_rx_bytes_per_second": None,
        "energy_joules": 1e6 + i * 0.1,
        "sm_clock_hz": None,
        "memory_clock_hz": None,
        "throttle_reasons": [],
        "ecc_corrected_errors": None,
        "ecc_uncorrected_errors": None,
        "xid_errors": None,
        "processes": None,
    }


def system_sample(host: str, at: datetime, i: int) -> dict[str, Any]:
    return {
        "time": at,
        "host": host,
        "source": "test",
        "cpu_utilization_percent": 10.0 + i,
        "memory_used_bytes": 8_000_000_000 + i,
        "memory_total_bytes": 64_000_000_000,
        "disks": [
            {"mountpoint": "/", "used_bytes": 10_000 + i, "total_bytes": 100_000},
            {"mountpoint": "/data", "used_bytes": 20_000 + i, "total_bytes": 200_000},
        ],
        "networks": None,
        "containers_running": 3,
    }


def store(database_url: str, schema: str, records: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Through the sink's own writer: the rows the sink would store for these records."""
    writer = Writer(database_url, schema=schema, maintenance_every_s=None)
    now_ms = time.time_ns() // 1_000_000
    try:
        entries = [
            Entry(topic, 0, offset, None, None, rows_for(NS + name, value, Origin(topic, 0, offset, now_ms)))
            for offset, (topic, name, value) in enumerate(records)
        ]
        writer.write(entries)
    finally:
        writer.close()


@pytest.fixture
def stored(database_url: str, db_schema: str) -> dict[str, list[dict[str, Any]]]:
    """20 samples per GPU (one a MIG instance) and per host; returns the source records by kind."""
    gpus, systems = [], []
    for i in range(20):
        at = T0 + timedelta(seconds=10 * i)
        for host, gpu, uuid, mig in GPUS:
            gpus.append(gpu_sample(host, gpu, uuid, mig, at, i + gpu))
        for host in ("exp-host-a", "exp-host-b"):
            systems.append(system_sample(host, at, i))
    records = [("gpu.samples", "GpuSample", v) for v in gpus] + [
        ("system.samples", "SystemSample", v) for v in systems
    ]
    store(database_url, db_schema, records)
    return {"gpu": gpus, "system": systems}


@pytest.fixture
def export_settings(database_url: str, db_schema: str, tmp_path: Path) -> Settings:
    """Settings whose database URL puts the test's schema first on the search path."""
    url = make_conninfo(database_url, options=f"-csearch_path={db_schema},public")
    return Settings(database_url=url, state_dir=tmp_path / "state")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def expected_gpu_rows(records: list[dict[str, Any]], field: str, metric: str) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        labels = {
            "host": r["host"],
            "gpu": str(r["gpu"]),
            "gpu_uuid": r["gpu_uuid"],
            "gpu_model": r["gpu_model"],
            "mig_instance": r["mig_instance"],
        }
        labels = {k: v for k, v in labels.items() if v is not None}
        rows.append({"time": _iso(r["time"]), "metric": metric, "value": float(r[field]), "labels": labels})
    label_order = get_metric(metric).labels
    # The export's order: time, then every label in catalogue order (nulls first).
    rows.sort(
        key=lambda row: (row["time"], *((k in row["labels"], row["labels"].get(k, "")) for k in label_order))
    )
    return rows


def test_json_export_is_exact(export_settings: Settings, stored: dict[str, list[dict[str, Any]]]) -> None:
    out = io.StringIO()
    count = export_command(
        export_settings, "gpu_utilization_percent", T0, T0 + timedelta(hours=1), "json", None, None, out
    )
    exported = json.loads(out.getvalue())
    expected = expected_gpu_rows(stored["gpu"], "utilization_percent", "gpu_utilization_percent")
    assert count == len(expected) == 60
    assert exported == expected
    # Floats survive exactly, not merely approximately.
    assert {row["value"] for row in exported} == {float(r["utilization_percent"]) for r in stored["gpu"]}


def test_csv_export_is_exact_with_item_labels_and_filters(
    export_settings: Settings, stored: dict[str, list[dict[str, Any]]]
) -> None:
    out = io.StringIO()
    start, end = T0 + timedelta(seconds=50), T0 + timedelta(seconds=150)  # half-open: samples 5..14
    count = export_command(
        export_settings, "host_disk_used_bytes", start, end, "csv", "host=exp-host-b", None, out
    )
    table = list(csv.reader(io.StringIO(out.getvalue())))
    assert table[0] == ["time", "metric", "value", "host", "mountpoint"]
    expected = [
        [_iso(s["time"]), "host_disk_used_bytes", repr(float(d["used_bytes"])), s["host"], d["mountpoint"]]
        for s in stored["system"]
        if s["host"] == "exp-host-b" and start <= s["time"] < end
        for d in sorted(s["disks"], key=lambda d: d["mountpoint"])
    ]
    assert count == len(expected) == 20
    assert table[1:] == expected

    # A null label is an empty CSV field; the whole GPU table round-trips.
    out = io.StringIO()
    count = export_command(
        export_settings,
        "gpu_memory_used_bytes",
        T0,
        T0 + timedelta(hours=1),
        "csv",
        {"host": "exp-host-a"},
        None,
        out,
    )
    table = list(csv.reader(io.StringIO(out.getvalue())))
    assert table[0] == ["time", "metric", "value", "host", "gpu", "gpu_uuid", "gpu_model", "mig_instance"]
    assert count == 40 and len(table) == 41
    assert {row[-1] for row in table[1:]} == {""}
    got = {(row[0], row[5], float(row[2])) for row in table[1:]}
    want = {
        (_iso(r["time"]), r["gpu_uuid"], float(r["memory_used_bytes"]))
        for r in stored["gpu"]
        if r["host"] == "exp-host-a"
    }
    assert got == want


def test_export_rows_streams_in_order(
    db: psycopg.Connection, stored: dict[str, list[dict[str, Any]]]
) -> None:
    rows = list(export_rows(db, "gpu_utilization_percent", T0, T0 + timedelta(seconds=20), {"gpu": "0"}))
    assert [(r.time, r.labels["gpu_uuid"]) for r in rows] == [
        (T0, "GPU-aaaa"),
        (T0, "MIG-cc"),
        (T0 + timedelta(seconds=10), "GPU-aaaa"),
        (T0 + timedelta(seconds=10), "MIG-cc"),
    ]
    assert rows[1].labels["mig_instance"] == "gi1/ci0" and "mig_instance" not in rows[0].labels


@pytest.mark.parametrize(
    ("metric", "fmt", "labels", "endpoint", "message"),
    [
        ("gpu_utilisation", "json", None, None, "unknown metric"),
        ("gpu_utilization_percent", "xml", None, None, "unknown format"),
        ("gpu_utilization_percent", "json", "queue=a", None, "has no label queue"),
        ("gpu_utilization_percent", "json", "host=a=b", None, "is not name=value"),
        ("gpu_utilization_percent", "json", "host", None, "is not name=value"),
        ("gpu_utilization_percent", "remote-write", None, None, "needs an endpoint"),
    ],
)
def test_export_refuses_bad_requests_clearly(
    metric: str, fmt: str, labels: str | None, endpoint: str | None, message: str, tmp_path: Path
) -> None:
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none", state_dir=tmp_path)
    with pytest.raises(ExportError, match=message):
        export_command(settings, metric, T0, T0 + timedelta(hours=1), fmt, labels, endpoint, io.StringIO())


def test_parsers() -> None:
    assert parse_labels("host=a, gpu=0") == {"host": "a", "gpu": "0"}
    assert parse_labels("") == {}
    with pytest.raises(ExportError, match="given twice"):
        parse_labels("a=1,a=2")
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert parse_time("now-90m", now) == now - timedelta(minutes=90)
    assert parse_time("2026-12-01T10:00:00Z") == datetime(2026, 12, 1, 10, tzinfo=UTC)
    with pytest.raises(ExportError, match="no time zone"):
        parse_time("2026-12-01T10:00:00")
    with pytest.raises(ExportError, match="empty range"):
        export_command(Settings(), "gpu_power_watts", now, now, "json")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    with running_prometheus(tmp_path / "prometheus") as server:
        yield server


def _matrix(prometheus: PrometheusServer, name: str) -> dict[tuple[tuple[str, str], ...], dict[int, float]]:
    """Every raw sample Prometheus holds for ``name`` in the last two hours, by label set."""
    result = prometheus.query(f"{name}[2h]")
    return {
        tuple(sorted(series["metric"].items())): {
            round(float(t) * 1000): float(v) for t, v in series["values"]
        }
        for series in result
    }


def test_remote_write_lands_in_prometheus(
    export_settings: Settings, stored: dict[str, list[dict[str, Any]]], prometheus: PrometheusServer
) -> None:
    end = T0 + timedelta(hours=1)
    for metric, field in [
        ("gpu_utilization_percent", "utilization_percent"),
        ("gpu_energy_joules", "energy_joules"),
    ]:
        count = export_command(
            export_settings, metric, T0, end, "remote-write", None, prometheus.remote_write_url
        )
        assert count == 60
        name = prometheus_name(get_metric(metric))
        expected: dict[tuple[tuple[str, str], ...], dict[int, float]] = {}
        for r in stored["gpu"]:
            labels = {
                "__name__": name,
                "host": r["host"],
                "gpu": str(r["gpu"]),
                "gpu_uuid": r["gpu_uuid"],
                "gpu_model": r["gpu_model"],
            }
            if r["mig_instance"]:
                labels["mig_instance"] = r["mig_instance"]
            series = expected.setdefault(tuple(sorted(labels.items())), {})
            series[int(r["time"].timestamp() * 1000 + 0.5)] = float(r[field])
        landed = wait_until(lambda n=name: _matrix(prometheus, n), 30, f"{name} in Prometheus")
        assert landed == expected, f"{name}: Prometheus holds something else than what was exported"
    assert prometheus_name(get_metric("gpu_energy_joules")) == "aima_gpu_energy_joules_total"

    # Prometheus takes no sample older than the newest of its series: sending the range again is refused
    # with a clear error (a 4xx is never retried), and what it holds stays as it was.
    before = _matrix(prometheus, "aima_gpu_utilization_percent")
    with pytest.raises(RemoteWriteError, match="out of order") as refused:
        export_command(
            export_settings,
            "gpu_utilization_percent",
            T0,
            end,
            "remote-write",
            None,
            prometheus.remote_write_url,
        )
    assert refused.value.status == 400
    assert _matrix(prometheus, "aima_gpu_utilization_percent") == before
