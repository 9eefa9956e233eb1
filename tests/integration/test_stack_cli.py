"""`aima-metrics up`, then `status`, then `down`, from an empty state folder, on ports of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer

from aima_metrics.stack import INFRA
from bus.codec import Codec
from bus.settings import Settings
from bus.topics import TOPICS, topic_name
from tests.private_stack import free_port, free_port_block

pytestmark = pytest.mark.integration


def _first_record(settings: Settings, key: str, timeout_s: float = 60) -> dict | None:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"probe-{key}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic_name(settings, key)])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                return Codec().decode(message.value())[1]
        return None
    finally:
        consumer.close()


def _prometheus_targets(port: int, want_up: set[str], timeout_s: float = 90) -> dict[str, str]:
    """Job -> health of the local Prometheus' active targets, once those of ``want_up`` are up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
            jobs = {t["labels"]["job"]: t["health"] for t in body["data"]["activeTargets"]}
        except (httpx.HTTPError, ValueError, KeyError):
            jobs = {}
        if all(jobs.get(job) == "up" for job in want_up):
            return jobs
        assert time.monotonic() < deadline, f"local Prometheus targets: {jobs}"
        time.sleep(1)


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aima_metrics", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def test_up_status_down_from_empty_state(tmp_path: Path) -> None:
    # The PostgreSQL server runs as the 'postgres' user, which must reach the state folder: pytest's
    # tmp_path is private to root, so the state lives in a folder of its own under /tmp.
    state = Path(tempfile.mkdtemp(prefix="aima-up-"))
    state.chmod(0o755)
    env = dict(
        os.environ,
        AIMA_STATE_DIR=str(state),
        AIMA_KAFKA_PORT=str(free_port()),
        AIMA_KAFKA_CONTROLLER_PORT=str(free_port()),
        AIMA_PG_PORT=str(free_port()),
        AIMA_PORT_BASE=str(free_port_block()),
        AIMA_GPU_EXPORTER_PORT=str(free_port()),
        AIMA_PROMETHEUS_PORT=str(free_port()),
    )
    env.pop("AIMA_KAFKA_BOOTSTRAP", None)
    env.pop("AIMA_DATABASE_URL", None)
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(
        [sys.executable, "-m", "aima_metrics", "up"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while "ready." not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
        output = (tmp_path / "up.log").read_text()
        assert f"Kafka       127.0.0.1:{env['AIMA_KAFKA_PORT']}" in output
        assert f"created {len(TOPICS)}" in output

        again = _cli("up", env=env)
        assert again.returncode == 0 and "already up" in again.stdout

        status = _cli("status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        lines = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()}
        assert lines["kafka"] == "up" and lines["postgres"] == "up" and lines["supervisor"] == "up"
        # No GPU here: the simulator stands in, next to the real system and GPU collectors.
        for process in ("system-collector", "gpu-collector", "simulator"):
            assert lines[process] == "up", status.stdout
        # The local Prometheus scrapes every process: the GPU exporter as the seed's gpu_metrics job, the
        # others' self-metrics by their names; the collectors' targets answer.
        assert lines["prometheus"] == "up", status.stdout
        jobs = _prometheus_targets(
            int(env["AIMA_PROMETHEUS_PORT"]), want_up={"system-collector", "simulator"}
        )
        expected = {"prometheus", "gpu_metrics", "stream", "sink", "notify", "api", "system-collector"}
        assert expected | {"simulator", "webhook-receiver"} <= set(jobs), jobs

        settings = Settings(kafka_bootstrap=f"127.0.0.1:{env['AIMA_KAFKA_PORT']}")
        for key in ("gpu.samples", "system.samples", "job.events"):
            assert _first_record(settings, key) is not None, f"nothing on {key}"

        topics = _cli("topics", env=env)
        assert topics.returncode == 0
        assert "aima.gpu.samples" in topics.stdout and "aima.metrics.GpuSample" in topics.stdout
        assert "missing" not in topics.stdout

        down = _cli("down", env=env, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=60) == 0
        assert "stopped." in (tmp_path / "up.log").read_text()

        after = _cli("status", env=env)
        assert after.returncode == 1
        assert all(line.split()[1] == "down" for line in after.stdout.splitlines())
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(timeout=60)
        log.close()
        for script in ("kafka/kafka.sh", "postgres/postgres.sh"):
            subprocess.run([INFRA / script, "stop"], env=env, capture_output=True, check=False)
        shutil.rmtree(state, ignore_errors=True)
