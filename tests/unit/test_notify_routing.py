"""Routing never drops an alert (N4): a rule's channels are a routing hint (a label routes match), never a
filter on the receiver's channels; a route ending at a receiver without a channel is refused at start;
without a routing file every notification is dead-lettered with the reason. The loop runs on client
doubles (tests/unit/kafka_doubles.py) as in test_notifier_loop.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.settings import REPO_ROOT, Settings
from bus.topics import topic_name
from consumers.notify import channels as channel_factory
from consumers.notify.config import ConfigError, NotifyConfig, load, parse
from consumers.notify.grouping import OffsetTracker
from consumers.notify.notifier import Commits, Notifier
from tests.integration.test_notifier import alert_event
from tests.unit.kafka_doubles import FakeConsumer, FakeMessage, FakeProducer, Journal, wait_until
from tests.unit.test_notifier_loop import FakePool
from tests.unit.test_notify_grouping import alert, slack


def test_a_rules_channels_are_a_match_label_that_routes_match() -> None:
    hinted = alert(channels=("mail", "webhook"))
    assert hinted.match_labels["channels"] == "email,webhook"  # kinds, aliases resolved, sorted
    assert "channels" not in alert().match_labels
    cfg = parse(
        {
            "route": {
                "receiver": "ops",
                "routes": [
                    {"matchers": ['channels=~"(.+,)?email(,.+)?"'], "receiver": "mail", "continue": True},
                    {"channels": ["webhook"], "receiver": "hooks"},
                ],
            },
            "receivers": [slack("ops"), slack("mail"), slack("hooks")],
        },
        environ={},
    )
    assert [r.receiver for r in cfg.route.select(hinted)] == ["mail", "hooks"]
    assert [r.receiver for r in cfg.route.select(alert(channels=("webhook",)))] == ["hooks"]
    assert [r.receiver for r in cfg.route.select(alert())] == ["ops"]  # no hint: the root's receiver


@pytest.mark.parametrize(
    ("route", "where"),
    [
        ({"receiver": "quiet"}, "route root (route) ends at receiver 'quiet'"),
        (
            {"receiver": "ops", "routes": [{"matchers": ["severity=critical"], "receiver": "quiet"}]},
            "route root/0 (route.routes[0]) ends at receiver 'quiet'",
        ),
        (
            {
                "receiver": "ops",
                "routes": [{"receiver": "ops", "routes": [{"channels": ["sms"], "receiver": "quiet"}]}],
            },
            "route root/0/0 (route.routes[0].routes[0]) ends at receiver 'quiet'",
        ),
    ],
)
def test_a_route_ending_at_a_receiver_without_a_channel_is_refused(route: dict[str, Any], where: str) -> None:
    data = {"route": route, "receivers": [slack("ops"), {"name": "quiet"}]}
    with pytest.raises(ConfigError) as raised:
        parse(data, environ={}, source="notify.yaml")
    message = str(raised.value)
    assert message.startswith(f"notify.yaml: {where}, which has no channel"), message
    assert "would reach nobody" in message and "Give receiver 'quiet' a channel" in message


def test_a_routing_file_that_routes_nothing_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        parse({"delivery": {"timeout": "5s"}}, environ={}, source="notify.yaml")
    expected = "notify.yaml: no route and no receivers: every alert would reach nobody"
    assert str(raised.value).startswith(expected), raised.value


def test_the_shipped_routing_files_route_every_alert_somewhere() -> None:
    env = {"AIMA_SLACK_URL": "https://hooks.slack.test/T0/B0/X", "AIMA_LOCAL_WEBHOOK_URL": "http://127.0.0.1:9109/alerts",
           "AIMA_WEBHOOK_KEY": "k"}  # fmt: skip
    for path in sorted((REPO_ROOT / "infra" / "notify").glob("*.yaml")):
        cfg = load(path, env)
        assert all(cfg.receiver(route.receiver).channels for route in cfg.route.walk()), path
    (slack_only,) = load(REPO_ROOT / "infra" / "notify" / "slack.yaml", env).receivers.values()
    assert [c.kind for c in slack_only.channels] == ["slack"]


def test_the_notify_command_refuses_a_file_that_leaves_alerts_nowhere(tmp_path: Path) -> None:
    routing = tmp_path / "notify.yaml"
    routing.write_text(
        "route:\n  receiver: ops\n  routes:\n    - {matchers: [severity=critical], receiver: pager}\n"
        "receivers:\n  - {name: ops, slack: {url: 'https://hooks.slack.test/ops'}}\n  - {name: pager}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMA_")}
    env.update(AIMA_NOTIFY_CONFIG=str(routing), AIMA_KAFKA_BOOTSTRAP="127.0.0.1:1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "notify"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (
        f"Error: {routing}: route root/0 (route.routes[0]) ends at receiver 'pager', which has no channel"
        in done.stderr
    ), done.stderr


class KeepingProducer(FakeProducer):
    """Also keeps what it was given, to read the dead letters back."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.values: list[bytes] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Any = None) -> None:
        self.values.append(value)
        super().produce(topic, value, key, on_delivery)


