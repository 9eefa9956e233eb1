"""Tracing (A6) through the real pipeline into a real OTLP backend (Jaeger, the session's ``jaeger``): a hot
GpuSample published by the collector's Publisher, the stream app (``python -m streams.main``) firing
GpuTemperatureHigh, the sink storing both, the notifier posting the alert to a webhook, every stage with
tracing on at ratio 1.0. Jaeger's query API must then hold ONE trace with every stage's span: the
collector's publish, the stream app's batch of the alerts processor, the sink's batch and the notifier's
webhook delivery, each a descendant of the publish span."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bus.runtime import Service
from bus.settings import REPO_ROOT, Settings
from bus.tracing import TracingSettings, open_tracing
from consumers import sink
from consumers.notify import notifier
from producers.publisher import Publisher
from tests.conftest import JaegerService
from tests.integration.test_notifier import Receiver, config, webhook

pytestmark = pytest.mark.integration

STAGES = ("publish gpu.samples", "streams alerts", "sink batch", "notify webhook")


def hot_sample() -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5),
        "host": "traced-host",
        "gpu": 0,
        "gpu_uuid": "GPU-traced0",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "source": "test",
        "interval_group": "slow",
        "temperature_celsius": 97.0,
    }


class InThread:
    """A sink or notifier ``run`` in a thread with a service of its own; :meth:`stop` as SIGTERM would."""

    def __init__(self, name: str, settings: Settings, target: Any, **kwargs: Any) -> None:
        self.service = Service(name, settings, registry=CollectorRegistry())
        self.error: BaseException | None = None

        def body() -> None:
            try:
                target(settings, service=self.service, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True, name=name)
        self.thread.start()

    def stop(self) -> None:
        self.service.stopping.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{self.service.name} did not stop"
        if self.error is not None:
            raise self.error


def trace_of(jaeger: JaegerService, service: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """The one trace whose root ``service`` made, once it holds a span of every stage."""
    deadline = time.monotonic() + timeout_s
    names: set[str] = set()
    with httpx.Client(base_url=jaeger.query_url, timeout=10) as client:
        while time.monotonic() < deadline:
            answer = client.get("/api/traces", params={"service": service, "limit": 20, "lookback": "1h"})
            if answer.status_code == 200:
                traces = answer.json()["data"] or []
                assert len(traces) <= 1, f"{len(traces)} traces of {service}: one sample, one trace"
                if traces:
                    # Everything of the trace (the search answer holds every span Jaeger has of it).
                    whole = client.get(f"/api/traces/{traces[0]['traceID']}").json()["data"][0]
                    names = {span["operationName"] for span in whole["spans"]}
                    if set(STAGES) <= names:
                        return whole
            time.sleep(1.0)
    raise AssertionError(f"no complete trace of {service} within {timeout_s}s: spans {sorted(names)}")


def test_one_alerting_sample_is_one_trace_from_collector_to_webhook(
    topics: Settings, db_schema: str, unique: str, tmp_path: Path, jaeger: JaegerService
) -> None:
    settings = topics
    tracing_env = {
        "AIMA_OTEL_ENDPOINT": jaeger.otlp_endpoint,
        "AIMA_OTEL_SAMPLE_RATIO": "1.0",
        "AIMA_OTEL_EXPORT_DELAY_S": "0.5",
    }
    traced = TracingSettings.from_environ(tracing_env)
    receiver = Receiver()
    log = tmp_path / "streams.log"
    worker = None
    running: list[InThread] = []
    try:
        running.append(
            InThread(
                "notify-traced",
                settings,
                notifier.run,
                config=config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}]),
                schema=db_schema,
                group_id=f"notify-{unique}",
                tracing=open_tracing("aima-notify", traced),
            )
        )
        running.append(
            InThread(
                "sink-traced",
                settings,
                sink.run,
                schema=db_schema,
                group_id=f"sink-{unique}",
                topics=("gpu.samples", "alerts"),
                batch_timeout_s=0.2,
                maintenance_every_s=None,
                tracing=open_tracing("aima-sink", traced),
            )
        )
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO_ROOT),
            AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
            AIMA_TOPIC_PREFIX=settings.topic_prefix,
            AIMA_STATE_DIR=str(tmp_path / "streams-state"),
            AIMA_STREAMS_APP_ID=f"streams-{unique}",
            AIMA_STREAMS_COMMIT_INTERVAL_S="0.5",
            AIMA_METRICS_PORT="0",
            **tracing_env,
        )
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "streams.main"], env=env, cwd=REPO_ROOT, stdout=out, stderr=out
            )
        collector = f"collector-{unique}"
        publisher = Publisher(settings, source=collector, tracing=open_tracing(f"aima-{collector}", traced))
        assert publisher.publish("gpu.samples", "traced-host/GPU-traced0", "GpuSample", hot_sample())
        assert publisher.flush(30) == 0

        posted = receiver.wait_for("/hook", timeout_s=180)
        assert posted[0].json()["alerts"][0]["labels"]["alertname"] == "GpuTemperatureHigh"
        trace = trace_of(jaeger, f"aima-{collector}")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        for item in reversed(running):
            item.stop()
        receiver.close()

    spans = {span["spanID"]: span for span in trace["spans"]}
    services = {key: process["serviceName"] for key, process in trace["processes"].items()}
    by_name = {span["operationName"]: span for span in trace["spans"]}
    root = by_name["publish gpu.samples"]
    assert not root["references"], "the collector's publish span starts the trace"

    def ancestors(span: dict[str, Any]) -> list[str]:
        chain = []
        while span["references"]:
            parent = next((r for r in span["references"] if r["refType"] == "CHILD_OF"), None)
            if parent is None or parent["spanID"] not in spans:
                break
            span = spans[parent["spanID"]]
            chain.append(span["operationName"])
        return chain

    # Each stage continues the one before it: the alert carries the stream batch's context, the
    # stream batch and the sink's batch of the sample take the sample's.
    assert ancestors(by_name["streams alerts"]) == ["publish gpu.samples"]
    assert ancestors(by_name["notify webhook"]) == ["streams alerts", "publish gpu.samples"]
    assert ancestors(by_name["sink batch"])[-1] == "publish gpu.samples"
    assert services[by_name["streams alerts"]["processID"]] == "aima-streams"
    assert services[by_name["sink batch"]["processID"]] == "aima-sink"
    assert services[by_name["notify webhook"]["processID"]] == "aima-notify"
    tags = {tag["key"]: tag["value"] for tag in by_name["notify webhook"]["tags"]}
    assert tags["aima.outcome"] == "delivered"
    # The closing note shows these: stage, service, duration.
    for span in sorted(trace["spans"], key=lambda s: s["startTime"]):
        print(
            f"trace {trace['traceID']}: {span['operationName']:<24} {services[span['processID']]:<28} "
            f"{span['duration'] / 1000:.1f} ms"
        )
