"""The sink with two writers on the real broker and PostgreSQL: a batch stored early by the second writer
does not get its offsets committed while an older batch is still being written by the first (or a crash
then would skip the older batch's records). The first writer is held back before it writes."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry
from psycopg import sql

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from consumers.sink import open_sink
from consumers.sink_metrics import SinkMetrics
from consumers.sink_writer import Entry, Writer, WriteResult
from tests.integration.test_db_sink import gpu_sample, wait_until

pytestmark = pytest.mark.integration


class GatedWriter(Writer):
    """A real writer that notes the offsets of each batch it is given; with a ``gate``, its first batch
    waits for the gate before it is written."""

    def __init__(self, dsn: str, schema: str, gate: threading.Event | None = None) -> None:
        super().__init__(dsn, schema=schema, maintenance_every_s=None)
        self.gate = gate
        self.batches: list[list[int]] = []

    def write(self, entries: Sequence[Entry]) -> WriteResult:
        if self.gate is not None and not self.batches:
            self.batches.append([])  # taken, not yet stored
            assert self.gate.wait(60), "the test never opened the gate"
            result = super().write(entries)
            self.batches[0] = [e.offset for e in entries]
            return result
        result = super().write(entries)
        self.batches.append([e.offset for e in entries])
        return result


def _committed(settings: Settings, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "log_level": 3})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return tp.offset
    finally:
        consumer.close()


def test_offsets_commit_in_batch_order(topics: Settings, database_url: str, db_schema: str) -> None:
    settings = topics
    topic = topic_name(settings, "gpu.samples")
    codec = Codec()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    now = datetime.now(UTC)
    for i in range(30):
        value = dict(gpu_sample(i), time=now - timedelta(seconds=i))
        producer.produce(topic, codec.encode("GpuSample", value), partition=0)
    assert producer.flush(30) == 0

    gate = threading.Event()
    first = GatedWriter(database_url, db_schema, gate)
    second = GatedWriter(database_url, db_schema)
    group = f"sink-{settings.topic_prefix}order"
    sink = open_sink(
        settings,
        SinkMetrics(CollectorRegistry()),
        [first, second],
        topics=("gpu.samples",),
        group_id=group,
        batch_max=10,
        batch_timeout_s=0.2,
    )
    stopping = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        # The first batch waits in the first writer; the second writer stores the two after it.
        wait_until(lambda: sum(map(len, second.batches)) == 20, 60, "the second writer's batches")
        time.sleep(1.0)  # time enough for a wrong commit to happen
        assert first.batches == [[]]
        assert _committed(settings, group, topic) < 0  # nothing committed: the oldest batch is not stored
        gate.set()
        wait_until(lambda: _committed(settings, group, topic) == 30, 60, "every offset committed")
    finally:
        gate.set()
        stopping.set()
        thread.join(60)
    assert first.batches == [list(range(10))]
    assert sorted(o for batch in second.batches for o in batch) == list(range(10, 30))
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(db_schema, "gpu_samples"))
        ).fetchone()[0]
    assert stored == 30
