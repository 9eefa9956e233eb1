"""A Faust worker, started as a subprocess against the real broker, creates its internal topics, moves
records from one topic to another, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from bus.settings import REPO_ROOT

pytestmark = pytest.mark.integration
N = 500


def test_faust_worker_relays_and_stops_on_sigterm(
    kafka_bootstrap: str, new_topic: Callable[..., str], unique: str, tmp_path: Path
) -> None:
    source, target = new_topic(partitions=2), new_topic(partitions=2)
    app_id = f"relay{unique}"
    env = dict(
        os.environ,
        RELAY_APP_ID=app_id,
        RELAY_BROKER=kafka_bootstrap,
        RELAY_DATADIR=str(tmp_path / "faust"),
        RELAY_SOURCE=source,
        RELAY_TARGET=target,
        PYTHONPATH=str(REPO_ROOT),
    )
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "tests.faust_apps.relay", "worker", "-l", "info"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for i in range(N):
            producer.produce(source, key=f"k{i % 5}".encode(), value=f"v{i}".encode())
        assert producer.flush(30) == 0

        consumer = Consumer(
            {"bootstrap.servers": kafka_bootstrap, "group.id": f"c{unique}", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe([target])
        seen: set[bytes] = set()
        deadline = time.monotonic() + 90
        while len(seen) < N and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            seen.update(m.value() for m in consumer.consume(500, timeout=1.0) if m.error() is None)
        consumer.close()
        assert seen == {f"v{i}".encode() for i in range(N)}

        internal = set(AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics)
        assert f"{app_id}-moved-changelog" in internal
        assert f"{app_id}-__assignor-__leader" in internal

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in text, text[-3000:]
