"""A 40-day backfill through the real broker: the simulator publishes a small fleet's history up to now in
event-time order (producers.simulator.backfill), the stream app (``python -m streams.main``, every
processor) runs as a subprocess, and the rollups and costs topics are compared with an offline computation
over the same records (regenerated from the seed): zero dead letters, exact GPU-hours, job costs, budgets
and idle hours, exact rollup counts, min, max and avg, p95 within the sketch's 1 %."""

from __future__ import annotations

import contextlib
import math
import zlib
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import BY_KEY
from producers.simulator import Fleet, backfill, generate
from streams.runtime.buckets import HOUR_MS, TIERS, bucket_end, bucket_start, to_ms
from streams.runtime.series import series_id
from tests.integration.test_streams_rollups import Topic, assert_same, stop, wait_until, worker

pytestmark = pytest.mark.integration

DAYS, STEP_S, SEED, HOSTS, GPUS = 40, 600.0, 5, 2, 2
JOBS_PER_HOUR = 0.25
MAX_GAP_S = 900.0  # above the 10-minute sampling step: a GPU counts as present between its samples
LATENESS_MS = 10 * 60 * 1000
TOPICS = ("gpu.samples", "job.events")
PRICES = {("aws", "NVIDIA H100 80GB HBM3", "on_demand"): 4.0, ("gcp", "NVIDIA A100-SXM4-40GB", "spot"): 1.5}
PRICES_YAML = """providers:
  aws: {"NVIDIA H100 80GB HBM3": {on_demand: 4.0}}
  gcp: {"NVIDIA A100-SXM4-40GB": {spot: 1.5}}
"""
GPU_METRICS = {"utilization_percent": "gpu_utilization_percent", "power_watts": "gpu_power_watts"}


def history(start: datetime, end: datetime) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The records the backfill publishes, as a reader decodes them (times in milliseconds)."""
    fleet = Fleet(seed=SEED, hosts=HOSTS, gpus_per_host=GPUS, start=start, arrivals_per_hour=JOBS_PER_HOUR)
    codec = Codec()
    return [
        (topic, key, name, codec.decode(codec.encode(name, value))[1])
        for topic, key, name, value in generate(fleet, start, end, STEP_S)
        if topic in TOPICS
    ]


def _hour_label(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:00Z")


def _split(start: int, end: int) -> list[tuple[int, int]]:
    out, hour = [], start - start % HOUR_MS
    while hour < end:
        overlap = min(end, hour + HOUR_MS) - max(start, hour)
        if overlap > 0:
            out.append((hour, overlap))
        hour += HOUR_MS
    return out


def offline_costs(records: list[tuple[str, str, str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The settled cost figures, by their key on the costs topic: every hour no job still running at the
    end touches, every ended job, the budget record of each month that ended, the idle hours."""
    jobs: dict[str, dict[str, Any]] = {}
    for topic, _, _, value in records:
        if topic != "job.events":
            continue
        if value["event"] == "started":
            jobs[value["job_id"]] = {"start": to_ms(value["time"]), "end": None, **value}
        elif value["event"] in ("finished", "failed"):
            jobs[value["job_id"]].update(end=to_ms(value["time"]), media=value["media_minutes"])
    last_ms = max(to_ms(value["time"]) for _, _, _, value in records)
    hours: dict[tuple[str, str, str, str, int], float] = defaultdict(float)
    open_hours: set[tuple[str, str, str, str, int]] = set()
    out: dict[str, dict[str, Any]] = {}
    for job_id, job in jobs.items():
        slot = (job["project"], job["gpu_model"], job["provider"], job["pricing"])
        if job["end"] is None:
            open_hours.update((*slot, h) for h, _ in _split(job["start"], last_ms + HOUR_MS))
            continue
        for hour, overlap in _split(job["start"], job["end"]):
            hours[(*slot, hour)] += job["gpu_count"] * overlap / HOUR_MS
        total = job["gpu_count"] * (job["end"] - job["start"]) / HOUR_MS
        cost = total * PRICES[(job["provider"], job["gpu_model"], job["pricing"])]
        out[f"job|{job_id}"] = {
            "gpu_hours": total,
            "job_cost_eur": cost,
            "job_cost_per_media_minute_eur": cost / job["media"] if job["media"] else None,
        }
    months: dict[tuple[str, str], float] = defaultdict(float)
    allocated: dict[tuple[str, int], float] = defaultdict(float)
    for key, gpu_hours in hours.items():
        project, model, provider, pricing, hour = key
        allocated[(model, hour)] += gpu_hours
        if key in open_hours:
            continue
        cost = gpu_hours * PRICES[(provider, model, pricing)]
        label = f"{project}|{model}|{provider}|{pricing}|{_hour_label(hour)}"
        out[label] = {"gpu_hours": gpu_hours, "cost_estimated_eur": cost}
        months[(project, _hour_label(hour)[:7])] += cost
    first_month = min(month for _, month in months)
    for (project, month), spent in months.items():
        if month == first_month:  # the only month that ended before the history did
            out[f"budget|{project}||{month}"] = {"cost_estimated_eur": spent, "forecast_eur": spent}
    busy = {(model, hour) for _, model, _, _, hour in open_hours}
    for (model, hour), device in offline_device_hours(records).items():
        if (model, hour) in busy:
            continue
        idle = max(device - allocated.get((model, hour), 0.0), 0.0)
        out[f"idle|{model}|{_hour_label(hour)}"] = {"device_hours": device, "idle_gpu_hours": idle}
    return out


