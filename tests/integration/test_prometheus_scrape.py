"""A5 with the real tools: a real Prometheus (Debian package ``prometheus``, started here) scrapes the GPU
exporter (the collector on the NVML fake) and the self-metrics of running services (the system collector
and the simulator as `aima-metrics collect ...` processes, the sink in this process), and
``promtool check metrics`` accepts every exposition."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from bus.runtime import Service
from bus.settings import REPO_ROOT, Settings
from consumers import sink
from producers.gpu import collector
from producers.publisher import Publisher
from tests.fakes.nvml import FakeNvml, FakeProcess, a100, h100, mig
from tests.prometheus_server import free_port, running_prometheus, wait_until

pytestmark = pytest.mark.integration

HOST = "scrape-test-host"
JOBS = ("gpu-exporter", "system-collector", "simulator", "sink")


@contextlib.contextmanager
def gpu_exporter(settings: Settings, nvml: FakeNvml, port: int) -> Iterator[None]:
    """The GPU collector's loop in a thread, serving the current values on ``port``."""
    registry = CollectorRegistry()
    service = Service("gpu-collector", settings, registry=registry)
    publisher = Publisher(settings, registry=registry, source="gpu-collector")
    failed: list[BaseException] = []

    def target() -> None:
        try:
            collector.run(
                settings,
                service=service,
                nvml=nvml,
                publisher=publisher,
                fast_interval_s=1.0,
                slow_interval_s=2.0,
                exporter_port=port,
                registry=registry,
                host=HOST,
            )
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=target, name="gpu-collector", daemon=True)
    thread.start()
    try:
        yield
    finally:
        service.stopping.set()
        thread.join(30)
    assert not thread.is_alive(), "the GPU collector did not stop"
    assert not failed, f"the GPU collector failed: {failed[0]!r}"


@contextlib.contextmanager
def sink_service(settings: Settings, schema: str, port: int) -> Iterator[None]:
    """The database sink in a thread, its self-metrics served on ``port`` as Service.start would."""
    registry = CollectorRegistry()
    service = Service("sink", settings, registry=registry)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    thread = threading.Thread(
        target=sink.run,
        args=(settings,),
        kwargs={"service": service, "schema": schema, "group_id": f"sink-{settings.topic_prefix}"},
        name="sink",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        service.stopping.set()
        thread.join(60)
        server.shutdown()
        server.server_close()
    assert not thread.is_alive(), "the sink did not stop"


@contextlib.contextmanager
def collect_process(settings: Settings, what: str, port: int, log_file: Path) -> Iterator[None]:
    """`aima-metrics collect <what>` as its own process, its self-metrics on ``port``."""
    env = dict(
        os.environ,
        AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        AIMA_TOPIC_PREFIX=settings.topic_prefix,
        AIMA_METRICS_PORT=str(port),
        AIMA_SIM_HOSTS="1",
        AIMA_SIM_GPUS_PER_HOST="2",
    )
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aima_metrics", "collect", what],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def promtool_check(exposition: str) -> tuple[int, str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: apt-get install -y prometheus (the Debian package)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def _values(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("gpu_uuid", r["metric"].get("job", "")): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_gpu_exporter_and_service_self_metrics(
    topics: Settings, db_schema: str, tmp_path: Path
) -> None:
    ampere = a100(0, processes=[FakeProcess(4242, "python3", 3 << 30)])
    hopper = h100(1)
    partitioned = a100(2, mig_mode=True, migs=[mig(2, 1)])
    nvml = FakeNvml([ampere, hopper, partitioned])
    ports = {job: free_port() for job in JOBS}
    with contextlib.ExitStack() as stack:
        stack.enter_context(gpu_exporter(topics, nvml, ports["gpu-exporter"]))
        stack.enter_context(sink_service(topics, db_schema, ports["sink"]))
        for job, what in (("system-collector", "system"), ("simulator", "jobs-sim")):
            stack.enter_context(collect_process(topics, what, ports[job], tmp_path / f"{job}.log"))
        prometheus = stack.enter_context(
            running_prometheus(
                tmp_path / "prometheus", scrape=[(j, f"127.0.0.1:{p}") for j, p in ports.items()]
            )
        )

        try:
            targets = prometheus.wait_for_targets_up(JOBS, timeout_s=90)
        except pytest.fail.Exception:
            logs = "\n".join(f"--- {j}\n{(tmp_path / f'{j}.log').read_text()[-3000:]}" for j in JOBS[1:3])
            raise AssertionError(f"scrape targets not up; process logs:\n{logs}") from None

        # The GPU values, with the catalogue's labels: utilisation where NVML reports it (not on a GPU in
        # MIG mode), memory for every entity including the MIG instance.
        utilization = wait_until(
            lambda: _values(prometheus.query('aima_gpu_utilization_percent{job="gpu-exporter"}')),
            60,
            "aima_gpu_utilization_percent in Prometheus",
        )
        assert set(utilization) == {ampere.uuid, hopper.uuid}
        assert all(0 <= value <= 100 for value in utilization.values())
        memory = prometheus.query('aima_gpu_memory_used_bytes{job="gpu-exporter"}')
        by_uuid = {r["metric"]["gpu_uuid"]: r["metric"] for r in memory}
        assert set(by_uuid) == {ampere.uuid, hopper.uuid, partitioned.uuid, partitioned.migs[0].uuid}
        assert by_uuid[ampere.uuid]["host"] == HOST and by_uuid[ampere.uuid]["gpu"] == "0"
        assert by_uuid[partitioned.migs[0].uuid]["mig_instance"] == "gi1/ci0"
        tensor = _values(prometheus.query('aima_gpu_tensor_core_utilization_percent{job="gpu-exporter"}'))
        assert set(tensor) == {hopper.uuid}, "tensor-core use only where GPM exists, never a made-up 0"
        collected = wait_until(
            lambda: prometheus.query('aima_gpu_collector_samples_total{job="gpu-exporter"}'),
            30,
            "the collector's own metrics on the exporter port",
        )
        assert sum(float(r["value"][1]) for r in collected) > 0

        # Every service says it is up, in its own words and in Prometheus'.
        up = _values(prometheus.query("up"))
        assert all(up[job] == 1 for job in JOBS), up
        service_up = wait_until(
            lambda: {r["metric"]["job"]: float(r["value"][1]) for r in prometheus.query("aima_service_up")},
            30,
            "aima_service_up",
        )
        assert service_up.get("system-collector") == 1 and service_up.get("simulator") == 1, service_up
        published = wait_until(
            lambda: prometheus.query('sum by (job) (aima_producer_records_total{job="simulator"})'),
            60,
            "the simulator's producer counter",
        )
        assert float(published[0]["value"][1]) > 0
        assert prometheus.query('aima_sink_paused{job="sink"}'), "the sink's own metrics"

        # promtool accepts each exposition exactly as Prometheus scraped it.
        problems: dict[str, str] = {}
        for job, target in targets.items():
            exposition = httpx.get(target["scrapeUrl"], timeout=10).text
            assert exposition.strip(), f"{job}: empty exposition"
            code, output = promtool_check(exposition)
            assert code in (0, 3), f"{job}: promtool check metrics failed ({code}):\n{output}"
            if code == 3:
                problems[job] = output
        for job, output in problems.items():
            print(f"promtool lint warnings for {job}:\n{output}")
            warnings.warn(f"promtool lint warnings for {job}: {output}", stacklevel=1)
