"""Pieces of the stream app that need no broker: the per-partition state view, the partition's progress
record and the fast validation."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from prometheus_client import CollectorRegistry

from bus import validation
from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from bus.validation import Validator
from streams.runtime.app import Dispatcher, PartitionView, StreamMetrics, _partition_of
from streams.runtime.buckets import to_ms
from streams.runtime.processor import Input, PartitionBatch, Result
from streams.runtime.settings import StreamsSettings
from streams.runtime.transport import StreamsApp


class _Store:
    """The shape of Faust's memory store: a plain dict under ``data``."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}


def test_partition_view_prefixes_keys_and_changelogs_every_change() -> None:
    store, log = _Store(), []
    store.data["1|other"] = {"x": 1}
    view = PartitionView(store, 3, lambda key, value: log.append((key, value)))
    view["a"] = {"v": 1}
    view["b"] = {"v": 2}
    del view["a"]
    assert store.data == {"1|other": {"x": 1}, "3|b": {"v": 2}}
    assert log == [("3|a", {"v": 1}), ("3|b", {"v": 2}), ("3|a", None)]
    assert list(view) == ["b"] and len(view) == 1
    assert view.get("b") == {"v": 2} and view.get("missing", 7) == 7
    assert "b" in view and "a" not in view
    with pytest.raises(KeyError):
        view["a"]
    with pytest.raises(KeyError):
        del view["a"]
    with pytest.raises(ValueError, match="None"):
        view["c"] = None


def test_partition_of_table_keys() -> None:
    assert _partition_of("3|h|123|x") == 3
    assert _partition_of("12#progress") == 12


class _Probe:
    """A processor that keeps the batches it is given and writes nothing."""

    name = "probe"
    topics = ("gpu.samples",)

    def __init__(self) -> None:
        self.batches: list[PartitionBatch] = []

    def process(self, batch: PartitionBatch, state: Any) -> Result:
        self.batches.append(batch)
        return Result()


