"""Selective storage (D6) through the real broker, sink and PostgreSQL: with a deadband and a heartbeat a flat
series stores only its heartbeat rows and a jump is stored; without the configuration every row is; the
records left out are committed (none read again) and none is dead-lettered; the topics keep every record
for the stream app (rollups, alerts and anomalies read them there)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from bus.selective_storage import parse
from bus.settings import Settings
from bus.topics import BY_KEY, topic_name
from consumers.migrate import migrate
from tests.integration.test_db_sink import produce, running_sink, wait_until

pytestmark = pytest.mark.integration

START = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
SAMPLES = 40
"""Per source, 10 s apart: 6.5 minutes of event time."""
GPUS = 4
JUMP_GPU, JUMP_AT = 1, 25
SELECTIVE = parse(
    {
        "enabled": True,
        "metrics": {
            "gpu_utilization_percent": {"abs": 2.0, "heartbeat": "1m"},
            "host_cpu_utilization_percent": {"abs": 5.0, "heartbeat": "1m"},
        },
    },
    source="test",
)


def gpu(host: str, index: int, i: int) -> dict[str, Any]:
    util = 50.0 + (0.5 if i % 2 else 0.0)  # jitter within the band
    if index == JUMP_GPU and i >= JUMP_AT:
        util = 90.0  # the jump, and it stays there
    return {
        "time": START + timedelta(seconds=10 * i), "host": host, "gpu": index, "gpu_uuid": f"GPU-{index}",
        "gpu_model": "NVIDIA H100 80GB HBM3", "mig_instance": None, "parent_gpu_uuid": None,
        "source": "test", "interval_group": "fast", "utilization_percent": util,
        "memory_used_bytes": 1_000_000, "memory_total_bytes": 80_000_000_000,
        "memory_utilization_percent": 12.5, "processes": [],
    }  # fmt: skip


def system(host: str, i: int) -> dict[str, Any]:
    return {
        "time": START + timedelta(seconds=10 * i), "host": host, "source": "test",
        "cpu_utilization_percent": 10.0 + (1.0 if i % 2 else 0.0), "memory_used_bytes": 4_000_000,
        "memory_total_bytes": 8_000_000, "disks": None, "networks": None, "containers_running": 3,
    }  # fmt: skip


def records(host: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Every GPU's and the host's samples, in event-time order, keyed as the producers key them."""
    out: list[tuple[str, str, str, dict[str, Any]]] = []
    for i in range(SAMPLES):
        out += [("gpu.samples", f"{host}/GPU-{g}", "GpuSample", gpu(host, g, i)) for g in range(GPUS)]
        out.append(("system.samples", host, "SystemSample", system(host, i)))
    return out


def expected_times(jump: bool) -> list[datetime]:
    """What the bands keep: the first row, then one each minute of event time (the heartbeat), and the
    jump, from which the heartbeat counts again."""
    steps = [0, 6, 12, 18, 24, 25, 31, 37] if jump else [0, 6, 12, 18, 24, 30, 36]
    return [START + timedelta(seconds=10 * i) for i in steps]


@pytest.fixture
def bare_schema(database_url: str, unique: str) -> Iterator[str]:
    """A second migrated schema, for the run without selective storage."""
    schema = f"t_{unique}_all"
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, schema=schema)
    yield schema
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def stored(conn: psycopg.Connection, schema: str, table: str, where: str = "") -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT * FROM {}.{} {} ORDER BY 1").format(
        sql.Identifier(schema), sql.Identifier(table), sql.SQL(where)
    )
    return conn.execute(query).fetchall()


def gpu_times(conn: psycopg.Connection, schema: str, uuid: str) -> list[datetime]:
    query = sql.SQL("SELECT time FROM {}.gpu_samples WHERE gpu_uuid = %s ORDER BY time").format(
        sql.Identifier(schema)
    )
    return [row[0] for row in conn.execute(query, (uuid,)).fetchall()]


def committed(settings: Settings, group: str, topic_key: str) -> tuple[int, int]:
    """(offsets the group committed, records on the topic), summed over the topic's partitions."""
    topic = topic_name(settings, topic_key)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        partitions = [TopicPartition(topic, p) for p in range(BY_KEY[topic_key].partitions)]
        done = sum(max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=30))
        ends = sum(consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in partitions)
    finally:
        consumer.close()
    return done, ends


def test_a_flat_series_stores_its_heartbeats_and_a_jump_and_without_config_every_row(
    topics: Settings, db_schema: str, bare_schema: str, db: psycopg.Connection, unique: str
) -> None:
    host = f"sel-{unique}"
    sent = records(host)
    produce(topics, sent)  # all there before the sink reads: its GPU batches take the columnar path
    gpu_rows_kept = (GPUS - 1) * len(expected_times(False)) + len(expected_times(True))
    host_rows_kept = len(expected_times(False))

    group = f"selective-{topics.topic_prefix}"
    with running_sink(topics, db_schema, group_id=group, selective=SELECTIVE) as (_, outcome):

        def filtered(table: str) -> float:
            value = outcome["registry"].get_sample_value("aima_sink_rows_filtered_total", {"table": table})
            return value or 0.0

        wait_until(
            lambda: (
                filtered("gpu_samples") == GPUS * SAMPLES - gpu_rows_kept
                and filtered("system_samples") == SAMPLES - host_rows_kept
                and len(stored(db, db_schema, "gpu_samples")) == gpu_rows_kept
                and len(stored(db, db_schema, "system_samples")) == host_rows_kept
            ),
            what="every record read, the kept rows stored",
        )
        # The records left out are committed like the others: none is read again.
        for topic_key in ("gpu.samples", "system.samples"):
            wait_until(
                lambda k=topic_key: (lambda c: c[0] == c[1])(committed(topics, group, k)),
                what=f"every offset of {topic_key} committed",
            )
    for index in range(GPUS):
        assert gpu_times(db, db_schema, f"GPU-{index}") == expected_times(index == JUMP_GPU)
    host_times = [row[0] for row in db.execute("SELECT time FROM system_samples ORDER BY time").fetchall()]
    assert host_times == expected_times(False)
    assert stored(db, db_schema, "dead_letters") == []  # left out is never dead-lettered
    assert outcome["stats"].filtered == {
        "gpu_samples": GPUS * SAMPLES - gpu_rows_kept,
        "system_samples": SAMPLES - host_rows_kept,
    }
    jump = db.execute(
        "SELECT time, value FROM gpu_utilization_percent WHERE gpu_uuid = %s AND value > 80 ORDER BY time",
        (f"GPU-{JUMP_GPU}",),
    ).fetchall()
    assert [t for t, _ in jump] == expected_times(True)[5:]  # the jump and the heartbeats after it

    # Without selective storage (the default): every row.
    with running_sink(topics, bare_schema, group_id=f"all-{topics.topic_prefix}") as (_, everything):
        wait_until(
            lambda: (
                len(stored(db, bare_schema, "gpu_samples")) == GPUS * SAMPLES
                and len(stored(db, bare_schema, "system_samples")) == SAMPLES
            ),
            what="every row stored",
        )
    assert everything["stats"].filtered == {}
    registry = everything["registry"]
    assert not registry.get_sample_value("aima_sink_rows_filtered_total", {"table": "gpu_samples"})
    # The topics keep every record: the stream app computes rollups, alerts and anomalies from all of them.
    assert committed(topics, group, "gpu.samples")[1] == GPUS * SAMPLES
    assert committed(topics, group, "system.samples")[1] == SAMPLES
