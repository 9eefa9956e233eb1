"""Selective storage (D6): the decision (bus/selective_storage.py: deadband absolute and relative, heartbeat
in event time, nulls, several metrics), the file's checks, the sink's filter per source and partition
(consumers/sink_filter.py), the columnar path deciding exactly as the per-record one (directly and through
the Sink's loop on client doubles), and the sink being the only place that filters."""

from __future__ import annotations

import ast
import dataclasses
import math
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.frames import FrameDecoders
from bus.selective_storage import (
    DEFAULT_FILE,
    EXACT,
    Band,
    Kept,
    SelectiveStorageError,
    keeps,
    load,
    parse,
)
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name
from consumers.sink import CommitTracker, Sink
from consumers.sink_filter import RowFilter
from consumers.sink_metrics import SinkMetrics
from consumers.sink_writer import Entry, WriteResult
from consumers.tables import BY_NAME, BY_RECORD, Origin, rows_for
from producers.simulator import Fleet, generate
from tests.unit.kafka_doubles import FakeConsumer, FakeMessage, FakeProducer, Journal, wait_until

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
ORIGIN = Origin("t", 0, 0, None)
GPU = "aima.metrics.GpuSample"
SYSTEM = "aima.metrics.SystemSample"
CODEC = Codec()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- the decision ----------------------------------------------------------------------------------------


def test_an_absolute_band_stores_only_a_move_beyond_it() -> None:
    band = Band(abs=2.0)
    assert not band.moved(50.0, 52.0)  # at the band's edge: not beyond it
    assert not band.moved(50.0, 48.5)
    assert band.moved(50.0, 52.01)
    assert band.moved(50.0, 47.9)


def test_a_relative_band_is_a_share_of_the_last_stored_value_and_abs_is_its_floor() -> None:
    band = Band(rel=0.05)
    assert not band.moved(200.0, 210.0) and band.moved(200.0, 210.5)
    assert not band.moved(-200.0, -190.0) and band.moved(-200.0, -189.0)  # of |last|
    assert band.moved(0.0, 1e-9)  # nothing is within 5 % of zero
    floored = Band(abs=1.0, rel=0.05)  # the wider of the two
    assert not floored.moved(0.0, 1.0) and floored.moved(0.0, 1.5)
    assert not floored.moved(200.0, 209.0) and floored.moved(200.0, 211.0)


def test_null_against_a_value_is_a_change_and_exact_means_any_change() -> None:
    band = Band(abs=100.0)
    assert band.moved(None, 1.0) and band.moved(1.0, None)
    assert not band.moved(None, None)
    assert not band.moved(math.nan, math.nan) and band.moved(math.nan, 1.0) and band.moved(1.0, math.nan)
    assert not band.moved(math.inf, math.inf) and band.moved(1.0, math.inf)
    assert EXACT.moved(10, 11) and not EXACT.moved(10, 10)
    assert not Band(abs=5).moved(2**62, 2**62 + 5) and Band(abs=5).moved(2**62, 2**62 + 6)  # ints exactly


def test_keeps_the_first_row_a_move_the_heartbeat_and_a_row_not_newer() -> None:
    bands = (Band(abs=2.0), Band(rel=0.1))
    last = Kept(at(0), (50.0, 100.0))
    beat = timedelta(minutes=1)
    assert keeps(None, at(0), (50.0, 100.0), bands, beat)  # the first row of a source
    assert not keeps(last, at(10), (51.0, 109.0), bands, beat)  # both within their bands
    assert keeps(last, at(10), (51.0, 111.0), bands, beat)  # the second metric moved alone
    assert keeps(last, at(10), (53.0, 100.0), bands, beat)  # the first one alone
    assert keeps(last, at(10), (None, 100.0), bands, beat)  # it went null
    assert not keeps(last, at(59.999), (50.0, 100.0), bands, beat)
    assert keeps(last, at(60), (50.0, 100.0), bands, beat)  # heartbeat elapsed, in event time
    assert not keeps(last, at(3600), (50.0, 100.0), bands, None)  # no heartbeat: only changes
    assert keeps(last, at(0), (50.0, 100.0), bands, None)  # not newer: stored, never guessed about
    assert keeps(last, at(-10), (50.0, 100.0), bands, None)
    with_exact = Kept(at(0), (50.0, 100.0), ("a",))
    assert keeps(with_exact, at(10), (50.0, 100.0), bands, None, ("b",))
    assert not keeps(with_exact, at(10), (50.0, 100.0), bands, None, ("a",))


