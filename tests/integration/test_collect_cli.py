"""`aima-metrics collect ... --once` end to end: real psutil readings through the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from confluent_kafka import Consumer

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name

pytestmark = pytest.mark.integration


def _cli_env(settings: Settings) -> dict[str, str]:
    return dict(
        os.environ, AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap, AIMA_TOPIC_PREFIX=settings.topic_prefix
    )


def test_collect_all_once_prints_system_metrics_and_says_no_gpu(topics: Settings, unique: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "collect", "all", "--once"],
        env=_cli_env(topics),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no NVML device found" in result.stdout
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    system = [p["value"] for p in printed if p["record"] == "aima.metrics.SystemSample"]
    assert len(system) == 1
    assert 0 <= system[0]["cpu_utilization_percent"] <= 100
    assert 0 < system[0]["memory_used_bytes"] <= system[0]["memory_total_bytes"]

    consumer = Consumer(
        {
            "bootstrap.servers": topics.kafka_bootstrap,
            "group.id": f"c{unique}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic_name(topics, "system.samples")])
    messages = []
    for _ in range(30):
        messages += [m for m in consumer.consume(10, timeout=1.0) if m.error() is None]
        if messages:
            break
    consumer.close()
    assert len(messages) == 1
    name, value = Codec().decode(messages[0].value())
    assert name == "aima.metrics.SystemSample"
    assert value["memory_used_bytes"] == system[0]["memory_used_bytes"]


def test_collect_refuses_clearly_when_topics_are_missing(settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "collect", "system", "--once"],
        env=_cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "topics missing" in result.stdout and "aima-metrics topics --create" in result.stdout
