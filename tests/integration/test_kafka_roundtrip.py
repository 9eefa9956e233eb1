"""10,000 records through the real broker, with confluent-kafka and with aiokafka."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Producer

pytestmark = pytest.mark.integration
N = 10_000


def _records() -> list[tuple[bytes, bytes]]:
    return [(f"host-{i % 7}".encode(), f"record-{i:05d}".encode()) for i in range(N)]


def test_confluent_kafka_roundtrip(kafka_bootstrap: str, new_topic: Callable[..., str], unique: str) -> None:
    topic = new_topic(partitions=4)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    )
    failed: list[object] = []
    for key, value in _records():
        producer.produce(topic, value=value, key=key, on_delivery=lambda e, m: e and failed.append(e))
        producer.poll(0)
    assert producer.flush(30) == 0
    assert failed == []

    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"g{unique}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    received: dict[bytes, bytes] = {}
    per_key_order: dict[bytes, list[bytes]] = {}
    deadline = time.monotonic() + 60
    while len(received) < N and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=1000, timeout=1.0):
            assert message.error() is None, message.error()
            received[message.value()] = message.key()
            per_key_order.setdefault(message.key(), []).append(message.value())
    consumer.close()
    assert len(received) == N
    assert received == {value: key for key, value in _records()}
    # Keyed records stay in order: one key, one partition.
    for values in per_key_order.values():
        assert values == sorted(values)


def test_aiokafka_roundtrip(kafka_bootstrap: str, new_topic: Callable[..., str], unique: str) -> None:
    topic = new_topic(partitions=4)

    async def roundtrip() -> list[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            batch = [producer.send(topic, value=value, key=key) for key, value in _records()]
            await asyncio.gather(*batch)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, group_id=f"a{unique}", auto_offset_reset="earliest"
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            async with asyncio.timeout(60):
                while len(values) < N:
                    for records in (await consumer.getmany(timeout_ms=1000, max_records=2000)).values():
                        values.extend(r.value for r in records)
        finally:
            await consumer.stop()
        return values

    values = asyncio.run(roundtrip())
    assert sorted(values) == sorted(value for _, value in _records())
