"""The rollup processor's pure logic, with a dict as state: cascade exactness, p95 within the sketch's
error, lateness, replays, restarts from a changelog prefix, emit throttling, and the metric shapes (summary,
array, selected)."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ddsketch.mapping import LogarithmicMapping

from bus import sketch
from bus.catalogue import BY_NAME, METRICS
from bus.topics import BY_KEY
from streams.rollups.processor import RollupProcessor, quantile_of_bins, rollup_topics
from streams.runtime.buckets import PARENT, TIERS, bucket_end, bucket_start, iso, to_ms
from streams.runtime.processor import Input, PartitionBatch, Result
from streams.runtime.series import series_id

GPU_FIELDS = (
    "utilization_percent",
    "memory_used_bytes",
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
)
GPU = "aima.metrics.GpuSample"


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def gpu(time: datetime, utilization: float | None, *, host: str = "a", index: int = 0, **values: Any) -> dict:
    record = {name: None for name in GPU_FIELDS}
    record.update(
        time=time,
        host=host,
        gpu=index,
        gpu_uuid=f"GPU-{host}-{index}",
        gpu_model="H100",
        mig_instance=None,
        source="test",
        interval_group="fast",
        utilization_percent=utilization,
    )
    record.update(values)
    return record


def util_series(host: str = "a", index: int = 0) -> str:
    labels = {"gpu": str(index), "gpu_model": "H100", "gpu_uuid": f"GPU-{host}-{index}", "host": host}
    return series_id("gpu_utilization_percent", labels)


class RecordingState(dict):
    """A dict that logs every write and delete as the changelog would carry it (JSON)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str | None]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.log.append((key, json.dumps(value)))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.log.append((key, None))


def restore(log: Iterable[tuple[str, str | None]]) -> RecordingState:
    """The state a restore from (a prefix of) the changelog gives: JSON values, deletes applied."""
    state = RecordingState()
    for key, value in log:
        if value is None:
            dict.pop(state, key, None)
        else:
            dict.__setitem__(state, key, json.loads(value))
    return state


class Partition:
    """Drives the processor as the app does for one topic partition: offsets, the watermark (kept in the
    'changelog' after the processor's writes), resumed flags and committed offsets."""

    def __init__(self, processor: RollupProcessor, topic: str = "gpu.samples") -> None:
        self.processor = processor
        self.topic = topic
        self.state = RecordingState()
        self.watermark: datetime | None = None
        self.results: list[Result] = []

    def inputs(self, values: Sequence[dict], record: str = GPU, first_offset: int = 0) -> list[Input]:
        return [
            Input(self.topic, 0, first_offset + i, record, value, value["time"])
            for i, value in enumerate(values)
        ]

    def run(self, inputs: Sequence[Input], *, resumed: bool = False, committed: int | None = None) -> Result:
        newest = max(record.event_time for record in inputs)
        mark = newest if self.watermark is None else max(self.watermark, newest)
        batch = PartitionBatch(
            self.topic, 0, inputs, mark, self.watermark, committed_offset=committed, resumed=resumed
        )
        result = self.processor.process(batch, self.state)
        self.state.log.append(("#progress", json.dumps(to_ms(mark))))
        self.watermark = mark
        self.results.append(result)
        return result

    def feed(self, inputs: Sequence[Input], size: int) -> None:
        for start in range(0, len(inputs), size):
            self.run(inputs[start : start + size], resumed=start == 0)

    def outputs(self) -> Iterator[dict]:
        for result in self.results:
            for output in result.outputs:
                yield output.value

    def finals(self) -> dict[tuple[str, str, int], dict]:
        """Latest final rollup per (series, tier, bucket start), without ``watermark``: the emitting
        partition's watermark at emission depends on where batches end, the rollup itself does not."""
        return finals_of(self.outputs())

    def late(self) -> list[tuple[Input, str]]:
        return [item for result in self.results for item in result.late]


def finals_of(values: Iterable[dict]) -> dict[tuple[str, str, int], dict]:
    found = {}
    for value in values:
        if value["final"]:
            found[(value["series"], value["tier"], value["bucket_start"])] = {
                k: v for k, v in value.items() if k != "watermark"
            }
    return found


def exact_summary(found: list[float]) -> dict[str, float]:
    """count, min, max, avg and the exact p95 (rank floor(0.95 (n-1))) of one bucket's values."""
    ordered = sorted(found)
    return {
        "count": len(found),
        "min": ordered[0],
        "max": ordered[-1],
        "avg": math.fsum(found) / len(found),
        "p95": ordered[math.floor(0.95 * (len(found) - 1))],
    }


