"""Rollups end to end on the real broker: recorded samples in, the stream app (``python -m streams.main``)
as a subprocess, the rollups and dead-letter topics read back and compared with an offline computation
over the same samples: exact count, min, max and avg, p95 within the sketch's 1 %. Also after kill -9
mid-stream and a restart, and with two workers sharing the partitions."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from bus.codec import Codec
from bus.kafka import client_config
from bus.settings import REPO_ROOT, Settings
from bus.topics import BY_KEY, topic_name
from streams.runtime.buckets import HOUR_MS, TIERS, bucket_end, bucket_start, to_ms
from streams.runtime.series import series_id
from tests.private_stack import free_port as _free_port
from tests.unit.test_rollups import exact_summary

pytestmark = pytest.mark.integration

START = datetime(2026, 1, 31, 22, tzinfo=UTC)
END = datetime(2026, 2, 1, 1, tzinfo=UTC)  # three hours across a day, month and (not) year boundary
LATENESS_MS = 10 * 60 * 1000
GPU_METRICS = {"utilization_percent": "gpu_utilization_percent", "power_watts": "gpu_power_watts"}


@dataclass
class Sent:
    topic: str
    partition: int
    key: bytes
    value: dict[str, Any] | None
    """None for a record that is not Avro at all."""
    record: str
    offset: int = -1


def _gpu(
    time_: datetime, host: str, index: int, rng: random.Random, utilization: float | None = None
) -> Sent:
    value = {
        "time": time_,
        "host": host,
        "gpu": index,
        "gpu_uuid": f"GPU-{host}-{index}",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "source": "test",
        "interval_group": "fast",
        "utilization_percent": rng.uniform(0, 100) if utilization is None else utilization,
        "power_watts": rng.uniform(60, 700),
    }
    return Sent("gpu.samples", -1, f"{host}/GPU-{host}-{index}".encode(), value, "GpuSample")


def _system(time_: datetime, host: str, rng: random.Random) -> Sent:
    value = {
        "time": time_,
        "host": host,
        "source": "test",
        "cpu_utilization_percent": rng.uniform(0, 100),
        "disks": [{"mountpoint": "/", "used_bytes": rng.randrange(1, 10**9), "total_bytes": 10**9}],
    }
    return Sent("system.samples", -1, host.encode(), value, "SystemSample")


def recorded(seed: int = 11) -> list[Sent]:
    """Every 30 s for three hours: 4 hosts x 2 GPUs and the hosts' system samples; a late sample and one
    within the lateness per GPU host after each hour; a poison record and an invalid one; and per partition
    a closer at 03:00 that moves every watermark past the last hour, day and month to close."""
    rng = random.Random(seed)
    hosts = [f"node-{i}" for i in range(4)]
    out: list[Sent] = []
    moment = START
    while moment < END:
        for host in hosts:
            for index in (0, 1):
                out.append(_gpu(moment, host, index, rng))
            out.append(_system(moment, host, rng))
        if moment.minute == 20 and moment.second == 0 and moment > START:
            hour = moment.replace(minute=0) - timedelta(hours=1)
            for host in hosts[:2]:
                out.append(_gpu(hour + timedelta(minutes=55), host, 0, rng))  # 25 min behind: late
            out.append(_gpu(moment - timedelta(minutes=9), hosts[2], 1, rng))  # 9 min behind: counted
        if moment == START + timedelta(minutes=45):
            out.append(Sent("gpu.samples", -1, b"node-0/GPU-node-0-0", None, "GpuSample"))
            out.append(_gpu(moment, hosts[3], 0, rng, utilization=150.0))  # breaks the 0-100 rule
        moment += timedelta(seconds=30)
    for key in ("gpu.samples", "system.samples"):
        for partition in range(BY_KEY[key].partitions):
            closer = datetime(2026, 2, 1, 3, tzinfo=UTC)
            sample = (
                _gpu(closer, f"closer-{partition}", 0, rng)
                if key == "gpu.samples"
                else _system(closer, f"closer-{partition}", rng)
            )
            sample.partition = partition
            out.append(sample)
    for sample in out:
        if sample.partition < 0:  # librdkafka's consistent partitioner, spelt out so the test knows
            sample.partition = zlib.crc32(sample.key) % BY_KEY[sample.topic].partitions
    return out


def produce(settings: Settings, samples: list[Sent]) -> None:
    codec = Codec()
    producer = Producer(client_config(settings, **{"enable.idempotence": True, "linger.ms": 5}))
    for sample in samples:
        data = b"not avro at all" if sample.value is None else codec.encode(sample.record, sample.value)

        def delivered(error: Any, message: Any, sample: Sent = sample) -> None:
            assert error is None, error
            sample.offset = message.offset()

        producer.produce(
            topic_name(settings, sample.topic),
            data,
            sample.key,
            partition=sample.partition,
            on_delivery=delivered,
        )
    assert producer.flush(30) == 0


Key = tuple[str, str, int]


def offline(samples: list[Sent]) -> tuple[dict[Key, dict[str, Any]], set[tuple[str, int, int, str]]]:
    """The final rollups (buckets whose end plus lateness each partition's watermark passed) and the
    dead letters (topic, partition, offset, error type), computed independently of the app."""
    values: dict[Key, list[float]] = {}
    dead: set[tuple[str, int, int, str]] = set()
    watermark: dict[tuple[str, int], int] = {}
    bucket_partition: dict[Key, tuple[str, int]] = {}
    for sample in samples:
        where = (sample.topic, sample.partition)
        if sample.value is None:
            dead.add((*where, sample.offset, "NotAvro"))
            continue
        if sample.value.get("utilization_percent", 0) > 100:
            dead.add((*where, sample.offset, "InvalidRecord"))
            continue
        event = to_ms(sample.value["time"])
        mark = watermark.get(where, -(2**62))
        if bucket_start("hour", event) + HOUR_MS + LATENESS_MS <= mark:
            dead.add((*where, sample.offset, "LateSample"))
            continue
        watermark[where] = max(mark, event)
        for series, value in _points(sample):
            for tier in TIERS:
                key = (series, tier, bucket_start(tier, event))
                values.setdefault(key, []).append(value)
                bucket_partition[key] = where
    finals = {}
    for key, found in values.items():
        if bucket_end(key[1], key[2]) + LATENESS_MS > watermark[bucket_partition[key]]:
            continue  # not final yet
        finals[key] = exact_summary(found)
    return finals, dead


def _points(sample: Sent) -> Iterator[tuple[str, float]]:
    value = sample.value
    assert value is not None
    if sample.topic == "gpu.samples":
        labels = {
            "host": value["host"],
            "gpu": str(value["gpu"]),
            "gpu_uuid": value["gpu_uuid"],
            "gpu_model": value["gpu_model"],
        }
        for field, metric in GPU_METRICS.items():
            yield series_id(metric, labels), value[field]
    else:
        yield (
            series_id("host_cpu_utilization_percent", {"host": value["host"]}),
            value["cpu_utilization_percent"],
        )
        for disk in value["disks"]:
            labels = {"host": value["host"], "mountpoint": disk["mountpoint"]}
            yield series_id("host_disk_used_bytes", labels), float(disk["used_bytes"])


class Topic:
    """Reads a topic from the beginning, all partitions, keeping every decoded record."""

    def __init__(self, settings: Settings, key: str) -> None:
        self.codec = Codec()
        self.consumer = Consumer(client_config(settings, **{"group.id": f"reader-{time.time_ns()}"}))
        name = topic_name(settings, key)
        self.consumer.assign([TopicPartition(name, p, 0) for p in range(BY_KEY[key].partitions)])
        self.records: list[dict[str, Any]] = []

    def poll(self) -> None:
        for message in self.consumer.consume(5000, timeout=0.5):
            assert message.error() is None, message.error()
            self.records.append(self.codec.decode(message.value())[1])

    def close(self) -> None:
        self.consumer.close()


def latest_finals(records: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Latest record per (series, tier, bucket start), where it is final: latest upsert wins."""
    latest: dict[Key, dict[str, Any]] = {}
    for value in records:
        latest[(value["series"], value["tier"], to_ms(value["bucket_start"]))] = value
    return {key: value for key, value in latest.items() if value["final"] and "closer" not in key[0]}


def worker(settings: Settings, app_id: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        AIMA_TOPIC_PREFIX=settings.topic_prefix,
        AIMA_STATE_DIR=str(log.parent / f"state-{log.stem}"),
        AIMA_STREAMS_APP_ID=app_id,
        AIMA_STREAMS_LOG_LEVEL="info",
        **{"AIMA_METRICS_PORT": "0", **env},
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.main"], env=environment, cwd=REPO_ROOT, stdout=out, stderr=out
        )


def _events(port: int) -> float:
    """Records the worker on ``port`` has consumed, from its own Prometheus metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("aima_stream_events_total{")
    )


def wait_until(
    condition: Callable[[], bool], timeout_s: float, workers: list[subprocess.Popen[bytes]], log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in workers:
            assert proc.poll() is None, log.read_text()[-4000:]
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out; worker log:\n{log.read_text()[-4000:]}")


def stop(workers: list[subprocess.Popen[bytes]], log: Path) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=60) for proc in workers]
    assert codes == [0] * len(workers), log.read_text()[-4000:]


def assert_same(finals: dict[Key, dict[str, Any]], expected: dict[Key, dict[str, Any]]) -> None:
    assert set(finals) == set(expected)
    for key, want in expected.items():
        got = finals[key]
        assert (got["count"], got["min"], got["max"]) == (want["count"], want["min"], want["max"]), key
        assert got["avg"] == pytest.approx(want["avg"], rel=1e-9), key
        assert abs(got["p95"] - want["p95"]) <= 0.01 * want["p95"], key


def run_and_compare(
    settings: Settings, tmp_path: Path, unique: str, *, workers: int = 1, crash: bool = False
) -> None:
    samples = recorded()
    expected, dead = offline_named(settings, samples)
    log = tmp_path / "worker.log"
    rollups, letters = Topic(settings, "rollups"), Topic(settings, "deadletter")
    app_id = f"rollups-{unique}"
    env = {"AIMA_STREAMS_BATCH_MAX": "300", "AIMA_STREAMS_SESSION_TIMEOUT_S": "8"}
    if crash:
        env["AIMA_STREAMS_COMMIT_INTERVAL_S"] = "3600"  # nothing committed: the restart replays it all
    try:
        if crash:
            first = [worker(settings, app_id, log, **env)]
            produce(settings, samples[: len(samples) // 2])

            def some_final() -> bool:  # kill -9 once some hours are final, mid-stream
                rollups.poll()
                return len(latest_finals(rollups.records)) > 10

            wait_until(some_final, 120, first, log)
            first[0].send_signal(signal.SIGKILL)
            first[0].wait(timeout=30)
            produce(settings, samples[len(samples) // 2 :])
        ports = [_free_port() for _ in range(workers)]
        logs = [log.with_name(f"worker{i}.log") for i in range(workers)]
        running = [
            worker(settings, app_id, logs[i], **env, AIMA_METRICS_PORT=str(ports[i])) for i in range(workers)
        ]
        running_log = logs[0]
        if workers > 1:
            # Let the group settle with every worker in it before the records arrive, so they share them.
            wait_until(
                lambda: all(b"StreamsWorker]: Ready" in f.read_bytes() for f in logs),
                90,
                running,
                running_log,
            )
            time.sleep(3)
        if not crash:
            produce(settings, samples)

        def complete() -> bool:
            rollups.poll()
            letters.poll()
            finals = latest_finals(rollups.records)
            seen = {
                (r["origin_topic"], r["origin_partition"], r["origin_offset"], r["error_type"])
                for r in letters.records
            }
            return set(finals) >= set(expected) and dead <= seen

        wait_until(complete, 150, running, running_log)
        consumed = [_events(port) for port in ports]
        stop(running, running_log)
        rollups.poll()
        letters.poll()
    finally:
        rollups.close()
        letters.close()
    assert_same(latest_finals(rollups.records), expected)
    seen = {
        (r["origin_topic"], r["origin_partition"], r["origin_offset"], r["error_type"])
        for r in letters.records
    }
    assert seen == dead
    late = [r for r in letters.records if r["error_type"] == "LateSample"]
    assert late and all("behind the watermark" in r["reason"] and "is final" in r["reason"] for r in late)
    assert all(r["stage"] == "stream" and r["value"] for r in letters.records)
    assert all(count > 0 for count in consumed), consumed  # every worker had a share
    if crash:
        # Nothing was committed before the kill, so the restart replayed every record against the restored
        # state (exact counts above: no double counting) and sent again every final it could not prove
        # was flushed.
        finals_sent: dict[tuple[str, str, Any], int] = {}
        for value in rollups.records:
            if value["final"]:
                key = (value["series"], value["tier"], value["bucket_start"])
                finals_sent[key] = finals_sent.get(key, 0) + 1
        assert any(count > 1 for count in finals_sent.values())


def offline_named(settings: Settings, samples: list[Sent]) -> tuple[dict[Key, dict[str, Any]], set]:
    """The offline answer, dead letters named by full topic. The topics are new and written by one
    producer with explicit partitions, so offsets are each partition's order from 0."""
    counters: dict[tuple[str, int], int] = {}
    for sample in samples:
        where = (sample.topic, sample.partition)
        sample.offset = counters.get(where, 0)
        counters[where] = sample.offset + 1
    finals, dead = offline(samples)
    return finals, {
        (topic_name(settings, topic), partition, offset, kind) for topic, partition, offset, kind in dead
    }


def test_rollups_match_an_offline_computation(topics: Settings, tmp_path: Path, unique: str) -> None:
    run_and_compare(topics, tmp_path, unique)


def test_rollups_survive_kill_9_mid_stream(topics: Settings, tmp_path: Path, unique: str) -> None:
    run_and_compare(topics, tmp_path, unique, crash=True)


def test_two_workers_share_the_partitions_with_the_same_results(
    topics: Settings, tmp_path: Path, unique: str
) -> None:
    run_and_compare(topics, tmp_path, unique, workers=2)


# -- a series that spans partitions: job_queue_wait_seconds {queue, project} on job.events (key: job_id) ---

WAIT_SERIES = series_id("job_queue_wait_seconds", {"project": "news", "queue": "gpu-large"})
JOBS_START = datetime(2025, 12, 31, 21, tzinfo=UTC)
JOBS_END = datetime(2026, 1, 1, tzinfo=UTC)
JOBS_CLOSER = datetime(2026, 1, 1, 3, tzinfo=UTC)  # past the year's end plus the lateness


def _job_event(time_: datetime, job: str, event: str, wait: float | None, project: str = "news") -> Sent:
    value = {
        "time": time_, "job_id": job, "event": event, "project": project, "user": None, "service": None,
        "queue": "gpu-large", "model": None, "host": None, "gpu_count": 1, "gpu_model": None,
        "provider": None, "pricing": None, "media_minutes": None, "queue_wait_seconds": wait, "error": None,
        "source": "test",
    }  # fmt: skip
    key = job.encode()
    return Sent("job.events", zlib.crc32(key) % BY_KEY["job.events"].partitions, key, value, "JobEvent")


def recorded_jobs(seed: int = 13) -> list[Sent]:
    """A job of one {queue, project} queued and started every 2 minutes for the last three hours of 2025
    (each job on the partition its job_id picks, so the series spans all of them), then a closer per
    partition that closes every bucket of every tier they fall in."""
    rng = random.Random(seed)
    out: list[Sent] = []
    moment, number = JOBS_START, 0
    while moment < JOBS_END:
        job = f"job-{number:04d}"
        wait = min(rng.lognormvariate(3, 1), 300.0) if number % 7 else 0.0
        out.append(_job_event(moment - timedelta(seconds=wait), job, "queued", None))
        out.append(_job_event(moment, job, "started", wait))
        moment, number = moment + timedelta(minutes=2), number + 1
    partitions = BY_KEY["job.events"].partitions
    closers: dict[int, Sent] = {}
    while len(closers) < partitions:
        sent = _job_event(JOBS_CLOSER, f"closer-{number}", "started", 1.0, "closer")
        closers.setdefault(sent.partition, sent)
        number += 1
    return out + [closers[p] for p in range(partitions)]


def offline_waits(samples: list[Sent]) -> dict[Key, dict[str, Any]]:
    """count, min, max, avg and the exact p95 of the queue waits of the started jobs, per tier and bucket."""
    values: dict[Key, list[float]] = {}
    for sample in samples:
        value = sample.value
        assert value is not None
        if value["event"] != "started" or value["project"] != "news":
            continue
        for tier in TIERS:
            key = (WAIT_SERIES, tier, bucket_start(tier, to_ms(value["time"])))
            values.setdefault(key, []).append(value["queue_wait_seconds"])
    expected = {}
    for key, found in values.items():
        assert bucket_end(key[1], key[2]) + LATENESS_MS <= to_ms(JOBS_CLOSER)  # final, every one
        expected[key] = exact_summary(found)
    return expected


@pytest.mark.parametrize("mode", ["one worker", "kill -9 mid-stream", "two workers"])
def test_a_series_spread_over_partitions_is_rolled_up_whole(
    topics: Settings, tmp_path: Path, unique: str, mode: str
) -> None:
    samples = recorded_jobs()
    assert len({s.partition for s in samples if s.value and s.value["project"] == "news"}) > 1
    expected = offline_waits(samples)
    started = sum(
        1 for s in samples if s.value and s.value["event"] == "started" and s.value["project"] == "news"
    )
    log = tmp_path / "worker.log"
    rollups, letters = Topic(topics, "rollups"), Topic(topics, "deadletter")
    app_id = f"waits-{unique}"
    env = {"AIMA_STREAMS_BATCH_MAX": "40", "AIMA_STREAMS_SESSION_TIMEOUT_S": "8"}
    workers = 2 if mode == "two workers" else 1

    def waits() -> dict[Key, dict[str, Any]]:
        rollups.poll()
        return {key: value for key, value in latest_finals(rollups.records).items() if key[0] == WAIT_SERIES}

    try:
        if mode == "kill -9 mid-stream":
            env["AIMA_STREAMS_COMMIT_INTERVAL_S"] = "3600"  # nothing committed: the restart replays it all
            first = worker(topics, app_id, log, **env)
            produce(topics, samples[: len(samples) // 2])
            wait_until(lambda: len(waits()) > 0, 120, [first], log)  # some merged buckets are final
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        logs = [log.with_name(f"worker{i}.log") for i in range(workers)]
        running = [worker(topics, app_id, logs[i], **env) for i in range(workers)]
        if workers > 1:
            wait_until(
                lambda: all(b"StreamsWorker]: Ready" in f.read_bytes() for f in logs), 90, running, logs[0]
            )
            time.sleep(3)
        produce(topics, samples if mode != "kill -9 mid-stream" else samples[len(samples) // 2 :])
        wait_until(lambda: set(waits()) >= set(expected), 180, running, logs[0])
        stop(running, logs[0])
        finals = waits()
        letters.poll()
    finally:
        rollups.close()
        letters.close()
    assert_same(finals, expected)
    for tier in TIERS:  # every tier holds every started job once: no partition's part overwrote another's
        assert sum(value["count"] for key, value in finals.items() if key[1] == tier) == started, tier
    # Only merged rollups reach the topic: no upsert of a bucket ever counts more than the bucket holds,
    # nor a final fewer.
    for value in rollups.records:
        key = (value["series"], value["tier"], to_ms(value["bucket_start"]))
        if key in expected:
            assert value["count"] <= expected[key]["count"], key
            assert not value["final"] or value["count"] == expected[key]["count"], key
    assert letters.records == [], [(r["error_type"], r["reason"]) for r in letters.records[:3]]
