"""The stream worker's deliveries, through the real broker: an output the broker refuses for good is
dead-lettered with the reason while every other output arrives (nothing dropped, no "Future exception was
never retrieved"); and a first start on a new cluster logs no error-level line."""

from __future__ import annotations

import json
import random
import subprocess
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from bus.codec import Codec
from bus.kafka import admin
from bus.settings import Settings
from bus.topics import BY_KEY, topic_name
from tests.integration.test_streams_rollups import (
    START,
    Sent,
    Topic,
    _gpu,
    latest_finals,
    produce,
    stop,
    wait_until,
    worker,
)
from tests.private_stack import PrivateStack

pytestmark = pytest.mark.integration

LONG_HOST = "h" * 240
"""Within the 256-character label limit, but its rollups (series, labels and key) do not fit below."""
ROLLUPS_MAX_MESSAGE_BYTES = 1200
"""The rollups topic's max.message.bytes in the first test: a short series' rollup fits, a long one not."""


def _samples(hosts: list[str]) -> list[Sent]:
    """Ten minutes of samples per host, then per partition a closer three hours on, so the hour is final."""
    rng = random.Random(5)
    out = [_gpu(START + timedelta(seconds=30 * i), host, 0, rng) for i in range(20) for host in hosts]
    for partition in range(BY_KEY["gpu.samples"].partitions):
        closer = _gpu(START + timedelta(hours=3), f"closer-{partition}", 0, rng)
        closer.partition = partition
        out.append(closer)
    for sample in out:
        if sample.partition < 0:
            sample.partition = zlib.crc32(sample.key) % BY_KEY[sample.topic].partitions
    return out


def _set_max_message_bytes(settings: Settings, topic: str, limit: int) -> None:
    entry = ConfigEntry("max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    client = admin(settings)  # held: the futures fail once the client is collected
    for future in client.incremental_alter_configs([resource]).values():
        future.result(30)


def test_an_output_the_broker_refuses_is_dead_lettered_and_the_rest_arrive(
    topics: Settings, tmp_path: Path, unique: str
) -> None:
    rollups_topic = topic_name(topics, "rollups")
    _set_max_message_bytes(topics, rollups_topic, ROLLUPS_MAX_MESSAGE_BYTES)
    log = tmp_path / "worker.log"
    rollups, letters = Topic(topics, "rollups"), Topic(topics, "deadletter")
    running = [worker(topics, f"refused-{unique}", log, AIMA_STREAMS_BATCH_MAX="300")]
    try:
        produce(topics, _samples(["node-a", "node-b", LONG_HOST]))

        def short_finals() -> set[str]:
            finals = latest_finals(rollups.records)
            return {key[0].split('host="')[1].split('"')[0] for key in finals if key[1] == "hour"}

        def refused() -> list[dict]:
            return [r for r in letters.records if r["origin_topic"] == rollups_topic]

        def done() -> bool:
            rollups.poll()
            letters.poll()
            return {"node-a", "node-b"} <= short_finals() and any(
                Codec().decode(r["value"])[1]["final"] for r in refused()
            )

        wait_until(done, 240, running, log)
        stop(running, log)
        rollups.poll()
        letters.poll()
    finally:
        _kill(running)
        rollups.close()
        letters.close()
    assert LONG_HOST not in short_finals()
    dead = refused()
    assert dead and all(r["error_type"] == "MessageSizeTooLargeError" for r in dead)
    assert all("refused" in r["reason"] and rollups_topic in r["reason"] for r in dead), dead[0]["reason"]
    assert all(r["stage"] == "stream" and r["origin_offset"] is None for r in dead)
    values = [Codec().decode(r["value"])[1] for r in dead]
    assert all(value["labels"]["host"] == LONG_HOST for value in values)
    # Each short series' hour arrived, with every sample counted (none lost to the refused neighbours).
    finals = latest_finals(rollups.records)
    for host in ("node-a", "node-b"):
        counts = {v["count"] for k, v in finals.items() if k[1] == "hour" and f'host="{host}"' in k[0]}
        assert counts == {20}, (host, counts)
    text = log.read_text()
    assert "Future exception was never retrieved" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def _kill(workers: list[subprocess.Popen[bytes]]) -> None:
    """A worker a failed test left running is killed, not left behind."""
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _error_lines(text: str) -> list[str]:
    """Error-level lines: bus/logs.py's JSON at error or critical, librdkafka's syslog levels 0-3."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                level = json.loads(line).get("level")
            except ValueError:
                level = None
            if level in {"error", "critical"}:
                found.append(line)
        elif line[:3] in {"%0|", "%1|", "%2|", "%3|"} or "Traceback" in line:
            found.append(line)
    return found


def test_a_first_start_on_a_new_cluster_logs_no_error(tmp_path: Path, unique: str) -> None:
    """A new broker (its offsets topic not made yet), new topics: the worker starts, processes a batch
    and stops, and not one line of its log is at error level; no commit overlaps the next."""
    stack = PrivateStack(tmp_path / "private", postgres=False)
    running: list[subprocess.Popen[bytes]] = []
    try:
        stack.start()
        settings = stack.settings(topic_prefix=f"t{unique}.")
        log = tmp_path / "worker.log"
        running.append(worker(settings, f"clean-{unique}", log))
        wait_until(lambda: b"StreamsWorker]: Ready" in log.read_bytes(), 240, running, log)
        rollups = Topic(settings, "rollups")
        try:
            produce(settings, _samples(["node-a"]))

            def processed() -> bool:
                rollups.poll()
                return any(value["final"] for value in rollups.records)

            wait_until(processed, 240, running, log)
        finally:
            rollups.close()
        stop(running, log)
    finally:
        _kill(running)
        stack.close()
    text = log.read_text()
    assert _error_lines(text) == [], "\n".join(_error_lines(text))[:4000]
    assert "is overlapping" not in text
