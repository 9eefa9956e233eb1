"""The anomaly detector through the real stream app and broker: a simulated fleet's GPU samples, hours of
job starts and stops with one kind of injected fault, go to the gpu.samples topic; the worker (alert and
anomaly processors, default settings: method relations) raises the anomaly alert for each injected fault
on its GPU, and no anomaly alert that no fault explains (none for the jobs' starts and stops)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import BY_KEY, topic_name
from producers.faults import FaultPlan, Truth
from producers.simulator import Fleet, generate
from tests.integration.test_streams_alerts import Worker

pytestmark = pytest.mark.integration

HOURS = 3
GRACE = timedelta(minutes=5)


def test_an_injected_fault_raises_the_anomaly_alert_and_job_starts_do_not(
    topics: Settings, unique: str, tmp_path: Path, kafka_bootstrap: str
) -> None:
    settings = topics
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=HOURS)
    fleet = Fleet(
        seed=2,
        hosts=1,
        gpus_per_host=4,
        start=start,
        faults=FaultPlan(every_s=3600, seed=3, kinds=("throttling",)),
    )
    codec = Codec()
    gpu_topic = topic_name(settings, "gpu.samples")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50})
    sent = jobs = 0
    for topic, key, name, value in generate(fleet, start, start + timedelta(hours=HOURS), 30.0):
        if topic == "job.events" and value["event"] in ("started", "finished", "failed"):
            jobs += 1
        if topic != "gpu.samples":
            continue
        producer.produce(gpu_topic, key=key.encode(), value=codec.encode(name, value, topic=gpu_topic))
        producer.poll(0)
        sent += 1
    assert producer.flush(60) == 0
    injected = [
        t for t in fleet.truth if t.kind == "throttling" and t.end + GRACE <= start + timedelta(hours=HOURS)
    ]
    assert injected and jobs >= 20, (injected, jobs)

    alerts = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"read{unique}", "auto.offset.reset": "earliest"}
    )
    alerts.subscribe([topic_name(settings, "alerts")])
    worker = Worker(settings, f"anomaly{unique}", tmp_path)
    worker.start()
    events: list[dict[str, Any]] = []
    try:
        wait_committed(worker, kafka_bootstrap, f"anomaly{unique}", gpu_topic, sent)
        # Everything is processed; read the alerts topic until it has been quiet for 10 s (the reader's
        # group joins first, which takes seconds).
        first, last = time.monotonic(), time.monotonic()
        while time.monotonic() - last < 10 or time.monotonic() - first < 20:
            for message in alerts.consume(500, timeout=0.5):
                if message.error() is None:
                    events.append(codec.decode(message.value())[1])
                    last = time.monotonic()
        assert worker.stop() == 0
    finally:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
        alerts.close()
    fired = [e for e in events if e["rule"] == "anomaly" and e["status"] == "firing"]

    def explains(truth: Truth, alert: dict[str, Any]) -> bool:
        on_gpu = alert["labels"]["gpu_uuid"] == truth.entity
        return on_gpu and truth.start <= alert["starts_at"] <= truth.end + GRACE

    for truth in injected:
        found = [a for a in fired if explains(truth, a)]
        assert found, f"no anomaly alert for {truth}: {fired}"
        assert {a["labels"]["metric"] for a in found} == {"gpu_sm_clock_hz"}
    # The fleet's other fault (the first host's hourly cooling fault) may alert too; nothing else may.
    unexplained = [a for a in fired if not any(explains(t, a) for t in fleet.truth)]
    assert unexplained == [], unexplained
    assert "Traceback" not in worker.log.read_text()


def wait_committed(worker: Worker, bootstrap: str, group_id: str, topic: str, sent: int) -> None:
    """Until the worker's group has committed every GPU sample sent (so it has processed them)."""
    group = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    partitions = [TopicPartition(topic, p) for p in range(BY_KEY["gpu.samples"].partitions)]
    deadline = time.monotonic() + 300
    committed = 0
    try:
        while time.monotonic() < deadline:
            worker.alive()
            committed = sum(max(tp.offset, 0) for tp in group.committed(partitions, timeout=10))
            if committed >= sent:
                return
            time.sleep(1)
    finally:
        group.close()
    raise AssertionError(f"the worker committed {committed} of {sent} samples")