@dataclass
class Run:
    journal: Journal
    registry: CollectorRegistry
    producer: KeepingProducer
    settings: Settings

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def commit_past_the_record(self) -> int:
        topic = topic_name(self.settings, "alerts")
        return next(i for i, e in enumerate(self.journal) if e[0] == "commit" and (topic, 0, 1) in e[1])


def _run_notifier(notify: NotifyConfig, event: dict[str, Any], transport: httpx.MockTransport) -> Run:
    """One alert record through the notifier's loop until its offset is committed."""
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    topic = topic_name(settings, "alerts")
    codec = Codec()
    journal: Journal = []
    registry = CollectorRegistry()
    producer = KeepingProducer(journal)
    http = httpx.Client(transport=transport)
    channels = {
        (receiver.name, target.id): channel_factory.build(target, http)
        for receiver in notify.receivers.values()
        for target in receiver.channels
    }
    commits = Commits(OffsetTracker())
    record = FakeMessage(topic, 0, 0, codec.encode("AlertEvent", event, topic))
    consumer = FakeConsumer(journal, [record], commits.on_commit)
    stop = threading.Event()
    notifier = Notifier(
        settings,
        stop,
        notify,
        consumer=consumer,  # type: ignore[arg-type]
        producer=producer,  # type: ignore[arg-type]
        pool=FakePool(journal),  # type: ignore[arg-type]
        http=http,
        channels=channels,
        commits=commits,
        codec=codec,
        commit_interval_s=0.0,
        time_left_s=lambda: 10.0,
        registry=registry,
    )
    thread = threading.Thread(target=notifier.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: (topic, 0, 1) in consumer.committed, "the record's offset committed")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    return Run(journal, registry, producer, settings)


def test_a_receiver_without_the_hinted_kind_gets_the_alert_on_its_channels() -> None:
    """The default rules name `webhook`; a Slack-only receiver is told all the same."""
    posted: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        posted.append(request)
        return httpx.Response(200, text="ok")

    notify = parse(
        {"route": {"receiver": "team", "group_wait": "0s"}, "receivers": [slack("team")]}, environ={}
    )
    event = alert_event(channels=["webhook"])
    run = _run_notifier(notify, event, httpx.MockTransport(answer))
    assert [str(r.url) for r in posted] == ["https://hooks.slack.test/team"]
    assert event["fingerprint"] in posted[0].content.decode()
    assert run.journal.index(("log", "sending")) < run.journal.index(("log", "delivered"))
    assert run.journal.index(("log", "delivered")) < run.commit_past_the_record()
    delivered = {"receiver": "team", "channel": "slack", "outcome": "delivered"}
    assert run.metric("aima_notifier_notifications_total", **delivered) == 1


def test_without_a_routing_file_the_alert_is_dead_lettered_with_the_reason_before_its_commit() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing may be sent without a receiver: {request.url}")

    empty = NotifyConfig.empty()
    assert empty.nowhere
    notify = replace(empty, route=replace(empty.route, group_wait_s=0.0))
    event = alert_event(channels=["webhook"])
    run = _run_notifier(notify, event, httpx.MockTransport(refuse))
    journal = run.journal
    letters = topic_name(run.settings, "deadletter")
    # at-least-once: the letter is acknowledged and logged before the record's offset is committed
    assert journal.index(("produce", letters)) < journal.index(("log", "dead_lettered"))
    assert journal.index(("log", "dead_lettered")) < run.commit_past_the_record()
    (raw,) = run.producer.values
    name, letter = Codec().decode(raw)
    assert name == "aima.metrics.DeadLetter" and letter["error_type"] == "NoReceiver"
    assert letter["reason"].startswith("receiver none channel none: no routing file (AIMA_NOTIFY_CONFIG)")
    assert json.loads(letter["value"])["alerts"][0]["fingerprint"] == event["fingerprint"]
    assert run.metric("aima_notifier_dead_letters_total", channel="none", error_type="NoReceiver") == 1
    dead = {"receiver": "none", "channel": "none", "outcome": "dead_lettered"}
    assert run.metric("aima_notifier_notifications_total", **dead) == 1
