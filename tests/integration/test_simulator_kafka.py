"""The simulator publishes one step of a whole fleet through a real Publisher: every sample topic fills
with records that decode and say they come from the simulator."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.kafka import client_config
from bus.settings import Settings
from bus.topics import BY_KEY, topic_name
from producers.publisher import Publisher
from producers.simulator import run

pytestmark = pytest.mark.integration
SAMPLE_TOPICS = ["gpu.samples", "system.samples", "job.events", "job.timings", "queue.samples", "k8s.pods"]


def test_one_step_fills_every_sample_topic(topics: Settings) -> None:
    publisher = Publisher(topics, registry=CollectorRegistry(), source="simulator")
    published = run(topics, once=True, publisher=publisher, hosts=2, gpus_per_host=4, seed=11)
    assert publisher.delivered == len(published) and publisher.dropped == publisher.invalid == 0
    expected = Counter(f"aima.metrics.{name}" for name, _ in published)

    consumer = Consumer(
        client_config(topics, **{"group.id": f"g{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    )
    names = {topic_name(topics, key): key for key in SAMPLE_TOPICS}
    consumer.subscribe(list(names))
    codec, received = Codec(), Counter()
    per_topic: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    try:
        while sum(received.values()) < len(published) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                assert message.error() is None, message.error()
                name, value = codec.decode(message.value())
                assert value["source"] == "simulator"
                assert name == BY_KEY[names[message.topic()]].schema
                received[name] += 1
                per_topic[names[message.topic()]] += 1
    finally:
        consumer.close()
    assert received == expected
    assert set(per_topic) == set(SAMPLE_TOPICS)
