"""Per-process GPU memory as a catalogue metric: its labels from the process items, its rows in
gpu_process_samples (record by record and from a chunk of columns, the same), and what stays out of the
rollups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus import catalogue
from bus.codec import Codec
from bus.frames import FrameDecoder
from bus.selective_storage import parse
from consumers.sink_chunks import Chunk
from consumers.sink_filter import RowFilter
from consumers.tables import BY_NAME, BY_RECORD, Origin, rows_for
from streams.rollups.processor import RollupProcessor
from streams.runtime.series import extract

GPU = "aima.metrics.GpuSample"
METRIC = catalogue.get("gpu_process_memory_used_bytes")
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
ORIGIN = Origin("aima.gpu.samples", 0, 7, None)


def _sample(i: int, processes: list[dict[str, Any]] | None, mig: str | None = None) -> dict[str, Any]:
    return {
        "time": T0 + timedelta(seconds=30 * i), "host": "h1", "gpu": i % 2, "gpu_uuid": f"GPU-{i % 2}",
        "gpu_model": "H100", "mig_instance": mig, "parent_gpu_uuid": None, "source": "test",
        "interval_group": "slow", "utilization_percent": None, "memory_used_bytes": 10,
        "memory_total_bytes": 80,
        "memory_utilization_percent": None, "memory_bandwidth_utilization_percent": None,
        "temperature_celsius": 50.0, "power_watts": 100.0, "tensor_core_utilization_percent": None,
        "pcie_tx_bytes_per_second": None, "pcie_rx_bytes_per_second": None, "energy_joules": None,
        "sm_clock_hz": None, "memory_clock_hz": None, "throttle_reasons": None, "ecc_corrected_errors": None,
        "ecc_uncorrected_errors": None, "xid_errors": None, "processes": processes,
    }  # fmt: skip


TWO = [
    {"pid": 11, "name": "train", "used_memory_bytes": 3 << 30},
    {"pid": 12, "name": None, "used_memory_bytes": None},
]


def test_the_metric_reads_the_process_items_and_labels_them() -> None:
    assert METRIC.per_process and METRIC.record == GPU and METRIC.unit == "bytes"
    assert METRIC.labels == (*catalogue.GPU_LABELS, "pid", "process_name")
    assert METRIC.label_fields[-2:] == ("processes[].pid", "processes[].name")
    assert METRIC.label_fields[:5] == catalogue.GPU_LABELS  # the GPU's labels come from the record
    series = extract(METRIC, _sample(0, TWO, mig="gi1/ci0"))
    # pid 12's memory is unknown: no sample (null never means 0).
    assert series == [
        (
            {"host": "h1", "gpu": "0", "gpu_uuid": "GPU-0", "gpu_model": "H100", "mig_instance": "gi1/ci0",
             "pid": "11", "process_name": "train"},
            float(3 << 30),
        )
    ]  # fmt: skip
    assert extract(METRIC, _sample(0, None)) == [] and extract(METRIC, _sample(0, [])) == []
    # Other metrics' item labels still name their own fields.
    assert catalogue.get("host_disk_used_bytes").label_fields == ("host", "disks[].mountpoint")


def test_rollups_leave_per_process_metrics_out_and_keep_gpu_samples_columnar() -> None:
    plan = RollupProcessor()._plans[GPU]
    names = {metric.name for metric in plan.metrics}
    assert METRIC.name not in names and "gpu_utilization_percent" in names
    assert plan.columnar  # an array metric in the plan would send every GPU sample down the row path


def test_a_sample_becomes_one_row_per_process() -> None:
    rows = [
        row for table, row in rows_for(GPU, _sample(0, TWO), ORIGIN) if table.name == "gpu_process_samples"
    ]
    assert rows == [
        (T0, "h1", 0, "GPU-0", "H100", "", 11, "train", 3 << 30),
        (T0, "h1", 0, "GPU-0", "H100", "", 12, None, None),
    ]
    assert [t.name for t in BY_RECORD[GPU]] == ["gpu_samples", "gpu_process_samples"]
    for processes in (None, []):
        found = [t.name for t, _ in rows_for(GPU, _sample(0, processes), ORIGIN)]
        assert found == ["gpu_samples"]


def _chunk(values: list[dict[str, Any]]) -> Chunk:
    codec = Codec()
    frame = FrameDecoder(codec, GPU).decode([codec.encode(GPU, value) for value in values])
    assert frame.columns is not None and frame.rest == []
    return Chunk(BY_RECORD[GPU], frame.columns)


def test_a_chunk_of_columns_has_the_rows_that_record_by_record_has() -> None:
    lists: list[list[dict[str, Any]] | None] = [TWO, None, [], [TWO[0]], TWO, [], None, [TWO[1]], TWO, None]
    values = [_sample(i, processes, mig="gi2/ci0" if i == 3 else None) for i, processes in enumerate(lists)]
    chunk = _chunk(values)
    table = BY_NAME["gpu_process_samples"]
    expected = [rows_for(GPU, value, ORIGIN) for value in values]
    for index, rows in enumerate(expected):
        assert chunk.rows(index) == rows, index
    process_rows = [row for rows in expected for t, row in rows if t is table]
    assert chunk.row_count(table) == len(process_rows) == 8
    assert chunk.row_count(BY_NAME["gpu_samples"]) == len(values)
    lines = chunk.csv(table).decode().splitlines()
    assert len(lines) == 8
    # The CSV text PostgreSQL reads: '' for a whole GPU's mig_instance, empty (null) for unknown fields.
    assert lines[0] == '2026-12-04T12:00:00.000000+0000,h1,0,GPU-0,H100,"",11,train,3221225472'
    assert lines[1] == '2026-12-04T12:00:00.000000+0000,h1,0,GPU-0,H100,"",12,,'
    assert lines[2].split(",")[5:7] == ["gi2/ci0", "11"]


@pytest.mark.parametrize("processes", [None, []], ids=["null", "empty"])
def test_a_chunk_without_any_process_has_no_process_rows(processes: list[dict[str, Any]] | None) -> None:
    chunk = _chunk([_sample(i, processes) for i in range(10)])
    table = BY_NAME["gpu_process_samples"]
    assert chunk.row_count(table) == 0 and chunk.csv(table) == b""
    assert all([t.name for t, _ in chunk.rows(i)] == ["gpu_samples"] for i in range(10))


def test_selective_storage_keeps_a_samples_process_rows_exactly_when_it_keeps_its_row() -> None:
    storage = parse({"enabled": True, "metrics": {"gpu_memory_used_bytes": {"abs": 100}}})
    row_filter = RowFilter(storage)
    assert row_filter.columnar(GPU)  # the process rows ride along: a chunk is still decided as columns
    tables = []
    for i, used in enumerate((10, 20, 500)):  # the second moved within the band: filtered
        value = {**_sample(i, TWO), "gpu": 0, "gpu_uuid": "GPU-0", "memory_used_bytes": used}
        rows, filtered = row_filter.rows(("t", 0), rows_for(GPU, value, ORIGIN))
        tables.append([table.name for table, _ in rows])
        assert filtered == ({"gpu_samples": 1} if i == 1 else {})
    kept = ["gpu_samples", "gpu_process_samples", "gpu_process_samples"]
    assert tables == [kept, [], kept]