def offline_device_hours(records: list[tuple[str, str, str, dict[str, Any]]]) -> dict[tuple[str, int], float]:
    last: dict[str, int] = {}
    found: dict[tuple[str, int], float] = defaultdict(float)
    gap = int(MAX_GAP_S * 1000)
    for topic, _, _, value in records:
        if topic != "gpu.samples":
            continue
        t, uuid = to_ms(value["time"]), value["gpu_uuid"]
        before = last.get(uuid)
        if before is not None and t > before:
            for hour, overlap in _split(before, min(t, before + gap)):
                found[(value["gpu_model"], hour)] += overlap / HOUR_MS
        if before is None or t > before:
            last[uuid] = t
    return found


Key = tuple[str, str, int]


def offline_rollups(records: list[tuple[str, str, str, dict[str, Any]]]) -> dict[Key, dict[str, Any]]:
    """Final rollups of two GPU metrics: the buckets whose end plus the lateness each partition's
    watermark passed (librdkafka's partitioner, crc32 of the key, spelt out)."""
    values: dict[Key, list[float]] = defaultdict(list)
    where: dict[Key, int] = {}
    watermark: dict[int, int] = {}
    partitions = BY_KEY["gpu.samples"].partitions
    for topic, key, _, value in records:
        if topic != "gpu.samples":
            continue
        partition = zlib.crc32(key.encode()) % partitions
        event = to_ms(value["time"])
        watermark[partition] = max(watermark.get(partition, event), event)
        labels = {name: str(value[name]) for name in ("host", "gpu", "gpu_uuid", "gpu_model")}
        for field, metric in GPU_METRICS.items():
            if value.get(field) is None:
                continue
            for tier in TIERS:
                bucket = (series_id(metric, labels), tier, bucket_start(tier, event))
                values[bucket].append(float(value[field]))
                where[bucket] = partition
    finals = {}
    for bucket, found in values.items():
        if bucket_end(bucket[1], bucket[2]) + LATENESS_MS > watermark[where[bucket]]:
            continue
        ordered = sorted(found)
        finals[bucket] = {
            "count": len(found),
            "min": ordered[0],
            "max": ordered[-1],
            "avg": math.fsum(found) / len(found),
            "p95": ordered[math.floor(0.95 * (len(found) - 1))],
        }
    return finals


