"""The sink applies the value rules every reader applies (bus/validation.py) on the real broker and
PostgreSQL: NaN, a percentage of 150, negative seconds, a label value of 1000 characters and an event time a
year ahead are not stored; each is on the dead-letter topic (and in dead_letters) with its reason, and the
valid records around them are stored. Both read paths: a consume of many records (read as columns, where
a batch with a bad record goes record by record) and a few records (one by one)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from tests.integration.test_db_sink import NOW, gpu_sample, produce, running_sink, wait_until

pytestmark = pytest.mark.integration

CODEC = Codec()


def job_event(i: int, **overrides: Any) -> dict[str, Any]:
    return {
        "time": NOW - timedelta(seconds=i),
        "job_id": f"job-{i}",
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
    } | overrides


def read_letters(settings: Settings, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """The first ``count`` records of the dead-letter topic (read from its start each time)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"letters-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic_name(settings, "deadletter")])
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < count and time.monotonic() < deadline:
            for message in consumer.consume(50, timeout=1.0):
                if message.error() is None:
                    seen.append(CODEC.decode(message.value())[1])
    finally:
        consumer.close()
    return seen


def test_invalid_records_are_dead_lettered_with_their_reasons_and_the_rest_stored(
    topics: Settings, db_schema: str, db: psycopg.Connection
) -> None:
    bad_gpu = {
        "nan": gpu_sample(1001) | {"utilization_percent": float("nan")},
        "150": gpu_sample(1002) | {"memory_utilization_percent": 150.0},
        "label": gpu_sample(1003, host="h" * 1000),
        "ahead": gpu_sample(1004) | {"time": NOW + timedelta(days=365)},
    }
    # Many records of one key (one partition) in one consume: read as columns, whose checks send the
    # batch record by record; the bad ones sit between valid ones.
    valid = [gpu_sample(i) for i in range(200)]
    gpu = [*valid[:50], bad_gpu["nan"], *valid[50:100], bad_gpu["150"], *valid[100:150]]
    gpu += [bad_gpu["label"], *valid[150:199], bad_gpu["ahead"], valid[199]]
    records: list[tuple[str, str, str, Any]] = [("gpu.samples", "h/GPU-0", "GpuSample", v) for v in gpu]
    # A few records: decoded one by one.
    events = [job_event(1), job_event(2, queue_wait_seconds=-3.0), job_event(3)]
    records += [("job.events", "job", "JobEvent", v) for v in events]
    produce(topics, records)

    with running_sink(topics, db_schema, batch_max=5000) as (_, outcome):
        wait_until(
            lambda: (
                db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 200
                and db.execute("SELECT count(*) FROM job_events").fetchone()[0] == 2
                and db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 5
            ),
            timeout_s=180,
            what="the valid rows and five dead letters",
        )
        letters = read_letters(topics, 5)
    assert db.execute("SELECT max(utilization_percent) FROM gpu_samples").fetchone()[0] <= 100
    assert db.execute("SELECT max(length(host)) FROM gpu_samples").fetchone()[0] < 20
    assert db.execute("SELECT max(time) FROM gpu_samples").fetchone()[0] <= NOW
    assert db.execute("SELECT min(queue_wait_seconds) FROM job_events").fetchone()[0] >= 0
    assert sorted(r[0] for r in db.execute("SELECT job_id FROM job_events")) == ["job-1", "job-3"]

    by_offset = {
        (letter["origin_topic"], letter["origin_offset"]): letter
        for letter in letters
        if letter["stage"] == "sink"
    }
    gpu_topic, job_topic = topic_name(topics, "gpu.samples"), topic_name(topics, "job.events")
    expected = {
        (gpu_topic, 50): ("InvalidRecord", "utilization_percent: nan is not a finite number"),
        (gpu_topic, 101): ("InvalidRecord", "memory_utilization_percent: 150.0 is above 100"),
        (gpu_topic, 152): ("InvalidRecord", "host: a label value of 1000 characters is longer than 256"),
        (gpu_topic, 202): ("FutureEventTime", "beyond the allowed skew of 300 s"),
        (job_topic, 1): ("InvalidRecord", "queue_wait_seconds: -3.0 is below 0"),
    }
    assert set(by_offset) == set(expected)
    for where, (error_type, reason) in expected.items():
        letter = by_offset[where]
        assert letter["error_type"] == error_type, letter
        assert reason in letter["reason"], letter["reason"]
        assert letter["value"] is not None and letter["source"] == "sink"
    stored = dict(
        db.execute(
            "SELECT origin_offset, error_type FROM dead_letters WHERE origin_topic = %s", (gpu_topic,)
        ).fetchall()
    )
    assert stored == {50: "InvalidRecord", 101: "InvalidRecord", 152: "InvalidRecord", 202: "FutureEventTime"}
    registry = outcome["registry"]
    assert (
        registry.get_sample_value(
            "aima_sink_dead_letters_total", {"topic": gpu_topic, "error_type": "FutureEventTime"}
        )
        == 1
    )
