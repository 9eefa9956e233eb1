"""Alerts through the real stream app and broker: a hot GPU fires GpuTemperatureHigh (for: 0) on the alerts
topic, a normal sample resolves it; after kill -9 and a restart the worker neither fires an alert twice
nor forgets one that is firing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from bus.codec import Codec
from bus.settings import REPO_ROOT, Settings
from bus.topics import BY_KEY, topic_name
from streams.runtime.findings import fingerprint

pytestmark = pytest.mark.integration

LABELS = {"host": "hot-host", "gpu": "0", "gpu_uuid": "GPU-hot0", "gpu_model": "NVIDIA H100 80GB HBM3"}
FP = fingerprint("GpuTemperatureHigh", LABELS)
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)


def sample(seconds: int, celsius: float) -> dict[str, Any]:
    return {
        "time": T0 + timedelta(seconds=seconds),
        "host": LABELS["host"],
        "gpu": 0,
        "gpu_uuid": LABELS["gpu_uuid"],
        "gpu_model": LABELS["gpu_model"],
        "source": "test",
        "interval_group": "slow",
        "temperature_celsius": celsius,
    }


class Worker:
    def __init__(self, settings: Settings, app_id: str, tmp_path: Path) -> None:
        self.env = dict(
            os.environ,
            PYTHONPATH=str(REPO_ROOT),
            AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
            AIMA_TOPIC_PREFIX=settings.topic_prefix,
            AIMA_STATE_DIR=str(settings.state_dir),
            AIMA_STREAMS_APP_ID=app_id,
            AIMA_STREAMS_COMMIT_INTERVAL_S="0.5",
            AIMA_METRICS_PORT="0",
        )
        self.tmp_path = tmp_path
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.runs += 1
        self.log = self.tmp_path / f"worker{self.runs}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.faust_apps.alerts_app"],
                env=self.env,
                cwd=self.tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> None:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-4000:]

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no flush, no commit
        self.process.wait(timeout=30)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def test_alerts_fire_resolve_and_survive_kill_9(
    topics: Settings, unique: str, tmp_path: Path, kafka_bootstrap: str
) -> None:
    settings = topics
    codec = Codec()
    gpu_topic = topic_name(settings, "gpu.samples")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    sent = 0

    def send(seconds: int, celsius: float) -> None:
        nonlocal sent
        value = codec.encode("GpuSample", sample(seconds, celsius), topic=gpu_topic)
        producer.produce(gpu_topic, key=f"{LABELS['host']}/{LABELS['gpu_uuid']}".encode(), value=value)
        assert producer.flush(30) == 0
        sent += 1

    alerts = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"read{unique}", "auto.offset.reset": "earliest"}
    )
    alerts.subscribe([topic_name(settings, "alerts")])
    events: list[dict[str, Any]] = []

    def distinct() -> list[dict[str, Any]]:
        """The events without exact copies (a re-send after a restart repeats an event as it was)."""
        return [event for i, event in enumerate(events) if event not in events[:i]]

    def wait_for(count: int, worker: Worker, timeout_s: float = 120) -> list[dict[str, Any]]:
        """Until ``count`` different alert events of the GPU's fingerprint arrived; returns them."""
        deadline = time.monotonic() + timeout_s
        while len(distinct()) < count and time.monotonic() < deadline:
            worker.alive()
            for message in alerts.consume(100, timeout=0.5):
                if message.error() is None:
                    _, value = codec.decode(message.value())
                    if value["fingerprint"] == FP:
                        events.append(value)
        assert len(distinct()) >= count, f"{len(distinct())} alert events, wanted {count}: {events}"
        return distinct()

    def wait_committed(app_id: str, worker: Worker, timeout_s: float = 60) -> None:
        """Until the worker has committed every sample sent so far (kill -9 then loses no input)."""
        group = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": app_id})
        partitions = [TopicPartition(gpu_topic, p) for p in range(BY_KEY["gpu.samples"].partitions)]
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                worker.alive()
                committed = sum(max(tp.offset, 0) for tp in group.committed(partitions, timeout=10))
                if committed >= sent:
                    return
                time.sleep(0.5)
        finally:
            group.close()
        raise AssertionError(f"the worker committed {committed} of {sent} samples")

    app_id = f"alerts{unique}"
    worker = Worker(settings, app_id, tmp_path)
    worker.start()
    try:
        send(0, 90.0)
        (firing,) = wait_for(1, worker)
        assert (firing["rule"], firing["status"], firing["severity"]) == (
            "GpuTemperatureHigh",
            "firing",
            "critical",
        )
        assert (firing["starts_at"], firing["ends_at"], firing["value"]) == (T0, None, 90.0)
        assert firing["labels"] == LABELS and firing["source"] == "stream"
        assert firing["annotations"]["summary"] == "GPU 0 on hot-host at 90 °C"

        send(30, 60.0)
        resolved = wait_for(2, worker)[1]
        assert (resolved["status"], resolved["starts_at"], resolved["ends_at"]) == (
            "resolved",
            T0,
            T0 + timedelta(seconds=30),
        )

        send(60, 95.0)  # fires again, and is firing when the worker dies
        assert wait_for(3, worker)[2]["starts_at"] == T0 + timedelta(seconds=60)
        wait_committed(app_id, worker)
        worker.kill()

        worker.start()
        send(75, 96.0)  # still firing: nothing new
        send(90, 50.0)  # the restarted worker remembers the alert and resolves it
        wait_for(4, worker)
        send(120, 99.0)
        wait_for(5, worker)
        time.sleep(3)  # anything duplicated would arrive by now
        wait_for(5, worker, timeout_s=2)
        summary = [(e["status"], e["starts_at"], e["ends_at"]) for e in distinct()]
        assert summary == [
            ("firing", T0, None),
            ("resolved", T0, T0 + timedelta(seconds=30)),
            ("firing", T0 + timedelta(seconds=60), None),  # not fired again after the restart ...
            ("resolved", T0 + timedelta(seconds=60), T0 + timedelta(seconds=90)),  # ... nor forgotten
            ("firing", T0 + timedelta(seconds=120), None),
        ]
        copies = len(events) - len(distinct())
        if copies:
            # Every sample was committed before the kill, so nothing may be sent again, unless the app
            # could not tell the processor the committed offset (PartitionBatch.committed_offset None):
            # then the processor re-sends exact copies, as the contract asks (same fingerprint, N2).
            resent = [
                json.loads(line)
                for line in worker.log.read_text().splitlines()
                if "sending an alert event again" in line
            ]
            assert resent and all(r["committed"] is None for r in resent), resent
            warnings.warn(
                f"{copies} alert event(s) sent again after the restart: the app gave committed_offset=None "
                "on the first batch although the offsets were committed",
                stacklevel=1,
            )
        assert worker.stop() == 0
    finally:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
        alerts.close()
    text = worker.log.read_text()
    assert "Traceback" not in text, text[-4000:]
