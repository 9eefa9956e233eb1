"""A host whose clock runs a year ahead (T6, issue 11): its records are dead-lettered as FutureEventTime
and change nothing else. The same input goes to two topic sets, once with a year-ahead GPU sample and a
year-ahead job event placed between valid records of the same partitions, once without; one stream worker
(every default processor) reads each. Every rollup, alert, cost and anomaly of the two runs is the same, and
the only dead letters are the two future records."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from bus.codec import Codec
from bus.kafka import client_config, ensure_topics
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name
from tests.conftest import _delete_topics
from tests.integration.test_streams_rollups import Topic, _events, _free_port, stop, wait_until

pytestmark = pytest.mark.integration

H100 = "NVIDIA H100 80GB HBM3"
DAY = datetime(2026, 3, 10, tzinfo=UTC)
FUTURE = datetime.now(UTC) + timedelta(days=365)


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return DAY.replace(hour=hour, minute=minute, second=second)


def gpu(moment: datetime, index: int, celsius: float) -> tuple[str, str, str, dict[str, Any]]:
    value = {
        "time": moment, "host": "gpu-01", "gpu": index, "gpu_uuid": f"GPU-{index}", "gpu_model": H100,
        "source": "test", "interval_group": "fast", "utilization_percent": 40.0 + index,
        "temperature_celsius": celsius, "power_watts": 300.0,
    }  # fmt: skip
    return "gpu.samples", f"gpu-01/GPU-{index}", "GpuSample", value


def job(event: str, moment: datetime, **fields: Any) -> tuple[str, str, str, dict[str, Any]]:
    value = {
        "time": moment, "job_id": "j1", "event": event, "project": "newsroom", "queue": "default",
        "gpu_count": 2, "gpu_model": H100, "provider": "aws", "pricing": "on_demand", "source": "test",
        **fields,
    }  # fmt: skip
    return "job.events", "j1", "JobEvent", value


def inputs(with_future: bool) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Two GPUs every 30 s from 10:00 to 13:00 (GPU 0 at 90 °C from 11:00 to 11:20: one alert fires and
    resolves), a job from 10:30 to 12:15, closers at 16:00; optionally the two year-ahead records."""
    out = [job("queued", at(10, 20)), job("started", at(10, 30))]
    if with_future:
        out.append(job("finished", FUTURE, media_minutes=999.0))
    out.append(job("finished", at(12, 15), media_minutes=35.0))
    moment = at(10)
    while moment < at(13):
        for index in (0, 1):
            hot = index == 0 and at(11) <= moment < at(11, 20)
            out.append(gpu(moment, index, 90.0 if hot else 60.0))
        if with_future and moment == at(11, 30):
            out.append(gpu(FUTURE, 0, 20.0))
        moment += timedelta(seconds=30)
    out.extend(gpu(at(16), index, 60.0) for index in (0, 1))
    out.append(job("queued", at(16), job_id="j2"))
    return out


def produce(settings: Settings, records: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    codec = Codec()
    producer = Producer(client_config(settings, **{"enable.idempotence": True}))
    for topic_key, key, record, value in records:
        topic = topic_name(settings, topic_key)
        producer.produce(topic, key=key.encode(), value=codec.encode(record, value, topic=topic))
    assert producer.flush(30) == 0


def start_worker(settings: Settings, tmp_path: Path, name: str, port: int) -> tuple[subprocess.Popen, Path]:
    prices = tmp_path / "prices.yaml"
    prices.write_text(f'providers: {{aws: {{"{H100}": {{on_demand: 4.0, spot: 1.5}}}}}}\n')
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("budgets: [{project: newsroom, name: gpu, monthly_eur: 25}]\n")
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        AIMA_TOPIC_PREFIX=settings.topic_prefix,
        AIMA_STATE_DIR=str(tmp_path / f"state-{name}"),
        AIMA_STREAMS_APP_ID=f"clocks-{name}-{settings.topic_prefix.strip('.')}",
        AIMA_STREAMS_COMMIT_INTERVAL_S="1",
        AIMA_PRICES_FILE=str(prices),
        AIMA_BUDGETS_FILE=str(budgets),
        AIMA_METRICS_PORT=str(port),
    )
    log = tmp_path / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.main"], env=env, cwd=REPO_ROOT, stdout=out, stderr=out
        )
    return proc, log


