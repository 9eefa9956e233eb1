"""No silent loss when the broker refuses the sink's dead letters (real broker and PostgreSQL): the
dead-letter topic's max.message.bytes is changed under the running sink. A letter too large for it goes
again without its value (the reason says so; dead_letters keeps the value); a letter the topic refuses
whatever its size holds the offsets back (the records before it committed, none from it on) until the
topic takes it, and then everything is committed with nothing lost."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from bus.kafka import admin
from bus.settings import Settings
from bus.topics import topic_name
from tests.integration.test_db_sink import gpu_sample, produce, running_sink, wait_until
from tests.integration.test_sink_validation import read_letters

pytestmark = pytest.mark.integration


def set_max_message_bytes(settings: Settings, topic: str, size: int) -> None:
    entry = ConfigEntry("max.message.bytes", str(size), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    client = admin(settings)  # kept until the answer: a collected client cancels its requests
    for future in client.incremental_alter_configs([resource]).values():
        future.result(30)


def committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


def gpu_rows(db: psycopg.Connection) -> int:
    return db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0]


def test_refused_dead_letters_hold_the_offsets_and_lose_nothing(
    topics: Settings, db_schema: str, db: psycopg.Connection
) -> None:
    letters_topic = topic_name(topics, "deadletter")
    gpu_topic = topic_name(topics, "gpu.samples")
    group = f"sink-{topics.topic_prefix}"
    key = "h/GPU-0"  # one partition: offsets in the order sent

    def records(values: list[dict[str, Any]]) -> list[tuple[str, str, str, Any]]:
        return [("gpu.samples", key, "GpuSample", value) for value in values]

    set_max_message_bytes(topics, letters_topic, 1500)
    # Offsets 0-4 valid, 5 a 2000-character label (its letter, value and all, is over 1500 bytes), 6-10.
    too_long = gpu_sample(500, host="h" * 2000)
    produce(
        topics,
        records([*(gpu_sample(i) for i in range(5)), too_long, *(gpu_sample(i) for i in range(5, 10))]),
    )

    with running_sink(topics, db_schema, batch_max=1000) as (_, outcome):
        registry = outcome["registry"]
        wait_until(
            lambda: gpu_rows(db) == 10 and sum(committed(topics, group, gpu_topic).values()) == 11,
            timeout_s=120,
            what="the valid records stored and everything committed",
        )
        [slim] = [letter for letter in read_letters(topics, 1) if letter["origin_topic"] == gpu_topic]
        assert slim["origin_offset"] == 5 and slim["error_type"] == "InvalidRecord"
        assert slim["value"] is None
        assert "2000 characters" in slim["reason"] and "is left out" in slim["reason"]
        stored = db.execute("SELECT value FROM dead_letters WHERE origin_offset = 5").fetchone()[0]
        assert len(stored) > 2000  # the value is kept in the database

        # Now the topic refuses any letter: offsets 11-13 valid, 14 NaN, 15-17 valid.
        set_max_message_bytes(topics, letters_topic, 100)
        nan = gpu_sample(600) | {"utilization_percent": float("nan")}
        produce(
            topics,
            records([*(gpu_sample(i) for i in range(10, 13)), nan, *(gpu_sample(i) for i in range(13, 16))]),
        )
        wait_until(
            lambda: (
                gpu_rows(db) == 16
                and (
                    registry.get_sample_value(
                        "aima_sink_dead_letter_failures_total", {"error": "MSG_SIZE_TOO_LARGE"}
                    )
                    or 0
                )
                >= 3
            ),
            timeout_s=120,
            what="the new valid rows stored and the letter refused again and again",
        )
        time.sleep(3.0)  # time enough for a commit that should not happen
        assert sum(committed(topics, group, gpu_topic).values()) <= 14
        assert db.execute("SELECT count(*) FROM dead_letters WHERE origin_offset = 14").fetchone()[0] == 1

        set_max_message_bytes(topics, letters_topic, 1_000_000)
        wait_until(
            lambda: sum(committed(topics, group, gpu_topic).values()) == 18,
            timeout_s=120,
            what="everything committed once the topic takes the letter",
        )
        letters = [letter for letter in read_letters(topics, 2) if letter["origin_topic"] == gpu_topic]
    assert sorted(letter["origin_offset"] for letter in letters) == [5, 14]
    # Refused at 100 bytes, it was cut down to its reason then (the value stays in the database).
    [held] = [letter for letter in letters if letter["origin_offset"] == 14]
    assert "not a finite number" in held["reason"] and "is left out" in held["reason"]
    stored = db.execute("SELECT value FROM dead_letters WHERE origin_offset = 14").fetchone()[0]
    assert stored is not None and len(stored) > 100
    assert gpu_rows(db) == 16
    assert db.execute("SELECT count(*) FROM dead_letters WHERE stage = 'sink'").fetchone()[0] == 2