def offline(samples: Iterable[tuple[str, datetime, float]]) -> dict[tuple[str, str, int], dict]:
    """count, min, max, avg and the exact p95 (rank floor(0.95 (n-1))) per (series, tier, bucket start)."""
    values: dict[tuple[str, str, int], list[float]] = {}
    for series, time, value in samples:
        for tier in TIERS:
            values.setdefault((series, tier, bucket_start(tier, to_ms(time))), []).append(value)
    expected = {}
    for key, found in values.items():
        expected[key] = exact_summary(found)
    return expected


def assert_matches(
    finals: dict[tuple[str, str, int], dict], expected: dict[tuple[str, str, int], dict]
) -> None:
    assert set(finals) == set(expected)
    for key, want in expected.items():
        got = finals[key]
        assert got["count"] == want["count"], key
        assert got["min"] == want["min"], key
        assert got["max"] == want["max"], key
        assert got["avg"] == pytest.approx(want["avg"], rel=1e-12), key
        assert abs(got["p95"] - want["p95"]) <= 0.01 * want["p95"], (key, got["p95"], want["p95"])
        assert got["bucket_end"] == bucket_end(key[1], key[2])  # type: ignore[arg-type]


def spanning_samples(seed: int = 5) -> list[dict]:
    """Two GPUs, a sample every 7 minutes from Jan 31 20:00 to Feb 1 03:00 UTC (a month boundary)."""
    rng = random.Random(seed)
    out = []
    time = at(2026, 1, 31, 20)
    while time < at(2026, 2, 1, 3):
        for index in (0, 1):
            out.append(gpu(time, rng.uniform(0, 100), index=index, power_watts=rng.uniform(50, 700)))
        time += timedelta(minutes=7)
    return out


CLOSE_ALL = gpu(at(2027, 1, 1, 1), 1.0, host="z")  # past 2026's year end plus the lateness


def expected_for(samples: Iterable[dict]) -> dict[tuple[str, str, int], dict]:
    points = []
    for value in samples:
        if value["time"].year != 2026:
            continue
        points.append((util_series(value["host"], value["gpu"]), value["time"], value["utilization_percent"]))
        series = util_series(value["host"], value["gpu"]).replace(
            "gpu_utilization_percent", "gpu_power_watts"
        )
        points.append((series, value["time"], value["power_watts"]))
    return offline(points)


def only_2026(finals: dict[tuple[str, str, int], dict]) -> dict[tuple[str, str, int], dict]:
    return {key: value for key, value in finals.items() if key[2] < to_ms(at(2027, 1, 1))}


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_every_tier_matches_an_offline_computation(size: int) -> None:
    samples = spanning_samples()
    partition = Partition(RollupProcessor())
    partition.feed(partition.inputs([*samples, CLOSE_ALL]), size)
    finals = only_2026(partition.finals())
    assert_matches(finals, expected_for(samples))
    tiers = {key[1] for key in finals}
    assert tiers == set(TIERS)
    months = {iso(key[2]) for key in finals if key[1] == "month"}
    assert months == {"2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"}
    assert partition.late() == []


def test_results_do_not_depend_on_batching() -> None:
    samples = [*spanning_samples(), CLOSE_ALL]
    runs = []
    for size in (1, 3, 50, 1000):
        partition = Partition(RollupProcessor())
        partition.feed(partition.inputs(samples), size)
        runs.append(partition.finals())
    assert all(run == runs[0] for run in runs[1:])


def test_p95_comes_from_the_merged_sketch_not_from_averaged_p95s() -> None:
    # Hour 1 holds small values, hour 2 large ones: the day's p95 is a large value, while an average of
    # the two hourly p95s would be in between.
    values = [gpu(at(2026, 5, 1, 1, minute), 1.0 + minute / 100) for minute in range(60)]
    values += [gpu(at(2026, 5, 1, 2, minute), 90.0 + minute / 10) for minute in range(60)]
    values.append(gpu(at(2026, 5, 2, 1), 5.0))
    partition = Partition(RollupProcessor())
    partition.feed(partition.inputs(values), 40)
    day = partition.finals()[(util_series(), "day", to_ms(at(2026, 5, 1)))]
    exact = sorted(v["utilization_percent"] for v in values[:-1])[math.floor(0.95 * 119)]
    assert abs(day["p95"] - exact) <= 0.01 * exact
    reference = sketch.new_sketch()
    for value in values[:-1]:
        sketch.add(reference, value["utilization_percent"])
    assert day["sketch"] == sketch.to_avro(reference)  # the same bins bus/sketch.py makes


