"""The job SDK against real brokers: records arrive and decode; a broker outage neither blocks nor crashes
the job, records buffered during it are delivered afterwards, and what did not fit is counted."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.kafka import client_config, ensure_topics
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name
from producers.publisher import Publisher
from producers.sdk import JobReporter, Pseudonymiser

pytestmark = pytest.mark.integration
KEY = "integration-test-pseudonym-key"
RAW_USER = "alice.smith@example.org"
KAFKA_SH = REPO_ROOT / "infra" / "kafka" / "kafka.sh"


def consume(settings: Settings, topic_keys: list[str], expected: int, timeout_s: float = 60) -> list[Any]:
    """Every record on the topics, decoded: waits for ``expected`` and then a little more, so that a
    duplicate would be seen too."""
    consumer = Consumer(
        client_config(
            settings,
            **{
                "group.id": f"g{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic_name(settings, key) for key in topic_keys])
    codec, records = Codec(), []
    deadline = time.monotonic() + timeout_s
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                assert message.error() is None, message.error()
                records.append((message.topic(), message.key().decode(), *codec.decode(message.value())))
            if len(records) >= expected:
                quiet_until = quiet_until or time.monotonic() + 2.0
                if time.monotonic() >= quiet_until:
                    break
    finally:
        consumer.close()
    return records


def test_lifecycle_and_timings_arrive_and_decode(topics: Settings) -> None:
    publisher = Publisher(topics, registry=CollectorRegistry(), source="sdk")
    metrics = JobReporter(
        topics, "job-int-1", project="news", user=RAW_USER, model="yolov8x", queue="default",
        gpu_model="NVIDIA L4", provider="gcp", pricing="on_demand", publisher=publisher, interval_s=0.2,
        pseudonym_key=KEY,
    )  # fmt: skip
    metrics.queued()
    with metrics:
        for _ in range(50):
            with metrics.frame():
                time.sleep(0.001)
        with metrics.data_transfer("h2d", bytes=1 << 20):
            pass
        metrics.observe("cuda_kernel", 0.002, kernel="gemm")
        time.sleep(0.5)  # at least two background intervals
        with metrics.frame():
            pass
        metrics.finished(media_minutes=1.5)
    stats = metrics.stats()
    assert stats["sent"] == stats["delivered"] >= 6
    assert stats["dropped"] == stats["invalid"] == stats["failed"] == 0

    records = consume(topics, ["job.events", "job.timings"], stats["sent"])
    assert len(records) == stats["sent"]
    assert {key for _, key, _, _ in records} == {"job-int-1"}
    events = [value for _, _, name, value in records if name.endswith("JobEvent")]
    assert [e["event"] for e in events] == ["queued", "started", "finished"]
    assert events[1]["queue_wait_seconds"] is not None and events[1]["queue_wait_seconds"] >= 0
    assert events[2]["media_minutes"] == 1.5
    assert {e["user"] for e in events} == {Pseudonymiser(KEY)(RAW_USER)}
    timings = [value for _, _, name, value in records if name.endswith("JobTimings")]
    assert sum(t["count"] for t in timings if t["kind"] == "frame") == 51
    assert {t["kind"] for t in timings} == {"frame", "data_transfer", "cuda_kernel"}
    assert all(t["interval_start"] <= t["time"] for t in timings)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class PrivateBroker:
    """A second broker of our own, started and stopped with the project's script, so that stopping it
    cannot disturb the session broker other tests use."""

    def __init__(self) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="aima-outage-", dir="/tmp"))
        self.port, controller = _free_ports(2)
        self.env = dict(
            os.environ,
            AIMA_STATE_DIR=str(self.state),
            AIMA_KAFKA_PORT=str(self.port),
            AIMA_KAFKA_CONTROLLER_PORT=str(controller),
        )

    def _script(self, command: str) -> None:
        subprocess.run([KAFKA_SH, command], env=self.env, check=True, timeout=240)

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    try:
        yield broker
    finally:
        subprocess.run([KAFKA_SH, "stop"], env=broker.env, check=False, timeout=120)
        shutil.rmtree(broker.state, ignore_errors=True)


def test_broker_outage_neither_blocks_nor_loses_buffered_records(
    private_broker: PrivateBroker, unique: str, tmp_path: Path
) -> None:
    private_broker.start()
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{private_broker.port}", topic_prefix=f"o{unique}.", state_dir=tmp_path
    )
    ensure_topics(settings)
    publisher = Publisher(
        settings, registry=CollectorRegistry(), source="sdk", buffer_records=50, delivery_timeout_s=120
    )
    metrics = JobReporter(
        settings, "job-outage", project="news", user=RAW_USER, publisher=publisher, interval_s=0.1,
        pseudonym_key=KEY,
    )  # fmt: skip
    try:
        _outage(private_broker, settings, publisher, metrics)
    finally:
        metrics.close(timeout_s=0)


def _outage(broker: PrivateBroker, settings: Settings, publisher: Publisher, metrics: JobReporter) -> None:
    metrics.started()
    # A fresh broker may still be loading its coordinators: let the producer get its idempotence id
    # before the work starts, so that nothing is dropped before the outage.
    assert publisher.flush(60) == 0

    def work(seconds: float) -> float:
        """Frames and other timings for ``seconds``; returns the slowest single call."""
        slowest, i = 0.0, 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            with metrics.frame():
                pass
            metrics.observe("batch", 0.01)
            metrics.observe("data_transfer", 0.001, direction="h2d", bytes=4096)
            # Many kernels: about a dozen series per interval, so the 50-record buffer overflows.
            metrics.observe("cuda_kernel", 0.0005, kernel=f"kernel_{i % 10}")
            slowest = max(slowest, time.perf_counter() - t0)
            i += 1
            time.sleep(0.002)
        return slowest

    work(0.5)
    assert publisher.flush(30) == 0
    before = metrics.stats()
    assert before["delivered"] == before["sent"] > 0 and before["dropped"] == 0

    broker.stop()
    slowest = work(4.0)
    assert slowest < 0.05, f"a timing call took {slowest * 1000:.1f} ms while the broker was away"
    during = metrics.stats()
    assert during["dropped"] > 0, during
    # What the broker acknowledged while it was shutting down counts as delivered; the rest waits.
    buffered = during["sent"] - during["delivered"]
    assert 0 < buffered <= 50

    broker.start()
    assert publisher.flush(120) == 0
    metrics.finished()
    assert metrics.close(timeout_s=60) == 0
    after = metrics.stats()
    assert after["delivered"] == after["sent"], after
    assert after["failed"] == after["invalid"] == 0
    assert after["dropped"] >= during["dropped"]

    records = consume(settings, ["job.events", "job.timings"], after["sent"], timeout_s=90)
    assert len(records) == after["sent"]
    assert [v["event"] for _, _, name, v in records if name.endswith("JobEvent")] == ["started", "finished"]
