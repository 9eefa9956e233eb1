"""The cost processors in a real stream worker against the real broker: job lifecycle events and GPU
samples go in, and the costs and alerts topics carry the hand-computed GPU-hours, costs, idle hours,
budget figures and budget alerts; the worker stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from bus.codec import Codec
from bus.kafka import client_config
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name

pytestmark = pytest.mark.integration
H100 = "NVIDIA H100 80GB HBM3"
PRICES = f'providers: {{aws: {{"{H100}": {{on_demand: 4.0, spot: 1.5}}}}}}\n'
BUDGETS = "budgets: [{project: newsroom, name: gpu, monthly_eur: 25}]\n"


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2025, 4, 10, hour, minute, second, tzinfo=UTC)


def job_event(event: str, time: datetime, **fields: Any) -> dict[str, Any]:
    value = {
        "time": time, "job_id": "j1", "event": event, "project": "newsroom", "queue": "default",
        "gpu_count": 2, "gpu_model": H100, "provider": "aws", "pricing": "on_demand", "source": "test",
    }  # fmt: skip
    value.update(fields)
    return value


def gpu_sample(uuid_: str, time: datetime) -> dict[str, Any]:
    return {"time": time, "host": "gpu-01", "gpu": int(uuid_[-1]), "gpu_uuid": uuid_, "gpu_model": H100,
            "source": "test", "interval_group": "fast"}  # fmt: skip


def produce(settings: Settings, topic_key: str, record: str, items: list[tuple[str, dict[str, Any]]]) -> None:
    codec, producer = Codec(), Producer(client_config(settings))
    topic = topic_name(settings, topic_key)
    for key, value in items:
        producer.produce(topic, key=key.encode(), value=codec.encode(record, value, topic=topic))
    assert producer.flush(30) == 0


def collect(
    settings: Settings, worker: subprocess.Popen[bytes], log: Path, done: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The latest value per key on the costs topic (upserts), every alert and dead letter, until ``done``."""
    consumer = Consumer(
        client_config(settings, **{"group.id": f"g{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    )
    names = {topic_name(settings, key): key for key in ("costs", "alerts", "deadletter")}
    consumer.subscribe(list(names))
    codec = Codec()
    costs: dict[str, Any] = {}
    alerts: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and not done(costs):
            assert worker.poll() is None, log.read_text()[-3000:]
            for message in consumer.consume(500, timeout=1.0):
                if message.error() is not None:
                    continue
                _, value = codec.decode(message.value())
                kind = names[message.topic()]
                if kind == "costs":
                    costs[message.key().decode()] = value
                else:
                    (alerts if kind == "alerts" else dead).append(value)
        time.sleep(3)  # a little longer: anything else, a duplicate or a dead letter, would show
        for message in consumer.consume(500, timeout=2.0):
            if message.error() is None and names[message.topic()] == "deadletter":
                dead.append(codec.decode(message.value())[1])
    finally:
        consumer.close()
    return costs, alerts, dead


def hour_key(hour: int) -> str:
    return f"newsroom|{H100}|aws|on_demand|2025-04-10T{hour:02d}:00Z"


IDLE_10 = f"idle|{H100}|2025-04-10T10:00Z"


def _settled(costs: dict[str, Any]) -> bool:
    job, idle = costs.get("job|j1"), costs.get(IDLE_10)
    return (
        job is not None
        and idle is not None
        and idle["device_hours"] == pytest.approx(2.0)
        and idle["idle_gpu_hours"] == pytest.approx(1.0)
        and hour_key(12) in costs
    )


def test_costs_through_the_real_broker(topics: Settings, unique: str, tmp_path: Path) -> None:
    prices, budgets = tmp_path / "prices.yaml", tmp_path / "budgets.yaml"
    prices.write_text(PRICES)
    budgets.write_text(BUDGETS)
    env = dict(
        os.environ,
        AIMA_KAFKA_BOOTSTRAP=topics.kafka_bootstrap,
        AIMA_TOPIC_PREFIX=topics.topic_prefix,
        AIMA_STATE_DIR=str(tmp_path / "state"),
        AIMA_STREAMS_APP_ID=f"costs{unique}",
        AIMA_STREAMS_COMMIT_INTERVAL_S="0.5",
        AIMA_PRICES_FILE=str(prices),
        AIMA_BUDGETS_FILE=str(budgets),
        PYTHONPATH=str(REPO_ROOT),
    )
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.faust_apps.costs_app"], env=env, cwd=tmp_path, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # a 2-GPU job from 10:30 to 12:15 that processed 35 media minutes
        produce(topics, "job.events", "JobEvent", [
            ("j1", job_event("queued", at(10, 20))),
            ("j1", job_event("started", at(10, 30))),
            ("j1", job_event("finished", at(12, 15), media_minutes=35.0)),
        ])  # fmt: skip
        # two GPUs sampled every 30 s from 10:00 to 11:00: one device-hour each in hour 10
        samples = [
            (f"gpu-01/{gpu}", gpu_sample(gpu, at(10) + timedelta(seconds=30 * i)))
            for gpu in ("GPU-0", "GPU-1")
            for i in range(121)
        ]
        produce(topics, "gpu.samples", "GpuSample", samples)

        costs, alerts, dead = collect(topics, worker, log_path, _settled)
        assert _settled(costs), sorted(costs)

        for hour, gpu_hours in ((10, 1.0), (11, 2.0), (12, 0.5)):  # 2 GPUs x 0.5 h, 1 h, 0.25 h
            record = costs[hour_key(hour)]
            assert record["kind"] == "gpu_hours" and record["project"] == "newsroom"
            assert record["gpu_hours"] == pytest.approx(gpu_hours)
            assert record["cost_estimated_eur"] == pytest.approx(gpu_hours * 4.0)
        job = costs["job|j1"]
        assert job["gpu_hours"] == pytest.approx(3.5)
        assert job["job_cost_eur"] == pytest.approx(14.0)  # 3.5 GPU-hours x 4 EUR
        assert job["job_cost_per_media_minute_eur"] == pytest.approx(0.4)  # 14 EUR / 35 min
        idle = costs[IDLE_10]  # 2 device-hours, 1 GPU-hour allocated (2 GPUs x 10:30-11:00)
        assert idle["project"] is None and idle["idle_gpu_hours"] == pytest.approx(1.0)

        budget = costs["budget|newsroom|gpu|2025-04"]
        assert budget["budget_utilization_percent"] == pytest.approx(56.0)  # 14 of 25 EUR
        # by 10 April 12:15, 9 days 12.25 h of 30 days had passed: 14 / (228.25 / 720)
        assert budget["forecast_eur"] == pytest.approx(14 / (228.25 / 720))
        assert sorted(a["rule"] for a in alerts if a["status"] == "firing") == [
            "budget_50", "budget_forecast_overrun",
        ]  # fmt: skip
        assert dead == []

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_the_cost_clock_waits_for_the_partitions_job_events_has(settings: Settings, unique: str) -> None:
    """A job.events made before (or by hand) with fewer partitions than the catalogue's: the stream app's
    cost clock waits for the partitions the topic has, not for ones that will never send anything (each
    would hold the clock at 0, every hour open, for AIMA_COST_UPSTREAM_STALE_S)."""
    from bus.kafka import create_topics, ensure_topics, partition_count
    from bus.topics import BY_KEY
    from streams.costs.jobs import CostProcessor
    from streams.main import default_processors
    from streams.settings import WorkerSettings
    from tests.conftest import _delete_topics

    spec = BY_KEY["job.events"]
    assert spec.partitions > 2
    try:
        create_topics(settings, [(spec.name(settings.topic_prefix), 2, spec.config())])
        ensure_topics(settings)
        assert partition_count(settings, "job.events") == 2
        assert partition_count(settings, "gpu.samples") == BY_KEY["gpu.samples"].partitions
        worker = WorkerSettings.from_environ({})
        (made,) = [
            p
            for p in default_processors(settings, worker, job_event_partitions=2)
            if isinstance(p, CostProcessor)
        ]
        assert made.upstream_partitions == 2
        (default,) = [p for p in default_processors(settings, worker) if isinstance(p, CostProcessor)]
        assert default.upstream_partitions == spec.partitions
        never_made = settings.model_copy(update={"topic_prefix": f"none{unique}."})
        assert partition_count(never_made, "job.events") is None
    finally:
        _delete_topics(settings.kafka_bootstrap, unique)