def test_late_samples_are_dead_lettered_with_the_reason_and_on_time_ones_count() -> None:
    processor = RollupProcessor(lateness=timedelta(minutes=10), emit_interval=timedelta(0))
    partition = Partition(processor)
    values = [
        gpu(at(2026, 3, 2, 10, 30), 10.0),
        gpu(at(2026, 3, 2, 11, 5), 20.0),
        gpu(at(2026, 3, 2, 10, 59), 30.0),  # 6 min behind, within the lateness: counts in 10:00
        gpu(at(2026, 3, 2, 11, 14), 40.0),  # the watermark passes 11:10: hour 10:00 is final
        gpu(at(2026, 3, 2, 10, 58), 50.0),  # 16 min behind: late
        gpu(at(2026, 3, 2, 11, 0), 60.0),  # 14 min behind, but its hour is still open
    ]
    partition.feed(partition.inputs(values), 2)
    late = partition.late()
    assert [record.offset for record, _ in late] == [4]
    reason = late[0][1]
    assert re.fullmatch(
        r"rollups: event time 2026-03-02T10:58:00Z is 0:16:00 behind the watermark 2026-03-02T11:14:00Z; "
        r"allowed lateness 0:10:00 \(AIMA_STREAMS_LATENESS_S\) \(hour bucket 2026-03-02T10:00:00Z is final\)",
        reason,
    ), reason
    hour = partition.finals()[(util_series(), "hour", to_ms(at(2026, 3, 2, 10)))]
    assert (hour["count"], hour["min"], hour["max"]) == (2, 10.0, 30.0)
    latest_eleven = [
        v
        for v in partition.outputs()
        if v["tier"] == "hour" and v["bucket_start"] == to_ms(at(2026, 3, 2, 11))
    ][-1]
    assert latest_eleven["count"] == 3 and not latest_eleven["final"]


def test_a_replayed_batch_is_not_counted_twice_nor_dead_lettered() -> None:
    samples = [*spanning_samples(), CLOSE_ALL]
    inputs = Partition(RollupProcessor()).inputs(samples)
    once = Partition(RollupProcessor())
    once.feed(inputs, 10)
    twice = Partition(RollupProcessor())
    twice.feed(inputs[:40], 10)
    twice.run(inputs[20:60], resumed=True)  # at-least-once: 20..39 again
    for start in range(60, len(inputs), 10):
        twice.run(inputs[start : start + 10])
    assert twice.finals() == once.finals()
    assert twice.late() == []


