"""The schemas topic (bus/schema_log.py) on the real broker: what writers publish, readers find; what is
not there is an unknown fingerprint; a broker that does not answer is a transient error, never a poison
record."""

from __future__ import annotations

import copy
import json
import socket
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from bus import schemas
from bus.codec import Codec
from bus.errors import SchemaLogUnavailable, UnknownFingerprint
from bus.kafka import client_config, describe_topics
from bus.schema_log import SchemaLog
from bus.settings import Settings
from bus.topics import BY_KEY, topic_name

pytestmark = pytest.mark.integration

QUEUE = {"time": 1_741_944_413_589, "queue": "gpu-large", "length_jobs": 17, "source": "test"}


def _queue_v2() -> dict[str, Any]:
    schema = copy.deepcopy(schemas.raw("QueueSample"))
    schema["fields"].append(
        {"name": "priority", "type": ["null", "string"], "default": None, "doc": "Queue priority; unit: none"}
    )
    return schema


def _log_records(settings: Settings) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(client_config(settings, **{"group.id": "peek", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic_name(settings, "schemas"), 0, 0)])
    found: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not found:
        message = consumer.poll(1.0)
        if message is not None and message.error() is None:
            found.append((message.key(), message.value()))
    consumer.close()
    return found


def test_a_reader_learns_the_schema_a_writer_published(topics: Settings) -> None:
    deadline = time.monotonic() + 60
    [state] = describe_topics(topics, (BY_KEY["schemas"],))
    while not state.exists and time.monotonic() < deadline:  # a just-created topic's metadata may lag
        time.sleep(0.5)
        [state] = describe_topics(topics, (BY_KEY["schemas"],))
    assert (state.partitions, state.cleanup_policy, state.retention_ms) == (1, "compact", -1)

    writer = Codec(schemas=[_queue_v2()], schema_log=SchemaLog.from_settings(topics))
    data = writer.encode("QueueSample", {**QUEUE, "priority": "high"})
    fingerprint = data[2:10]
    [(key, value)] = _log_records(topics)  # published before the record was made, once
    assert key == fingerprint.hex().encode()
    assert schemas.fingerprint_of(json.loads(value)) == fingerprint

    reader = Codec.from_settings(topics)  # its own avro/: it has never seen the new schema
    name, decoded = reader.decode(data)
    assert name == "aima.metrics.QueueSample"
    assert decoded["length_jobs"] == 17 and "priority" not in decoded
    assert reader.decode(data)[1] == decoded


def test_what_the_log_lacks_is_an_unknown_fingerprint_and_junk_is_ignored(topics: Settings) -> None:
    producer = Producer(client_config(topics))
    other = schemas.fingerprint_of(_queue_v2())
    # A record claiming the new schema's fingerprint but holding another schema, and one that is no JSON.
    producer.produce(
        topic_name(topics, "schemas"), key=other.hex().encode(), value=schemas.schema_json("GpuSample")
    )
    producer.produce(topic_name(topics, "schemas"), key=b"zz", value=b"not json")
    assert producer.flush(30) == 0
    data = Codec(schemas=[_queue_v2()]).encode("QueueSample", QUEUE)  # no log: nothing published
    reader = Codec(schema_log=SchemaLog.from_settings(topics, miss_grace_s=0.2))
    with pytest.raises(UnknownFingerprint, match="schemas topic") as raised:
        reader.decode(data)
    assert not raised.value.transient


def test_without_a_schemas_topic_writers_go_on_and_readers_know_nothing(settings: Settings) -> None:
    # No topics made: the broker does not create them on demand.
    log = SchemaLog.from_settings(settings, miss_grace_s=0.2)
    started = time.monotonic()
    data = Codec(schemas=[_queue_v2()], schema_log=log).encode("QueueSample", QUEUE)
    assert time.monotonic() - started < 10  # no wait for an acknowledgement that cannot come
    with pytest.raises(UnknownFingerprint):
        Codec(schema_log=SchemaLog.from_settings(settings, miss_grace_s=0.2)).decode(data)


def test_a_broker_that_does_not_answer_is_a_transient_error(settings: Settings) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    away = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    log = SchemaLog.from_settings(away, read_wait_s=2.0, publish_wait_s=1.0)
    data = Codec(schemas=[_queue_v2()]).encode("QueueSample", QUEUE)
    with pytest.raises(SchemaLogUnavailable) as raised:
        Codec(schema_log=log).decode(data)
    assert raised.value.transient  # the readers retry it instead of dead-lettering it
    # A writer is not held up for long: its record is made, the schema stays queued for the broker.
    started = time.monotonic()
    assert Codec(schema_log=log).encode("QueueSample", QUEUE)[:2] == b"\xc3\x01"
    assert time.monotonic() - started < 15
    log.close(timeout_s=0)
