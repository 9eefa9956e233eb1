"""`aima-metrics collect dcgm` as a real process against a local dcgm-exporter (tests/fakes/dcgm.py: the
real exporter's text, several GPUs, MIG instances, profiling fields on one GPU and not on another), through
the real broker: the GpuSamples read back from the topic, the endpoint going away and coming back, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer
from prometheus_client.parser import text_string_to_metric_families

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from tests.fakes.dcgm import HOSTNAME, UUIDS, FakeDcgmExporter, exposition
from tests.private_stack import free_port

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
MIG1, MIG2 = f"MIG-{UUIDS[2]}/1", f"MIG-{UUIDS[2]}/2"


@pytest.fixture
def exporter() -> Iterator[FakeDcgmExporter]:
    server = FakeDcgmExporter().start()
    yield server
    server.stop()


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMA_")}
    return env | {
        "AIMA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "AIMA_TOPIC_PREFIX": settings.topic_prefix,
        "AIMA_STATE_DIR": str(settings.state_dir),
        **extra,
    }


class _Topic:
    """Reads ``gpu.samples`` from the start, keeping (key, decoded value) of every record."""

    def __init__(self, settings: Settings, group: str) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([topic_name(settings, "gpu.samples")])
        self._codec = Codec()
        self.records: list[tuple[str, dict[str, Any]]] = []

    def until(self, done: Callable[[list[tuple[str, dict[str, Any]]]], bool], timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.records):
            assert time.monotonic() < deadline, f"not seen within {timeout_s} s; {len(self.records)} records"
            for message in self._consumer.consume(num_messages=200, timeout=0.5):
                assert message.error() is None, message.error()
                name, value = self._codec.decode(message.value())
                assert name == "aima.metrics.GpuSample"
                self.records.append((message.key().decode(), value))

    def close(self) -> None:
        self._consumer.close()


def test_collect_dcgm_once_publishes_each_gpu_and_mig_instance_with_nulls_for_what_is_not_exported(
    topics: Settings, unique: str, exporter: FakeDcgmExporter
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "collect", "dcgm", "--once", "--url", exporter.url],
        env=_env(topics),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 7

    topic = _Topic(topics, f"g{unique}")
    try:
        topic.until(lambda records: len(records) >= 7)
        time.sleep(2)  # nothing more should come
        topic.until(lambda records: True)
    finally:
        topic.close()
    by = {(value["gpu_uuid"], value["interval_group"]): (key, value) for key, value in topic.records}
    assert len(topic.records) == 7 and len(by) == 7
    assert {key for key, _ in topic.records} == {f"{HOSTNAME}/{uuid}" for uuid in (*UUIDS, MIG1, MIG2)}
    assert {value["source"] for _, value in topic.records} == {"dcgm"}

    _, h100 = by[(UUIDS[0], "fast")]
    assert h100["utilization_percent"] == 87.0 and h100["memory_used_bytes"] == 61440 * MIB
    assert h100["memory_utilization_percent"] == pytest.approx(61440 / (61440 + 19573) * 100)
    assert h100["tensor_core_utilization_percent"] == pytest.approx(48.2019)
    assert h100["memory_bandwidth_utilization_percent"] == pytest.approx(35.2411)
    _, h100_slow = by[(UUIDS[0], "slow")]
    assert h100_slow["energy_joules"] == pytest.approx(123456789.012)
    assert h100_slow["sm_clock_hz"] == 1_980_000_000 and h100_slow["pcie_rx_bytes_per_second"] == 2097152000.0
    assert (h100_slow["ecc_corrected_errors"], h100_slow["throttle_reasons"]) == (3, ["sw_power_cap"])

    # The A100 exports no profiling field and no ECC: null, not 0.
    _, a100 = by[(UUIDS[1], "fast")]
    _, a100_slow = by[(UUIDS[1], "slow")]
    assert a100["tensor_core_utilization_percent"] is None
    assert a100_slow["pcie_tx_bytes_per_second"] is None and a100_slow["ecc_corrected_errors"] is None
    assert a100_slow["temperature_celsius"] == 41.0 and a100_slow["xid_errors"] == []
    assert a100_slow["processes"] is None

    # The GPU in MIG mode: its board values on its own record, each instance an entity of its own.
    _, board = by[(UUIDS[2], "slow")]
    assert board["temperature_celsius"] == 55.0 and board["mig_instance"] is None
    assert (UUIDS[2], "fast") not in by  # no value of its own beyond its instances'
    _, one = by[(MIG1, "fast")]
    _, two = by[(MIG2, "fast")]
    assert (one["mig_instance"], one["parent_gpu_uuid"], one["gpu"]) == ("3g.20gb:gi1", UUIDS[2], 2)
    assert one["memory_used_bytes"] == 10240 * MIB and one["temperature_celsius"] is None
    assert one["utilization_percent"] is None
    assert two["mig_instance"] == "1g.5gb:gi2" and two["tensor_core_utilization_percent"] == 0.0


def _self_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


def test_collect_dcgm_reads_on_schedule_backs_off_while_the_endpoint_is_away_and_stops_on_sigterm(
    topics: Settings, unique: str, exporter: FakeDcgmExporter
) -> None:
    port = free_port()
    env = _env(
        topics,
        AIMA_DCGM_URL=exporter.url,
        AIMA_GPU_FAST_INTERVAL_S="0.5",
        AIMA_GPU_SLOW_INTERVAL_S="1",
        AIMA_DCGM_BACKOFF_MAX_S="1",
        AIMA_METRICS_PORT=str(port),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "aima_metrics", "collect", "dcgm"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    topic = _Topic(topics, f"g{unique}")
    try:
        gpu1_slow = f"{HOSTNAME}/{UUIDS[1]}"

        def xids(records: list[tuple[str, dict[str, Any]]]) -> list[Any]:
            return [v["xid_errors"] for k, v in records if k == gpu1_slow and v["interval_group"] == "slow"]

        topic.until(lambda records: len(xids(records)) >= 2)
        assert all(x == [] for x in xids(topic.records))
        exporter.body = exposition(xid_gpu1=79)
        topic.until(lambda records: [79] in xids(records))
        assert xids(topic.records).count([79]) == 1  # a new XID is reported once

        metrics = _self_metrics(port)
        assert metrics[("aima_dcgm_collector_endpoint_up", ())] == 1
        assert metrics[("aima_dcgm_collector_devices", ())] == 4
        assert metrics[("aima_dcgm_collector_samples_total", (("group", "fast"),))] >= 4

        exporter.stop()  # connection refused from now on
        _wait(lambda: _self_metrics(port).get(("aima_dcgm_collector_endpoint_up", ())) == 0, "endpoint down")
        _wait(
            lambda: (
                _self_metrics(port).get(("aima_dcgm_collector_errors_total", (("kind", "scrape"),)), 0) >= 3
            ),
            "three failed reads",
        )
        exporter.status = 503  # back, but failing: an HTTP error is a failed read too
        exporter.start()
        _wait(lambda: exporter.requests >= 2, "tries against the 503")
        seen = len(topic.records)
        exporter.status = 200
        topic.until(lambda records: len(records) >= seen + 10)
        assert _self_metrics(port)[("aima_dcgm_collector_endpoint_up", ())] == 1

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)
    finally:
        topic.close()
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [(line.get("level"), line.get("msg")) for line in logs]
    assert messages.count(("warning", "dcgm-exporter not answering")) == 1  # said once, then counted
    assert ("info", "dcgm-exporter answers again") in messages
    found = [line for line in logs if line.get("msg") == "GPU found"]
    assert len(found) == 4


def test_collect_dcgm_refuses_without_an_endpoint_and_fails_when_it_does_not_answer(topics: Settings) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "collect", "dcgm", "--once"],
        env=_env(topics),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "--url" in missing.stdout
    away = subprocess.run(
        [
            sys.executable,
            "-m",
            "aima_metrics",
            "collect",
            "dcgm",
            "--once",
            "--url",
            f"http://127.0.0.1:{free_port()}/metrics",
        ],
        env=_env(topics),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert away.returncode == 1 and "dcgm collector failed" in away.stdout, away.stdout + away.stderr
    assert "ConnectError" in away.stdout