@pytest.mark.parametrize("cut", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_a_restart_from_any_changelog_prefix_gives_the_same_finals(cut: float) -> None:
    """Kill the worker in the middle of a batch that closes buckets: the changelog holds a prefix of the
    writes, outputs since the last commit are lost; after the restart the replay gives the same finals."""
    samples = [*spanning_samples(), CLOSE_ALL]
    inputs = Partition(RollupProcessor()).inputs(samples)
    reference = Partition(RollupProcessor())
    reference.feed(inputs, 9)

    size = 9
    crashing = Partition(RollupProcessor())
    batches = [inputs[i : i + size] for i in range(0, len(inputs), size)]
    # The batch that crosses 2026-02-01 00:10 closes hours, Jan 31 and January.
    k = next(i for i, batch in enumerate(batches) if batch[-1].event_time >= at(2026, 2, 1, 0, 10))
    committed_batches = k - 1  # the last commit covers the batches before k - 1
    durable_outputs = []
    for index, batch in enumerate(batches[: k + 1]):
        before = len(crashing.state.log)
        crashing.run(batch)
        if index == k:
            writes = crashing.state.log[before:]
            assert any(json.loads(value).get("f") is not None for key, value in writes if key[0] in "hdm")
        if index < committed_batches:
            durable_outputs.extend(crashing.results[-1].outputs)
    prefix = crashing.state.log[: len(crashing.state.log) - len(writes) + int(len(writes) * cut)]

    restarted = Partition(RollupProcessor())  # a new process: no caches either
    restarted.state = restore((key, value) for key, value in prefix if key != "#progress")
    progress = [value for key, value in prefix if key == "#progress"]
    restarted.watermark = datetime.fromtimestamp(json.loads(progress[-1]) / 1000, UTC) if progress else None
    replay_from = committed_batches * size
    committed = replay_from if committed_batches else None
    restarted.run(inputs[replay_from : replay_from + size], resumed=True, committed=committed)
    for start in range(replay_from + size, len(inputs), size):
        restarted.run(inputs[start : start + size], committed=committed)

    finals = finals_of([*(o.value for o in durable_outputs), *restarted.outputs()])
    assert finals == reference.finals()
    assert restarted.late() == reference.late() == []


def test_a_changelog_written_when_the_offset_was_called_o_carries_on() -> None:
    """State written by the version before streams/runtime/state.py named the replay offset ``offset`` (it was
    ``o`` in rollup entries) restores and carries on: the same finals, nothing counted twice or late."""
    samples = [*spanning_samples(), CLOSE_ALL]
    inputs = Partition(RollupProcessor()).inputs(samples)
    reference = Partition(RollupProcessor())
    reference.feed(inputs, 9)

    half = len(inputs) // 2
    before = Partition(RollupProcessor())
    before.feed(inputs[:half], 9)
    old_log = []
    for key, value in before.state.log:
        entry = None if value is None else json.loads(value)
        if isinstance(entry, dict) and "offset" in entry:
            entry["o"] = entry.pop("offset")
        old_log.append((key, None if entry is None else json.dumps(entry)))
    assert any('"o":' in value for _, value in old_log if value)

    restarted = Partition(RollupProcessor())
    restarted.state = restore((key, value) for key, value in old_log if key != "#progress")
    restarted.watermark = before.watermark
    restarted.run(inputs[half - 9 : half + 9], resumed=True)  # a replay of the last batch, then new ones
    for start in range(half + 9, len(inputs), 9):
        restarted.run(inputs[start : start + 9])

    assert finals_of([*before.outputs(), *restarted.outputs()]) == reference.finals()
    assert restarted.late() == reference.late() == []


_GPU_A0 = '["GpuSample","0","H100","GPU-a-0","a",null]'
_UTIL_A0 = 'gpu_utilization_percent{gpu="0",gpu_model="H100",gpu_uuid="GPU-a-0",host="a"}'
_POWER_A0 = 'gpu_power_watts{gpu="0",gpu_model="H100",gpu_uuid="GPU-a-0",host="a"}'
POSITIONAL_CHANGELOG = [
    (
        f"d|1772409600000|{_GPU_A0}",
        {
            "offset": 2,
            "s": {
                _UTIL_A0: [3, 49.75, 0.0, 42.5, 1, {"188": 1, "100": 1}],
                _POWER_A0: [1, 300.0, 300.0, 300.0, 0, {"286": 1}],
            },
            "c": [1772445600000],
        },
    ),
    (
        f"h|1772445600000|{_GPU_A0}",
        {
            "offset": 2,
            "s": {
                _UTIL_A0: [3, 49.75, 0.0, 42.5, 1, {"188": 1, "100": 1}],
                _POWER_A0: [1, 300.0, 300.0, 300.0, 0, {"286": 1}],
            },
            "e": None,
            "f": 3,
        },
    ),
    (
        f"h|1772449200000|{_GPU_A0}",
        {"offset": 3, "s": {_UTIL_A0: [1, 99.0, 99.0, 99.0, 0, {"230": 1}]}, "e": 1772450100000},
    ),
]
"""The changelog the processor wrote before aggregates had a type (streams/rollups/aggregate.py), each series
as a positional ``[count, sum, min, max, zeros, bins]``, for the first four of ``positional_samples``."""


def positional_samples() -> list[dict]:
    return [
        gpu(at(2026, 3, 2, 10, 0), 0.0),
        gpu(at(2026, 3, 2, 10, 20), 42.5, power_watts=300.0),
        gpu(at(2026, 3, 2, 10, 40), 7.25),
        gpu(at(2026, 3, 2, 11, 15), 99.0),
        gpu(at(2026, 3, 2, 11, 30), 0.5, power_watts=120.0),
        gpu(at(2026, 3, 2, 12, 5), 63.0),
        gpu(at(2026, 3, 3, 1, 0), 12.0),
        CLOSE_ALL,
    ]


def test_the_changelog_keeps_the_positional_form() -> None:
    """State is written as it was before aggregates had a type: a changelog reader sees no change."""
    partition = Partition(RollupProcessor())
    partition.run(partition.inputs(positional_samples()[:4]))
    log = [(key, json.loads(value)) for key, value in partition.state.log if key != "#progress"]
    assert log == POSITIONAL_CHANGELOG


def test_a_changelog_of_positional_aggregates_restores_to_the_same_finals() -> None:
    inputs = Partition(RollupProcessor()).inputs(positional_samples())
    reference = Partition(RollupProcessor())
    reference.run(inputs[:4])
    reference.run(inputs[4:])

    restarted = Partition(RollupProcessor())
    restarted.state = restore((key, json.dumps(value)) for key, value in POSITIONAL_CHANGELOG)
    restarted.watermark = at(2026, 3, 2, 11, 15)
    restarted.run(inputs, resumed=True)  # the first four replayed, then new ones

    durable = [o.value for o in reference.results[0].outputs]
    assert finals_of([*durable, *restarted.outputs()]) == reference.finals()
    assert any(key[1] == "year" for key in reference.finals())
    assert restarted.late() == reference.late() == []


def test_non_final_upserts_are_throttled_by_event_time() -> None:
    partition = Partition(RollupProcessor(emit_interval=timedelta(seconds=60)))
    values = [gpu(at(2026, 3, 2, 10) + timedelta(seconds=10 * i), float(i)) for i in range(30)]
    for record in partition.inputs(values):
        partition.run([record])
    emitted = [v["watermark"] for v in partition.outputs() if v["series"] == util_series() and not v["final"]]
    assert len(emitted) == 5  # at 0 s, 60 s, 120 s, 180 s, 240 s
    assert all(later - earlier >= 60_000 for earlier, later in itertools.pairwise(emitted))


def test_a_resumed_partition_re_emits_finals_not_known_to_be_committed_and_prunes_committed_ones() -> None:
    partition = Partition(RollupProcessor())
    values = [gpu(at(2026, 3, 2, 10, m), float(m)) for m in range(0, 60, 10)]
    values.append(gpu(at(2026, 3, 2, 11, 15), 1.0))  # closes 10:00 at offset 6
    partition.run(partition.inputs(values))
    key = f"h|{to_ms(at(2026, 3, 2, 10))}|" + '["GpuSample","0","H100","GPU-a-0","a",null]'
    assert partition.state[key]["f"] == 6
    again = partition.inputs([gpu(at(2026, 3, 2, 11, 16), 2.0)], first_offset=7)

    partition.run(again, resumed=True, committed=5)  # restarted: offset 6 was not committed
    hour = to_ms(at(2026, 3, 2, 10))
    re_sent = [
        v for v in partition.results[-1].outputs if v.value["final"] and v.value["bucket_start"] == hour
    ]
    assert {o.value["series"] for o in re_sent} == {util_series()}
    assert key in partition.state

    partition.run(
        partition.inputs([gpu(at(2026, 3, 2, 11, 17), 3.0)], first_offset=8), resumed=True, committed=8
    )
    assert key not in partition.state  # committed past its final offset: dropped
    assert not any(v.value["final"] for v in partition.results[-1].outputs if v.value["bucket_start"] == hour)


def timings(time: datetime, durations: list[float], *, job: str = "j1", kind: str = "frame") -> dict:
    summary = sketch.new_sketch()
    for duration in durations:
        sketch.add(summary, duration)
    return {
        "time": time,
        "interval_start": time - timedelta(seconds=10),
        "job_id": job,
        "project": "news",
        "model": "yolo",
        "host": "a",
        "kind": kind,
        "kernel": None,
        "direction": None,
        "bytes": None,
        "count": len(durations),
        "sum_seconds": math.fsum(durations),
        "min_seconds": min(durations),
        "max_seconds": max(durations),
        "sketch": sketch.to_avro(summary),
        "source": "test",
    }


def test_summary_records_merge_count_sum_min_max_and_sketch() -> None:
    rng = random.Random(9)
    batches = [[rng.lognormvariate(-3, 0.7) for _ in range(rng.randint(5, 40))] for _ in range(30)]
    values = [timings(at(2026, 4, 1, 9) + timedelta(seconds=10 * i), d) for i, d in enumerate(batches)]
    values.append(timings(at(2026, 4, 1, 12), [0.5], kind="batch"))  # moves the watermark on
    partition = Partition(RollupProcessor(), topic="job.timings")
    partition.feed(partition.inputs(values, record="aima.metrics.JobTimings"), 4)
    series = 'job_frame_processing_seconds{job_id="j1",model="yolo",project="news"}'
    hour = partition.finals()[(series, "hour", to_ms(at(2026, 4, 1, 9)))]
    every = sorted(d for durations in batches for d in durations)
    assert hour["count"] == len(every)
    assert hour["sum"] == pytest.approx(math.fsum(every), rel=1e-12)
    assert (hour["min"], hour["max"]) == (every[0], every[-1])
    exact = every[math.floor(0.95 * (len(every) - 1))]
    assert abs(hour["p95"] - exact) <= 0.01 * exact
    assert not any(key[0].startswith("job_batch") and key[1] == "hour" for key in partition.finals())


def test_array_metrics_make_one_series_per_item() -> None:
    value = {
        "time": at(2026, 4, 1, 9),
        "host": "h",
        "source": "test",
        "cpu_utilization_percent": 12.5,
        "memory_used_bytes": None,
        "memory_total_bytes": None,
        "disks": [
            {"mountpoint": "/", "used_bytes": 100, "total_bytes": 1000},
            {"mountpoint": "/data", "used_bytes": 700, "total_bytes": 1000},
        ],
        "networks": None,
        "containers_running": None,
    }
    partition = Partition(RollupProcessor(), topic="system.samples")
    result = partition.run(partition.inputs([value], record="aima.metrics.SystemSample"))
    by_series = {o.value["series"]: o.value for o in result.outputs}
    assert set(by_series) == {
        'host_cpu_utilization_percent{host="h"}',
        'host_disk_used_bytes{host="h",mountpoint="/"}',
        'host_disk_used_bytes{host="h",mountpoint="/data"}',
    }
    assert by_series['host_disk_used_bytes{host="h",mountpoint="/data"}']["max"] == 700.0
    assert by_series['host_disk_used_bytes{host="h",mountpoint="/"}']["labels"] == {
        "host": "h",
        "mountpoint": "/",
    }


def test_where_selects_which_records_carry_a_metric() -> None:
    def event(kind: str, wait: float | None, offset_minutes: int) -> dict:
        return {
            "time": at(2026, 4, 1, 9, offset_minutes),
            "job_id": "j1",
            "event": kind,
            "project": "news",
            "user": None,
            "service": None,
            "queue": "default",
            "model": None,
            "host": None,
            "gpu_count": 1,
            "gpu_model": None,
            "provider": None,
            "pricing": None,
            "media_minutes": None,
            "queue_wait_seconds": wait,
            "error": None,
            "source": "test",
        }

    partition = Partition(RollupProcessor(), topic="job.events")
    result = partition.run(
        partition.inputs(
            [event("queued", None, 0), event("started", 42.0, 1)], record="aima.metrics.JobEvent"
        )
    )
    # job_queue_wait_seconds spans job.events' partitions: it goes out as this partition's partial.
    partials = [o.value["rollup"] for o in result.outputs if o.value.get("rollup")]
    assert [rollup["series"] for rollup in partials] == [
        'job_queue_wait_seconds{project="news",queue="default"}'
    ]
    assert partials[0]["count"] == 1
    assert len([k for k in partition.state if k.startswith("h|")]) == 1


def test_quantile_of_bins_answers_as_ddsketch() -> None:
    rng = random.Random(3)
    mapping = LogarithmicMapping(0.01)
    for _ in range(500):
        reference = sketch.new_sketch()
        for _ in range(rng.randint(1, 200)):
            value = rng.choice([0.0, rng.uniform(0, 1), rng.lognormvariate(0, 2), float(rng.randint(0, 5))])
            sketch.add(reference, value, rng.choice([1.0, 2.0]))
        record = sketch.to_avro(reference)
        for q in (0.0, 0.5, 0.95, 1.0):
            answer = quantile_of_bins(mapping, record["zero_count"], record["keys"], record["counts"], q)
            assert answer == sketch.quantile(reference, q)


def test_parents_are_written_before_the_children_they_hold() -> None:
    partition = Partition(RollupProcessor())
    partition.feed(partition.inputs([*spanning_samples(), CLOSE_ALL]), 1000)
    position = {}
    for index, (key, value) in enumerate(partition.state.log):
        if value is not None and key[0] in "hdmy":
            entry = json.loads(value)
            position.setdefault((key, "f" in entry), index)
    for (key, final), index in position.items():
        if not final:
            continue
        letter, start, entity = key.split("|", 2)
        tier = {"h": "hour", "d": "day", "m": "month", "y": "year"}[letter]
        parent = PARENT[tier]  # type: ignore[index]
        if parent is None:
            continue
        parent_key = f"{parent[0]}|{bucket_start(parent, int(start))}|{entity}"
        holds = [
            i
            for i, (k, v) in enumerate(partition.state.log)
            if k == parent_key and v and int(start) in json.loads(v)["c"]
        ]
        assert holds and holds[0] < index, key


def test_the_apps_own_cost_figures_are_not_rolled_up_again() -> None:
    topics = rollup_topics()
    assert "costs" not in topics  # upserts per period: re-folding them would count re-sends, judge them late
    assert {"gpu.samples", "system.samples", "job.events", "job.timings"} <= set(topics)


POD = "aima.metrics.PodStatus"


def pod(time: datetime, phase: str, restarts: int, *, name: str = "sim-7-000001") -> dict:
    return {"time": time, "namespace": "sim", "pod": name, "host": None, "phase": phase,
            "ready": phase == "Running", "restarts": restarts, "source": "test",
            "cpu_usage_cores": None, "memory_usage_bytes": None}  # fmt: skip


def test_a_pod_that_changes_phase_is_one_restarts_series_with_every_sample() -> None:
    # k8s_pod_restarts is labelled {namespace, pod}, k8s_pod_status {namespace, pod, phase}: the phases
    # must not split the restarts of one pod into aggregates that overwrite each other downstream.
    phases = ["Pending"] * 4 + ["Running"] * 30 + ["Failed"] * 2 + ["Running"] * 8
    start = at(2026, 3, 1, 12)
    values = [pod(start + timedelta(seconds=60 * i), phase, i // 10) for i, phase in enumerate(phases)]
    values.append(pod(at(2027, 1, 1, 1), "Running", 0, name="closer"))  # past every tier's end
    partition = Partition(RollupProcessor(), topic="k8s.pods")
    partition.feed(partition.inputs(values, record=POD), 7)
    restarts = series_id("k8s_pod_restarts", {"namespace": "sim", "pod": "sim-7-000001"})
    finals = partition.finals()
    for tier in TIERS:
        final = finals[(restarts, tier, bucket_start(tier, to_ms(start)))]
        assert (final["count"], final["sum"]) == (44, float(sum(i // 10 for i in range(44)))), tier
    for phase, count in {"Pending": 4, "Running": 38, "Failed": 2}.items():
        status = series_id("k8s_pod_status", {"namespace": "sim", "pod": "sim-7-000001", "phase": phase})
        assert finals[(status, "hour", to_ms(start))]["count"] == count
    # Every output key comes from one aggregate: no two differing values under one key in one batch.
    for result in partition.results:
        seen: dict[str, dict] = {}
        for output in result.outputs:
            assert seen.setdefault(output.key, output.value) == output.value, output.key


def _rolled_up_metrics() -> Iterator[tuple[str, str]]:
    for topic in rollup_topics():
        for metric in METRICS:
            if metric.record == BY_KEY[topic].schema:
                yield topic, metric.name


@pytest.mark.parametrize(("topic", "name"), list(_rolled_up_metrics()))
def test_every_rolled_up_series_lives_on_one_partition_of_its_topic_or_is_merged(
    topic: str, name: str
) -> None:
    # Rollup state is kept per input partition: a series whose samples a topic spreads over several
    # partitions gets a partial aggregate on each, which must not go out as the series' rollup (the parts
    # would overwrite each other under one (series, tier, bucket) key). Either the series lives on one
    # partition (its labels include the topic's key fields), or the catalogue says it spans partitions and
    # the rollup processor sends its parts to the merge (streams/rollups/merge.py) instead.
    metric = BY_NAME[name]
    key_fields = set(BY_KEY[topic].message_key.split("/"))
    labels = set(metric.labels)
    on_one_partition = key_fields <= labels
    assert on_one_partition or metric.spans_partitions, (
        f"{name} {sorted(labels)} lacks {topic}'s key fields {sorted(key_fields)} and is not marked "
        "spans_partitions in the catalogue"
    )
    assert not (on_one_partition and metric.spans_partitions), f"{name} lives on one partition: no merge"
    assert (name in RollupProcessor().merged_metrics) is metric.spans_partitions
