"""Routing never drops an alert (N1, N4), through the real broker and PostgreSQL: the shipped default rules,
evaluated by the real stream worker, reach a Slack-only receiver (a local HTTP server standing in for the
incoming webhook) although every one of them names `webhook`; and a notifier without a routing file
dead-letters each notification with the reason, once, instead of settling it untold."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer

from bus.codec import Codec
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name
from consumers.notify.config import NotifyConfig, parse
from streams.alerts.rules import default_rules
from tests.integration import test_notifier as base
from tests.integration.test_notifier import (
    FAST_RETRY,
    Receiver,
    RunningNotifier,
    _read_dead_letters,
    alert_event,
    log_rows,
    produce,
    wait_committed,
)
from tests.integration.test_streams_alerts import Worker

pytestmark = pytest.mark.integration

start, receiver = base.start, base.receiver  # the notifier tests' fixtures

SLACK_PATH = "/slack/T000/B000/XXXX"
GPU = {"host": "route-host", "gpu": 0, "gpu_uuid": "GPU-route0", "gpu_model": "NVIDIA H100 80GB HBM3"}
QUEUE = "route-queue"


def _slack_only(url: str) -> NotifyConfig:
    """The shipped Slack-only routing file, its timers shortened so the test does not wait 30 s."""
    path = REPO_ROOT / "infra" / "notify" / "slack.yaml"
    data = yaml.safe_load(path.read_text())
    data["route"].update(group_wait="0s", group_interval="1s")
    data["delivery"] = {**FAST_RETRY, "timeout": "2s"}
    return parse(data, environ={"AIMA_SLACK_URL": url}, source=str(path))


def _inputs(t0: dt.datetime) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(topic, key, record, value) that make every default rule fire: a GPU hot, busy and full for 11
    minutes, a queue above 20 jobs for 31 minutes, 6 of 30 jobs failed within three minutes."""
    out: list[tuple[str, str, str, dict[str, Any]]] = []
    for step in range(23):  # every 30 s: past the 10 minutes of GpuUtilizationHigh's `for`
        value = {**GPU, "time": t0 + dt.timedelta(seconds=30 * step), "source": "test",
                 "interval_group": "fast", "utilization_percent": 99.0, "temperature_celsius": 90.0,
                 "memory_utilization_percent": 95.0}  # fmt: skip
        out.append(("gpu.samples", f"{GPU['host']}/{GPU['gpu_uuid']}", "GpuSample", value))
    for minute in range(32):  # past the 30 minutes of QueueBacklog's `for`
        at = t0 + dt.timedelta(minutes=minute)
        value = {"time": at, "queue": QUEUE, "length_jobs": 25, "source": "test"}
        out.append(("queue.samples", QUEUE, "QueueSample", value))
    for i in range(30):
        job = f"route-job-{i}"
        value = {"time": t0 + dt.timedelta(seconds=60 + 6 * i), "job_id": job,
                 "event": "failed" if i % 5 == 0 else "finished", "project": "routing", "gpu_count": 1,
                 "source": "test"}  # fmt: skip
        out.append(("job.events", job, "JobEvent", value))
    return out


def _send(settings: Settings, inputs: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    codec = Codec()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for topic, key, record, value in inputs:
        name = topic_name(settings, topic)
        producer.produce(name, key=key.encode(), value=codec.encode(record, value, topic=name))
    assert producer.flush(30) == 0


class AlertsTopic:
    """Reads the alert events the stream worker writes."""

    def __init__(self, settings: Settings) -> None:
        self.codec = Codec()
        self.events: list[dict[str, Any]] = []
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"read-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
            }
        )
        self.consumer.subscribe([topic_name(settings, "alerts")])

    def poll(self) -> None:
        for message in self.consumer.consume(100, timeout=0.2):
            if message.error() is None:
                self.events.append(self.codec.decode(message.value())[1])

    def firing(self) -> dict[str, dict[str, Any]]:
        """Per fingerprint, its first firing event."""
        found: dict[str, dict[str, Any]] = {}
        for event in self.events:
            if event["status"] == "firing":
                found.setdefault(event["fingerprint"], event)
        return found

    def close(self) -> None:
        self.consumer.close()