def _gpu_finals(records: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    latest: dict[Key, dict[str, Any]] = {}
    for value in records:
        if value["metric"] in GPU_METRICS.values():
            latest[(value["series"], value["tier"], to_ms(value["bucket_start"]))] = value
    return {key: value for key, value in latest.items() if value["final"]}


def _latest_costs(records: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for key, value in zip(keys, records, strict=True):
        latest[key] = value
    return latest


def _matches(got: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    if got is None:
        return False
    for name, expected in want.items():
        if expected is None:
            if got[name] is not None:
                return False
        elif got[name] is None or not math.isclose(got[name], expected, rel_tol=1e-9, abs_tol=1e-9):
            return False
    return True


class _KeyedTopic(Topic):
    """A Topic that also keeps each record's key (the costs topic is read as upserts)."""

    def __init__(self, settings: Settings, key: str) -> None:
        super().__init__(settings, key)
        self.keys: list[str] = []

    def poll(self) -> None:
        for message in self.consumer.consume(5000, timeout=0.5):
            assert message.error() is None, message.error()
            self.records.append(self.codec.decode(message.value())[1])
            self.keys.append(message.key().decode())


@pytest.mark.parametrize("catch_up", [False, True], ids=["live", "catch-up"])
def test_a_40_day_backfill_is_processed_completely(
    topics: Settings, tmp_path: Path, unique: str, catch_up: bool
) -> None:
    """``live``: the app runs while the history is published. ``catch-up``: it starts once all of it is on
    the broker, as after an outage, so it reads each partition's backlog in large fetches, one partition
    days ahead of another; the figures must not depend on that pace."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    start = end - timedelta(days=DAYS)
    records = history(start, end)
    expected_costs = offline_costs(records)
    expected_rollups = offline_rollups(records)
    assert len(expected_rollups) > 1000 and sum(k.startswith("job|") for k in expected_costs) > 100
    assert sum(k.startswith("budget|") for k in expected_costs) >= 2
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES_YAML)
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("budgets: [{project: news, name: gpu, monthly_eur: 100}]\n")
    log = tmp_path / "worker.log"
    rollups, costs, letters = (
        Topic(topics, "rollups"),
        _KeyedTopic(topics, "costs"),
        Topic(topics, "deadletter"),
    )
    running: list[Any] = []

    def start_worker() -> None:
        running.append(
            worker(
                topics,
                f"backfill-{unique}",
                log,
                AIMA_PRICES_FILE=str(prices),
                AIMA_BUDGETS_FILE=str(budgets),
                AIMA_DEVICE_MAX_GAP_S=str(MAX_GAP_S),
                AIMA_STREAMS_COMMIT_INTERVAL_S="1",
            )
        )

    try:
        if not catch_up:
            start_worker()
        report = backfill(
            topics, start, end, step_s=STEP_S, hosts=HOSTS, gpus_per_host=GPUS, seed=SEED,
            arrivals_per_hour=JOBS_PER_HOUR, topics=TOPICS,
        )  # fmt: skip
        assert (report.records, report.rejected, report.pending) == (len(records), 0, 0)
        if catch_up:
            start_worker()

        def complete() -> bool:
            rollups.poll()
            costs.poll()
            letters.poll()
            if letters.records:
                return True  # fails below, with what was dead-lettered
            latest = _latest_costs(costs.records, costs.keys)
            return set(_gpu_finals(rollups.records)) >= set(expected_rollups) and all(
                _matches(latest.get(key), want) for key, want in expected_costs.items()
            )

        with contextlib.suppress(AssertionError):  # timed out: the asserts below say what is missing
            wait_until(complete, 900, running, log)
        stop(running, log)
        letters.poll()
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
        rollups.close()
        costs.close()
        letters.close()
    assert letters.records == [], [(r["error_type"], r["reason"]) for r in letters.records[:5]]
    finals = _gpu_finals(rollups.records)
    missing = set(expected_rollups) - set(finals)
    assert not missing, (len(missing), len(expected_rollups), sorted(missing)[:3])
    latest = _latest_costs(costs.records, costs.keys)
    wrong = {
        key: (latest.get(key), want)
        for key, want in expected_costs.items()
        if not _matches(latest.get(key), want)
    }
    assert not wrong, (len(wrong), len(expected_costs), list(wrong.items())[:3])
    assert_same(
        {key: value for key, value in _gpu_finals(rollups.records).items() if key in expected_rollups},
        expected_rollups,
    )
    assert "Traceback" not in log.read_text()