def test_a_progress_record_with_the_old_offset_name_restores_and_the_next_one_says_offset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's progress record (``<partition>#progress``) named its offset ``o`` before every state record
    said ``offset``: one restored from such a changelog still gives the partition its watermark and its
    offset, and the record written next uses ``offset``. No broker: the app is built, never started."""
    settings = Settings.from_environ({})
    app = StreamsApp("progress", broker="kafka://127.0.0.1:1", autodiscover=False, store="memory://")
    probe = _Probe()
    options = StreamsSettings.from_environ({})
    metrics = StreamMetrics(CollectorRegistry())
    dispatcher = Dispatcher(app, settings, [probe], Codec.from_settings(settings), metrics, options)
    name = topic_name(settings, "gpu.samples")
    route = dispatcher.routes[name]
    store = route.bindings[0].table.data
    restored_mark = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    store["0#progress"] = {"wm": to_ms(restored_mark), "o": 41}  # as the changelog of the previous version
    newer = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
    inputs = [Input("gpu.samples", 0, 42, "aima.metrics.GpuSample", {}, newer)]
    record = ConsumerRecord(name, 0, 42, to_ms(newer), 0, b"k", b"v", None, 1, 1, [])

    with caplog.at_level("INFO", logger="streams.runtime.app"):
        dispatcher._run(route, TP(name, 0), [record], inputs, 42)

    (batch,) = probe.batches
    assert batch.previous_watermark == restored_mark and batch.watermark == newer and batch.resumed
    (resumed,) = [r for r in caplog.records if r.getMessage() == "partition resumed"]
    assert resumed.state_offset == 41  # type: ignore[attr-defined]
    assert store["0#progress"] == {"wm": to_ms(newer), "offset": 42}
    changelog = route.bindings[0].changelog
    written = [(key, value) for _, (key, value, *_) in dispatcher.sender._records[changelog]]
    assert written == [(b'"0#progress"', orjson.dumps({"wm": to_ms(newer), "offset": 42}))]


def _gpu_sample(**values: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": datetime(2026, 1, 1, tzinfo=UTC),
        "host": "h",
        "gpu": 0,
        "gpu_uuid": "GPU-1",
        "gpu_model": "H100",
        "mig_instance": None,
        "parent_gpu_uuid": None,
        "source": "test",
        "interval_group": "fast",
        "throttle_reasons": [],
        "xid_errors": [],
        "processes": [{"pid": 1, "name": "python", "used_memory_bytes": 10}],
    }
    for name in (
        "utilization_percent",
        "memory_used_bytes",
        "memory_total_bytes",
        "memory_utilization_percent",
        "memory_bandwidth_utilization_percent",
        "temperature_celsius",
        "power_watts",
        "tensor_core_utilization_percent",
        "pcie_tx_bytes_per_second",
        "pcie_rx_bytes_per_second",
        "energy_joules",
        "sm_clock_hz",
        "memory_clock_hz",
        "ecc_corrected_errors",
        "ecc_uncorrected_errors",
    ):
        record[name] = None
    record.update(values)
    return record


def _timings(**values: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": datetime(2026, 1, 1, tzinfo=UTC),
        "interval_start": datetime(2026, 1, 1, tzinfo=UTC),
        "job_id": "j",
        "project": "p",
        "model": None,
        "host": None,
        "kind": "frame",
        "kernel": None,
        "direction": None,
        "bytes": None,
        "count": 3,
        "sum_seconds": 0.3,
        "min_seconds": 0.1,
        "max_seconds": 0.1,
        "sketch": {"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [1, 2], "counts": [1.0, 2.0]},
        "source": "test",
    }
    record.update(values)
    return record


def _cases() -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(4)
    gpu, timing = "aima.metrics.GpuSample", "aima.metrics.JobTimings"
    cases = [
        (gpu, _gpu_sample()),
        (gpu, _gpu_sample(utilization_percent=100.5)),
        (gpu, _gpu_sample(utilization_percent=-0.1)),
        (gpu, _gpu_sample(power_watts=math.nan)),
        (gpu, _gpu_sample(memory_used_bytes=-1)),
        (gpu, _gpu_sample(energy_joules=math.inf)),
        (gpu, _gpu_sample(gpu=-3)),  # no rule for an index
        (gpu, _gpu_sample(processes=[{"pid": 1, "name": None, "used_memory_bytes": -3}])),
        (gpu, _gpu_sample(processes=None)),
        (timing, _timings()),
        (timing, _timings(count=-1)),
        (timing, _timings(bytes=-5)),
        (timing, _timings(min_seconds=-0.5)),
        (timing, _timings(sketch={"relative_accuracy": 0.01, "zero_count": -1.0, "keys": [], "counts": []})),
        (
            timing,
            _timings(sketch={"relative_accuracy": math.nan, "zero_count": 0.0, "keys": [], "counts": []}),
        ),
        (
            timing,
            _timings(sketch={"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [1], "counts": [-1.0]}),
        ),
        ("aima.metrics.NotInTheContract", {"x_percent": 101.0, "nested": {"y_seconds": -1.0}}),
        ("aima.metrics.NotInTheContract", {"x_percent": 99.0, "labels": {"z_percent": 500.0}}),
    ]
    for _ in range(200):
        utilization, power = rng.uniform(-5, 105), rng.uniform(-1, 5)
        cases.append((gpu, _gpu_sample(utilization_percent=utilization, power_watts=power)))
    return cases


def test_fast_validation_agrees_with_bus_validation() -> None:
    fast = Validator()
    for record_name, record in _cases():
        assert fast.problems(record_name, record) == validation.problems(record), record
    for name in ("GpuSample", "JobTimings", "SystemSample", "JobEvent", "PodStatus", "CostRecord"):
        fast.problems(f"aima.metrics.{name}", {})  # compiles, or falls back to the walk
    walked = [name for name, check in fast._checks.items() if check == fast._ok]
    assert walked == ["aima.metrics.NotInTheContract"]


def test_config_from_environment() -> None:
    config = StreamsSettings.from_environ(
        {"AIMA_STREAMS_APP_ID": "x", "AIMA_STREAMS_BATCH_MAX": "200", "AIMA_STREAMS_LATENESS_S": "60"}
    )
    assert (config.app_id, config.batch_max, config.lateness.total_seconds()) == ("x", 200, 60.0)
    assert StreamsSettings.from_environ({"AIMA_STREAMS_WEB_PORT": " "}) == StreamsSettings.from_environ({})
    assert StreamsSettings.from_environ({}).app_id == "aima-streams"
    with pytest.raises(ValueError, match="AIMA_STREAMS_LOG_LEVEL"):
        StreamsSettings.from_environ({"AIMA_STREAMS_LOG_LEVEL": "loud"})
    with pytest.raises(ValueError, match="AIMA_STREAMS_BATCH_MAX"):
        StreamsSettings.from_environ({"AIMA_STREAMS_BATCH_MAX": "many"})


def test_gc_threshold_from_environment() -> None:
    given = {"AIMA_STREAMS_GC_THRESHOLD": "700,10,10"}
    assert StreamsSettings.from_environ(given).gc_threshold == (700, 10, 10)
    assert StreamsSettings.from_environ({}).gc_threshold == (50_000, 20, 100)
    for bad in ("1,2", "a,b,c", "0,10,10", "1,2,3,4"):
        with pytest.raises(ValueError, match="AIMA_STREAMS_GC_THRESHOLD"):
            StreamsSettings.from_environ({"AIMA_STREAMS_GC_THRESHOLD": bad})
