"""The publisher on the real broker: valid records delivered and counted, invalid ones dead-lettered with
the reason instead of being sent."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from producers.publisher import Publisher

pytestmark = pytest.mark.integration


def _drain(settings: Settings, key: str, group: str, want: int) -> list[tuple[bytes, dict]]:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic_name(settings, key)])
    out: list[tuple[bytes, dict]] = []
    for _ in range(30):
        for message in consumer.consume(100, timeout=1.0):
            if message.error() is None:
                out.append((message.key(), Codec().decode(message.value())[1]))
        if len(out) >= want:
            break
    consumer.close()
    return out


def _queue_sample(length: int) -> dict:
    return {"time": datetime.now(UTC), "queue": "default", "length_jobs": length, "source": "test"}


def test_valid_records_arrive_and_invalid_ones_are_dead_lettered(topics: Settings, unique: str) -> None:
    registry = CollectorRegistry()
    publisher = Publisher(topics, registry=registry, source="test")
    assert publisher.publish("queue.samples", "default", "QueueSample", _queue_sample(3))
    assert not publisher.publish("queue.samples", "default", "QueueSample", _queue_sample(-2))
    assert publisher.flush(30) == 0

    samples = _drain(topics, "queue.samples", f"s{unique}", 1)
    assert [value["length_jobs"] for _, value in samples] == [3]

    letters = _drain(topics, "deadletter", f"d{unique}", 1)
    assert len(letters) == 1
    key, letter = letters[0]
    assert key == b"default"
    assert letter["stage"] == "producer" and letter["error_type"] == "InvalidRecord"
    assert letter["origin_topic"] == topic_name(topics, "queue.samples")
    assert "length_jobs: -2 is below 0" in letter["reason"]
    assert json.loads(letter["value"])["length_jobs"] == -2

    assert publisher.delivered == 2 and publisher.invalid == 1 and publisher.failed == 0
    sample = registry.get_sample_value
    assert (
        sample(
            "aima_producer_records_total",
            {"topic": topic_name(topics, "queue.samples"), "outcome": "delivered"},
        )
        == 1
    )
    assert (
        sample(
            "aima_producer_records_total",
            {"topic": topic_name(topics, "queue.samples"), "outcome": "invalid"},
        )
        == 1
    )
    assert sample("aima_producer_send_latency_seconds_count") == 2


def test_a_clock_far_ahead_and_an_overlong_label_are_refused_at_the_source(
    topics: Settings, unique: str
) -> None:
    from datetime import timedelta

    from bus.validation import FUTURE_EVENT_TIME, FutureEventTime

    assert FutureEventTime.__name__ == FUTURE_EVENT_TIME
    publisher = Publisher(topics, registry=CollectorRegistry(), source="test")
    ahead = dict(_queue_sample(1), time=datetime.now(UTC) + timedelta(days=365))
    assert not publisher.publish("queue.samples", "default", "QueueSample", ahead)
    assert not publisher.publish("queue.samples", "q", "QueueSample", dict(_queue_sample(1), queue="q" * 300))
    assert publisher.publish("queue.samples", "default", "QueueSample", _queue_sample(4))
    assert publisher.flush(30) == 0
    assert [value["length_jobs"] for _, value in _drain(topics, "queue.samples", f"s{unique}", 1)] == [4]
    letters = sorted(letter["error_type"] for _, letter in _drain(topics, "deadletter", f"d{unique}", 2))
    assert letters == [FUTURE_EVENT_TIME, "InvalidRecord"]