def outputs(readers: dict[str, Topic]) -> dict[str, Any]:
    """What a run published, in a form two runs can be compared by: the latest rollup per bucket (without
    the watermark it was sent at, which depends on how the records were batched), each alert transition,
    the latest cost record per key, each anomaly."""
    for reader in readers.values():
        reader.poll()
    rollups = {
        (r["series"], r["tier"], r["bucket_start"]): {k: v for k, v in r.items() if k != "watermark"}
        for r in readers["rollups"].records
    }
    alerts = sorted(
        (r["fingerprint"], r["status"], r["starts_at"], r["ends_at"]) for r in readers["alerts"].records
    )
    costs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in readers["costs"].records:
        costs[(r["kind"], r["project"], r["job_id"], r["time"], r["gpu_model"], r["budget"])] = r
    anomalies = sorted((r["series"], r["time"], r["value"]) for r in readers["anomalies"].records)
    return {"rollups": rollups, "alerts": alerts, "costs": costs, "anomalies": anomalies}


def test_a_year_ahead_clock_changes_nothing_but_its_own_dead_letters(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    runs = {
        "skewed": Settings(**{**settings.model_dump(), "topic_prefix": f"t{unique}s."}),
        "clean": Settings(**{**settings.model_dump(), "topic_prefix": f"t{unique}c."}),
    }
    sent = {name: inputs(with_future=name == "skewed") for name in runs}
    readers: dict[str, dict[str, Topic]] = {}
    workers: dict[str, tuple[subprocess.Popen, Path, int]] = {}
    try:
        for name, run in runs.items():
            ensure_topics(run)
            readers[name] = {
                key: Topic(run, key) for key in ("rollups", "alerts", "costs", "anomalies", "deadletter")
            }
            port = _free_port()
            proc, log = start_worker(run, tmp_path, name, port)
            workers[name] = (proc, log, port)
            produce(run, sent[name])
        for name, (proc, log, port) in workers.items():
            # Every input consumed, and the job's cost and the alert's resolution published.
            def settled(name: str = name, port: int = port) -> bool:
                found = outputs(readers[name])
                return (
                    _events(port) >= len(sent[name])
                    and any(status == "resolved" for _, status, _, _ in found["alerts"])
                    and any(key[0] == "job_cost" for key in found["costs"])
                )

            wait_until(settled, 240, [proc], log)
        for proc, log, _ in workers.values():
            stop([proc], log)
        results = {name: outputs(readers[name]) for name in runs}
        letters = {name: readers[name]["deadletter"].records for name in runs}
    finally:
        for group in readers.values():
            for reader in group.values():
                reader.close()
        for proc, _, _ in workers.values():
            if proc.poll() is None:
                proc.kill()
        _delete_topics(settings.kafka_bootstrap, unique)
    skewed, clean = results["skewed"], results["clean"]
    assert clean["rollups"] and clean["alerts"] and clean["costs"]
    job_cost = next(v for k, v in clean["costs"].items() if k[0] == "job_cost")
    assert job_cost["gpu_hours"] == pytest.approx(2 * 1.75)  # 10:30 to 12:15 on two GPUs, not a year
    for part in ("rollups", "alerts", "costs", "anomalies"):
        assert skewed[part] == clean[part], part
    future = [r for r in letters["skewed"] if r["error_type"] == "FutureEventTime"]
    assert sorted(r["origin_topic"] for r in future) == [
        topic_name(runs["skewed"], "gpu.samples"),
        topic_name(runs["skewed"], "job.events"),
    ]
    assert all("ahead of this process's clock" in r["reason"] for r in future)

    def others(name: str) -> list[tuple[str, str, str]]:
        prefix = runs[name].topic_prefix
        return sorted(
            (r["origin_topic"].removeprefix(prefix), r["error_type"], r["reason"])
            for r in letters[name]
            if r["error_type"] != "FutureEventTime"
        )

    assert others("skewed") == others("clean")  # nothing else was dead-lettered because of them