# -- the file --------------------------------------------------------------------------------------------


def test_the_shipped_file_is_valid_and_off() -> None:
    storage = load()
    assert DEFAULT_FILE.parent == REPO_ROOT / "bus"
    assert not storage.enabled and not storage.active and storage.metrics
    assert storage.rule("gpu_utilization_percent") is None  # off: no rule applies
    on = dataclasses.replace(storage, enabled=True)
    rule = on.rule("gpu_power_watts")
    assert (
        rule is not None and rule.band == Band(abs=5.0, rel=0.05) and rule.heartbeat == timedelta(minutes=5)
    )
    assert not RowFilter(storage).active and RowFilter(on).active


def test_heartbeat_default_and_per_metric() -> None:
    storage = parse(
        {
            "enabled": True,
            "heartbeat": "5m",
            "metrics": {
                "gpu_utilization_percent": {"abs": 2},
                "gpu_temperature_celsius": {"rel": 0.01, "heartbeat": "1m"},
                "host_cpu_utilization_percent": None,
            },
        }
    )
    assert storage.metrics["gpu_utilization_percent"].heartbeat == timedelta(minutes=5)
    assert storage.metrics["gpu_temperature_celsius"].heartbeat == timedelta(minutes=1)
    assert storage.metrics["host_cpu_utilization_percent"].band == EXACT
    # A row's heartbeat is the shortest of its listed metrics'.
    rule = RowFilter(storage).rule(BY_NAME["gpu_samples"])
    assert rule is not None and rule.heartbeat == timedelta(minutes=1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"metrics": {"gpu_utilisation": {"abs": 1}}}, "metrics.gpu_utilisation: unknown metric"),
        ({"metrics": {"job_cost_eur": {"abs": 1}}}, "only GpuSample and SystemSample rows"),
        ({"metrics": {"queue_length_jobs": {"abs": 1}}}, "comes in QueueSample records"),
        ({"metrics": {"gpu_power_watts": {"abs": -1}}}, "metrics.gpu_power_watts.abs: must be a finite"),
        ({"metrics": {"gpu_power_watts": {"rel": "5%"}}}, "metrics.gpu_power_watts.rel: must be a finite"),
        ({"metrics": {"gpu_power_watts": {"abs": True}}}, "must be a finite number"),
        ({"metrics": {"gpu_power_watts": {"abs": math.inf}}}, "must be a finite number"),
        ({"metrics": {"gpu_power_watts": {"band": 1}}}, "unknown key(s) band"),
        ({"metrics": {"gpu_power_watts": {"heartbeat": "soon"}}}, "heartbeat: bad duration"),
        ({"heartbeat": 0}, "heartbeat: must be longer than 0"),
        ({"enabled": "yes"}, "enabled: must be true or false"),
        ({"deadband": {}}, "top level: unknown key(s) deadband"),
        ({"metrics": ["gpu_power_watts"]}, "metrics: must be a mapping"),
        ([], "top level: must be a mapping"),
    ],
)
def test_a_bad_file_is_refused_with_the_place(data: Any, message: str) -> None:
    with pytest.raises(SelectiveStorageError) as caught:
        parse(data, source="deadband.yaml")
    assert str(caught.value).startswith("deadband.yaml: ") and message in str(caught.value)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SelectiveStorageError, match="cannot read selective storage file"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics: [unclosed")
    with pytest.raises(SelectiveStorageError, match="not valid YAML"):
        load(bad)


# -- the sink's filter, record by record -----------------------------------------------------------------


def storage(**metrics: dict[str, Any]) -> Any:
    return parse({"enabled": True, "metrics": metrics})


def gpu(t: float, util: float | None = 50.0, *, uuid: str = "GPU-a", **fields: Any) -> dict[str, Any]:
    """A decoded 'fast' GpuSample (as Codec.decode gives it) whose other values never change."""
    value = {
        "time": at(t), "host": "h1", "gpu": 0, "gpu_uuid": uuid, "gpu_model": "NVIDIA H100 80GB HBM3",
        "mig_instance": None, "parent_gpu_uuid": None, "source": "test", "interval_group": "fast",
        "utilization_percent": util, "memory_used_bytes": 1000, "memory_total_bytes": 8000,
        "memory_utilization_percent": 12.5, "memory_bandwidth_utilization_percent": None,
        "temperature_celsius": None, "power_watts": None, "tensor_core_utilization_percent": None,
        "pcie_tx_bytes_per_second": None, "pcie_rx_bytes_per_second": None, "energy_joules": None,
        "sm_clock_hz": None, "memory_clock_hz": None, "throttle_reasons": None, "ecc_corrected_errors": None,
        "ecc_uncorrected_errors": None, "xid_errors": None, "processes": [],
    }  # fmt: skip
    value.update(fields)
    return value


def kept(
    row_filter: RowFilter, record_name: str, values: Sequence[dict[str, Any]], partition: int = 0
) -> list:
    """The (table, time) of each row the filter stores, record by record."""
    out = []
    for value in values:
        rows, _ = row_filter.rows(("t", partition), rows_for(record_name, value, ORIGIN))
        out += [(table.name, row[table.column_names.index("time")]) for table, row in rows]
    return out


def test_a_flat_series_stores_its_heartbeats_and_a_jump() -> None:
    row_filter = RowFilter(
        parse({"enabled": True, "metrics": {"gpu_utilization_percent": {"abs": 2.0, "heartbeat": "1m"}}})
    )
    series = [gpu(10 * i, 50.0 + (0.5 if i % 2 else 0.0)) for i in range(20)]  # 50.0, 50.5, ... for 190 s
    series[13]["utilization_percent"] = 90.0  # t=130: a jump, and back at t=140
    stored = [t for _, t in kept(row_filter, GPU, series)]
    assert stored == [at(0), at(60), at(120), at(130), at(140)]


def test_every_metric_and_column_of_the_row_counts() -> None:
    row_filter = RowFilter(storage(gpu_utilization_percent={"abs": 5.0}, gpu_memory_used_bytes={"rel": 0.1}))
    series = [
        gpu(0),
        gpu(10, 54.0, memory_used_bytes=1090),  # both within their bands
        gpu(20, 54.0, memory_used_bytes=1101),  # memory moved beyond 10 % of 1000
        gpu(30, 54.0, memory_used_bytes=1101, memory_utilization_percent=12.6),  # not listed: exact
        gpu(40, 54.0, memory_used_bytes=1101, memory_utilization_percent=12.6, xid_errors=[79]),  # other
        gpu(50, 54.0, memory_used_bytes=1101, memory_utilization_percent=12.6, xid_errors=[79], processes=[]),
        gpu(60, None, memory_used_bytes=1101, memory_utilization_percent=12.6, xid_errors=[79]),  # null
        gpu(
            70, None, memory_used_bytes=1101, memory_utilization_percent=12.6, xid_errors=[79],
            processes=[{"pid": 1, "name": "python", "used_memory_bytes": 99}],  # rides along
        ),
    ]  # fmt: skip
    assert [t for _, t in kept(row_filter, GPU, series)] == [at(0), at(20), at(30), at(40), at(60)]


def test_state_is_per_source_and_per_partition_and_a_lost_partition_starts_afresh() -> None:
    row_filter = RowFilter(storage(gpu_utilization_percent={"abs": 5.0}))
    assert kept(row_filter, GPU, [gpu(0, uuid="GPU-a"), gpu(0, uuid="GPU-b")]) == [
        ("gpu_samples", at(0)),
        ("gpu_samples", at(0)),
    ]
    slow = gpu(5, uuid="GPU-a", interval_group="slow")  # another sampling group: another source
    assert kept(row_filter, GPU, [gpu(10, uuid="GPU-a"), slow, gpu(10, uuid="GPU-b")]) == [
        ("gpu_samples", at(5))
    ]
    assert kept(row_filter, GPU, [gpu(20, uuid="GPU-c")], partition=1) == [("gpu_samples", at(20))]
    row_filter.forget([("t", 0)])  # revoked: the next owner (or this sink again) starts afresh
    assert kept(row_filter, GPU, [gpu(30, uuid="GPU-a"), gpu(30, uuid="GPU-c")], partition=0) == [
        ("gpu_samples", at(30)),
        ("gpu_samples", at(30)),  # GPU-c's state was partition 1's
    ]
    assert kept(row_filter, GPU, [gpu(40, uuid="GPU-c")], partition=1) == []


def system(t: float, cpu: float, used: int, rx: float | None) -> dict[str, Any]:
    return {
        "time": at(t), "host": "h1", "source": "test", "cpu_utilization_percent": cpu,
        "memory_used_bytes": 4000, "memory_total_bytes": 8000, "containers_running": 3,
        "disks": [{"mountpoint": m, "used_bytes": used, "total_bytes": 10_000} for m in ("/", "/data")],
        "networks": None if rx is None else [
            {"interface": "eth0", "receive_bytes_per_second": rx, "transmit_bytes_per_second": 1.0}
        ],
    }  # fmt: skip


def test_a_system_sample_is_decided_row_by_row_per_table_and_item() -> None:
    row_filter = RowFilter(
        storage(
            host_cpu_utilization_percent={"abs": 5.0},
            host_disk_used_bytes={"rel": 0.01},
            host_network_receive_bytes_per_second={"rel": 0.2},
        )
    )
    first = kept(row_filter, SYSTEM, [system(0, 10.0, 5000, 100.0)])
    assert Counter(name for name, _ in first) == {
        "system_samples": 1,
        "system_disk_samples": 2,
        "system_network_samples": 1,
    }
    assert kept(row_filter, SYSTEM, [system(10, 12.0, 5040, 110.0)]) == []  # everything within its band
    assert kept(row_filter, SYSTEM, [system(20, 20.0, 5040, 110.0)]) == [("system_samples", at(20))]
    assert kept(row_filter, SYSTEM, [system(30, 20.0, 5060, 130.0)]) == [
        ("system_disk_samples", at(30)),  # "/" and "/data": each its own source
        ("system_disk_samples", at(30)),
        ("system_network_samples", at(30)),
    ]
    assert kept(row_filter, SYSTEM, [system(40, 20.0, 5060, None)]) == []  # no network item: no row


def test_a_table_with_no_metric_listed_is_stored_in_full() -> None:
    row_filter = RowFilter(storage(host_cpu_utilization_percent={"abs": 50.0}))
    names = Counter(
        name for name, _ in kept(row_filter, SYSTEM, [system(t, 10.0, 5000, 1.0) for t in (0, 10)])
    )
    assert names == {"system_samples": 1, "system_disk_samples": 4, "system_network_samples": 2}
    assert kept(row_filter, GPU, [gpu(0), gpu(10)]) == [("gpu_samples", at(0)), ("gpu_samples", at(10))]


# -- the columnar path decides as the per-record one ------------------------------------------------------


def fleet_gpu_samples(minutes: int = 30) -> list[bytes]:
    fleet = Fleet(seed=5, hosts=2, gpus_per_host=3, start=T0)
    return [
        CODEC.encode(name, value)
        for _, _, name, value in generate(fleet, T0, T0 + timedelta(minutes=minutes), 10)
        if name == "GpuSample"
    ]


def shipped_on() -> Any:
    return dataclasses.replace(load(), enabled=True)


def test_columnar_decisions_equal_the_per_record_ones_on_the_fleet() -> None:
    encoded = fleet_gpu_samples()
    partitions = [("t", i % 3) for i in range(len(encoded))]  # sources spread over partitions, in order
    per_record = RowFilter(shipped_on())
    expected = []
    for data, partition in zip(encoded, partitions, strict=True):
        name, record = CODEC.decode(data)
        rows, _ = per_record.rows(partition, rows_for(name, record, ORIGIN))
        expected.append(bool(rows))
    assert 0.05 < sum(expected) / len(expected) < 0.95  # the bands do filter, and do keep some

    columnar = RowFilter(shipped_on())
    decoder = FrameDecoders(CODEC).get(GPU)
    assert decoder is not None
    table = BY_RECORD[GPU][0]
    decided: list[bool] = []
    for start in range(0, len(encoded), 700):  # chunks that split sources' series across plans
        frame = decoder.decode(encoded[start : start + 700])
        assert frame.columns is not None and not frame.rest
        plan = columnar.plan(table, frame.columns, partitions[start : start + 700])
        columnar.apply(plan)
        decided += plan.keep
    assert decided == expected


def test_a_plan_changes_the_state_only_once_applied() -> None:
    encoded = fleet_gpu_samples(minutes=10)
    decoder = FrameDecoders(CODEC).get(GPU)
    assert decoder is not None
    earlier, later = (
        decoder.decode(encoded[: len(encoded) // 2]),
        decoder.decode(encoded[len(encoded) // 2 :]),
    )
    assert earlier.columns is not None and later.columns is not None
    table = BY_RECORD[GPU][0]

    def plan(row_filter: RowFilter, columns: Any) -> Any:
        return row_filter.plan(table, columns, [("t", 0)] * columns.height)

    afresh = plan(RowFilter(shipped_on()), later.columns).keep
    row_filter = RowFilter(shipped_on())
    first = plan(row_filter, earlier.columns)
    assert plan(row_filter, later.columns).keep == afresh  # the first plan, not applied, changed nothing
    row_filter.apply(first)
    assert plan(row_filter, later.columns).keep != afresh  # applied, its rows are the reference


class RecordingWriter:
    """Stores nothing; records each batch's entries (their offsets and whether they carry rows)."""

    def __init__(self) -> None:
        self.abort = threading.Event()
        self.retrying = False
        self.entries: list[tuple[int, bool]] = []

    def upkeep_due(self) -> bool:
        return False

    def write(self, entries: Sequence[Entry]) -> WriteResult:
        self.entries += [(entry.offset, bool(entry.rows)) for entry in entries]
        staged = Counter(table.name for entry in entries for table, _ in entry.rows)
        return WriteResult(staged=staged, stored=Counter(staged))

    def close(self) -> None:
        pass


def run_sink(encoded: list[bytes], batch_max: int) -> tuple[list[tuple[int, bool]], Sink, CollectorRegistry]:
    """The records through a Sink on client doubles, with the shipped bands on: which entries carried
    rows, and what was committed. ``batch_max`` below 64 makes every consume one-by-one decoding."""
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    topic = topic_name(settings, "gpu.samples")
    journal: Journal = []
    registry = CollectorRegistry()
    metrics = SinkMetrics(registry)
    commits = CommitTracker(metrics.commit_failures)
    records = [FakeMessage(topic, 0, i, data) for i, data in enumerate(encoded)]
    consumer = FakeConsumer(journal, records, commits.on_commit)
    writer = RecordingWriter()
    sink = Sink(
        settings,
        consumer=consumer,  # type: ignore[arg-type]
        producer=FakeProducer(journal),  # type: ignore[arg-type]
        writers=[writer],  # type: ignore[list-item]
        commits=commits,
        metrics=metrics,
        codec=CODEC,
        topics=("gpu.samples",),
        batch_max=batch_max,
        batch_timeout_s=0.05,
        selective=shipped_on(),
    )
    stopping = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: (topic, 0, len(encoded)) in consumer.committed, "every offset committed")
    finally:
        stopping.set()
        thread.join(30)
    assert not thread.is_alive()
    return writer.entries, sink, registry


def test_the_sinks_columnar_and_per_record_paths_store_the_same_rows_and_commit_every_offset() -> None:
    encoded = fleet_gpu_samples(minutes=20)
    columnar, columnar_sink, registry = run_sink(encoded, batch_max=5000)
    one_by_one, per_record_sink, _ = run_sink(encoded, batch_max=50)
    assert [offset for offset, _ in columnar] == list(range(len(encoded)))  # every record, in order
    assert columnar == one_by_one
    stored = sum(has_rows for _, has_rows in columnar)
    assert 0 < stored < len(encoded)
    for sink in (columnar_sink, per_record_sink):
        assert sink.stats.filtered == {"gpu_samples": len(encoded) - stored}
        assert sink.stats.dead_letters == 0  # a filtered record is never a dead letter
    filtered = registry.get_sample_value("aima_sink_rows_filtered_total", {"table": "gpu_samples"})
    assert filtered == len(encoded) - stored


# -- only the sink filters -------------------------------------------------------------------------------


def test_only_the_sinks_raw_row_path_filters() -> None:
    """Rollups, alerts and anomalies come from the stream app, which reads every sample from Kafka: no
    module of it (nor of the producers or the API) uses selective storage, so only the sink's stored raw
    rows are thinned."""
    users = set()
    code = ("aima_metrics", "api", "bench", "bus", "consumers", "producers", "streams")
    for path in (path for top in code for path in (REPO_ROOT / top).glob("**/*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(n in {"bus.selective_storage", "consumers.sink_filter"} for n in names):
                users.add(str(path.relative_to(REPO_ROOT)))
    assert users == {
        "consumers/sink.py",
        "consumers/sink_filter.py",
        "aima_metrics/pipeline_commands.py",
        "bench/deadband.py",
    }


def test_the_sink_command_refuses_a_bad_file_before_it_reads(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from aima_metrics.pipeline_commands import sink

    bad = tmp_path / "deadband.yaml"
    bad.write_text("enabled: true\nmetrics:\n  gpu_power: {abs: 1}\n")
    result = CliRunner().invoke(sink, [], env={"AIMA_SINK_SELECTIVE_STORAGE": str(bad)})
    assert result.exit_code == 1
    assert f"{bad}: metrics.gpu_power: unknown metric 'gpu_power'" in result.output