def test_a_slack_only_config_receives_every_default_rules_alerts(
    start: Callable[..., RunningNotifier],
    topics: Settings,
    receiver: Receiver,
    db: psycopg.Connection,
    unique: str,
    tmp_path: Path,
) -> None:
    rules = {rule.name: rule for rule in default_rules()}
    assert len(rules) == 5 and all(rule.channels == ("webhook",) for rule in rules.values())
    notifier = start(_slack_only(receiver.url(SLACK_PATH)))
    worker = Worker(topics, f"routing{unique}", tmp_path)
    alerts = AlertsTopic(topics)
    worker.start()
    try:
        _send(topics, _inputs(dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=40)))

        def told() -> set[str]:
            """Fingerprints of firing alerts a Slack message carried."""
            bodies = [r.body.decode() for r in receiver.seen(SLACK_PATH)]
            return {fp for fp in alerts.firing() if any(fp in body for body in bodies)}

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            worker.alive()
            alerts.poll()
            fired = {event["rule"] for event in alerts.firing().values()}
            if set(rules) <= fired and told() == set(alerts.firing()):
                break
            time.sleep(0.2)
        firing = alerts.firing()
        assert set(rules) <= {e["rule"] for e in firing.values()}, f"fired: {sorted(firing)}"
        assert told() == set(firing), f"told on Slack: {told()}; fired: {sorted(firing)}"
        wait_committed(topics, f"notify-{unique}", timeout_s=60)
    finally:
        alerts.close()
        worker.stop()
        notifier.stop()

    # Every default rule's alert named `webhook` (its hint) and reached the one Slack receiver.
    for fingerprint, event in firing.items():
        if event["rule"] in rules:
            assert event["channels"] == ["webhook"], event
        assert log_rows(db, fingerprint)["slack"][0] == "delivered", fingerprint
    titles = {r.json()["text"].split("] ")[1].split(" ")[0] for r in receiver.seen(SLACK_PATH)}
    assert set(rules) <= titles, titles
    posts = len(receiver.seen(SLACK_PATH, accepted_only=False))
    delivered = {"receiver": "slack", "channel": "slack", "outcome": "delivered"}
    assert notifier.metric("aima_notifier_notifications_total", **delivered) == posts
    letters = [
        s for m in notifier.registry.collect() if m.name == "aima_notifier_dead_letters" for s in m.samples
    ]
    assert sum(s.value for s in letters if s.name.endswith("_total")) == 0, letters


def test_without_a_routing_file_every_alert_is_dead_lettered_once_with_the_reason(
    start: Callable[..., RunningNotifier],
    topics: Settings,
    db: psycopg.Connection,
    unique: str,
) -> None:
    empty = NotifyConfig.empty()
    cfg = replace(empty, route=replace(empty.route, group_wait_s=0.0))
    first = start(cfg, f"first-{unique}")
    event = alert_event(channels=["webhook"])
    try:
        produce(topics, event)
        (dead,) = _read_dead_letters(topics, 1)
        wait_committed(topics, f"first-{unique}")
    finally:
        first.stop()
    assert dead["stage"] == "notifier" and dead["error_type"] == "NoReceiver"
    assert dead["reason"].startswith("receiver none channel none: no routing file (AIMA_NOTIFY_CONFIG)")
    assert dead["origin_topic"] == topic_name(topics, "alerts") and dead["origin_offset"] is not None
    assert json.loads(dead["value"])["alerts"][0]["fingerprint"] == event["fingerprint"]
    assert log_rows(db, event["fingerprint"]) == {"none": ("dead_lettered", 1)}
    assert first.metric("aima_notifier_dead_letters_total", channel="none", error_type="NoReceiver") == 1

    # Read again by a consumer that has not committed (a crash after the letter): the log knows it.
    replay = start(cfg, f"replay-{unique}")
    try:
        wait_committed(topics, f"replay-{unique}")
    finally:
        replay.stop()
    duplicate = {"receiver": "none", "channel": "none", "outcome": "duplicate"}
    assert replay.metric("aima_notifier_notifications_total", **duplicate) == 1
    assert replay.metric("aima_notifier_dead_letters_total", channel="none", error_type="NoReceiver") == 0
