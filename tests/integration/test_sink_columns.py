"""The sink's columnar write (bus.frames + consumers/sink_chunks.py, CSV COPY) stores exactly what its
row-by-row write (Codec.decode + binary COPY) stores, on the real PostgreSQL: every column of every table,
including nulls, '' keys, arrays with quotes and backslashes, JSON, bytes, enums and non-ASCII text."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
import pytest
from psycopg import sql

from bus.codec import Codec
from bus.frames import FrameDecoder
from bus.settings import Settings
from consumers.migrate import migrate
from consumers.sink_chunks import Chunk
from consumers.sink_writer import Entry, Writer
from consumers.tables import BY_RECORD, Origin, rows_for
from producers.simulator import Fleet, generate
from tests.integration.test_db_sink import gpu_sample, produce, running_sink, wait_until
from tests.unit.test_frames import cost_record

pytestmark = pytest.mark.integration

CODEC = Codec()
START = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
# GpuSample and SystemSample fill tables with a row per item too (processes; disks, networks).
COLUMNAR = (
    "GpuSample",
    "SystemSample",
    "QueueSample",
    "PodStatus",
    "DeadLetter",
    "JobTimings",
    "JobEvent",
    "CostRecord",
)


def _odd_gpu_samples() -> list[dict[str, Any]]:
    """GpuSamples whose values are awkward as CSV text."""
    base = {
        "time": START + timedelta(milliseconds=7),
        "host": 'host "quoted", with comma',
        "gpu": 0,
        "gpu_uuid": "GPU-ünïcode\\back",
        "gpu_model": "H100\nnewline",
        "mig_instance": None,
        "parent_gpu_uuid": None,
        "source": "",
        "interval_group": "fast",
        "utilization_percent": None,
        "memory_used_bytes": -(2**63),
        "memory_total_bytes": 2**63 - 1,
        "memory_utilization_percent": math.nan,
        "memory_bandwidth_utilization_percent": math.inf,
        "temperature_celsius": -math.inf,
        "power_watts": 0.1 + 0.2,
        "tensor_core_utilization_percent": 5e-324,
        "pcie_tx_bytes_per_second": 1.7976931348623157e308,
        "pcie_rx_bytes_per_second": -0.0,
        "energy_joules": None,
        "sm_clock_hz": None,
        "memory_clock_hz": 0,
        "throttle_reasons": ['a "b"', "c\\d", "", "NULL", "x,y", "{z}"],
        "ecc_corrected_errors": None,
        "ecc_uncorrected_errors": 1,
        "xid_errors": [79, -1, 2**31 - 1],
        "processes": [
            {"pid": 1, "name": 'py"thon\\', "used_memory_bytes": None},
            {"pid": 2, "name": None, "used_memory_bytes": 2**62},
        ],
    }
    variants = [
        {},
        {"mig_instance": "1g.10gb", "parent_gpu_uuid": "GPU-0", "gpu": 1},
        {"throttle_reasons": None, "xid_errors": None, "processes": None, "gpu": 2},
        {"throttle_reasons": [], "xid_errors": [], "processes": [], "gpu": 3},
    ]
    # A distinct natural key each: the GPU's uuid.
    return [dict(base, **variant, gpu_uuid=f"{base['gpu_uuid']}-{i}") for i, variant in enumerate(variants)]


def _dead_letters() -> list[dict[str, Any]]:
    return [
        {
            "time": START + timedelta(seconds=i),
            "stage": "stream",
            "origin_topic": "aima.gpu.samples",
            "origin_partition": i,
            "origin_offset": 10 * i,
            "key": None if i % 2 else b'\x00\xff,\n"',
            "value": bytes(range(256)) if i % 3 else None,
            "reason": f'reason {i}: é "quoted" \\ back',
            "error_type": "LateSample",
            "source": "test",
        }
        for i in range(12)
    ]


@pytest.fixture(scope="module")
def encoded() -> dict[str, list[bytes]]:
    by_name: dict[str, list[bytes]] = defaultdict(list)
    fleet = Fleet(seed=3, hosts=2, gpus_per_host=4, start=START)
    for _topic, _key, name, value in generate(fleet, START, START + timedelta(minutes=10), 5):
        short = name.rsplit(".", 1)[-1]
        if short in COLUMNAR:
            by_name[short].append(CODEC.encode(name, value))
    by_name["GpuSample"] += [CODEC.encode("GpuSample", value) for value in _odd_gpu_samples()]
    by_name["DeadLetter"] = [CODEC.encode("DeadLetter", value) for value in _dead_letters()]
    by_name["CostRecord"] = [CODEC.encode("CostRecord", cost_record(i)) for i in range(60)]
    return by_name


@pytest.fixture
def two_schemas(database_url: str, unique: str) -> Iterator[tuple[str, str]]:
    names = (f"t_{unique}_columns", f"t_{unique}_rows")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in names:
            migrate(conn, schema=name)
    yield names
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _origins(name: str, n: int) -> list[Origin]:
    """Some without a broker timestamp, except where a table stores it: there it is the writer's clock,
    which two writes do not share."""
    millis = int(START.timestamp() * 1000)
    stamped = any(c.source == "@timestamp" for t in BY_RECORD[f"aima.metrics.{name}"] for c in t.columns)
    return [
        Origin(f"aima.{name}", i % 3, i, None if i % 5 == 0 and not stamped else millis + i) for i in range(n)
    ]


def _chunk_entries(name: str, values: list[bytes]) -> list[Entry]:
    frame = FrameDecoder(CODEC, name).decode(values)
    assert frame.columns is not None and frame.rest == []
    origins = _origins(name, len(values))
    chunk = Chunk(BY_RECORD[frame.record_name], frame.columns, origins)
    return [
        Entry(o.topic, o.partition, o.offset, None, values[i], None, chunk, i) for i, o in enumerate(origins)
    ]


def _row_entries(name: str, values: list[bytes]) -> list[Entry]:
    entries = []
    for value, origin in zip(values, _origins(name, len(values)), strict=True):
        full, record = CODEC.decode(value)
        rows = rows_for(full, record, origin)
        entries.append(Entry(origin.topic, origin.partition, origin.offset, None, value, rows))
    return entries


def _differences(conn: psycopg.Connection, table: str, columns: list[str], a: str, b: str) -> list[Any]:
    """Rows of a.table not in b.table, compared as text (so NaN equals NaN and -0.0 is told from 0.0)."""
    cols = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
    query = sql.SQL("SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b}").format(
        cols=cols, a=sql.Identifier(a, table), b=sql.Identifier(b, table)
    )
    return conn.execute(query).fetchall()


def test_columnar_write_stores_what_the_row_write_stores(
    database_url: str, two_schemas: tuple[str, str], encoded: dict[str, list[bytes]]
) -> None:
    columns_schema, rows_schema = two_schemas
    writer_columns = Writer(database_url, schema=columns_schema, maintenance_every_s=None)
    writer_rows = Writer(database_url, schema=rows_schema, maintenance_every_s=None)
    try:
        for name in COLUMNAR:
            values = encoded[name]
            assert len(values) >= 8, name
            done_columns = writer_columns.write(_chunk_entries(name, values))
            done_rows = writer_rows.write(_row_entries(name, values))
            assert done_columns.staged == done_rows.staged
            assert done_columns.stored == done_rows.stored
            assert sum(done_columns.stored.values()) >= len(values)
    finally:
        writer_columns.close()
        writer_rows.close()

    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in COLUMNAR:
            for table in BY_RECORD[f"aima.metrics.{name}"]:
                columns = list(table.column_names)
                count = sql.SQL("SELECT count(*) FROM {}")
                stored = [
                    conn.execute(count.format(sql.Identifier(s, table.name))).fetchone()[0]
                    for s in two_schemas
                ]
                assert stored[0] == stored[1] > 0, table.name
                assert _differences(conn, table.name, columns, columns_schema, rows_schema) == []
                assert _differences(conn, table.name, columns, rows_schema, columns_schema) == []
        odd = conn.execute(
            sql.SQL(
                "SELECT throttle_reasons, xid_errors, processes, mig_instance, memory_utilization_percent "
                "FROM {} WHERE gpu = 0 AND host LIKE 'host %%'"
            ).format(sql.Identifier(columns_schema, "gpu_samples"))
        ).fetchone()
    assert odd[0] == ['a "b"', "c\\d", "", "NULL", "x,y", "{z}"]
    assert odd[1] == [79, -1, 2**31 - 1]
    assert odd[2] == [
        {"pid": 1, "name": 'py"thon\\', "used_memory_bytes": None},
        {"pid": 2, "name": None, "used_memory_bytes": 2**62},
    ]
    assert odd[3] == "" and math.isnan(odd[4])


def test_a_chunk_written_in_parts_or_twice_is_stored_once(
    database_url: str, db_schema: str, encoded: dict[str, list[bytes]]
) -> None:
    values = encoded["GpuSample"]
    writer = Writer(database_url, schema=db_schema, maintenance_every_s=None)
    try:
        entries = _chunk_entries("GpuSample", values)
        half = len(entries) // 2
        first = writer.write(entries[:half])  # part of a chunk: its rows, binary COPY
        assert first.stored["gpu_samples"] == half
        again = writer.write(entries)  # the whole chunk: CSV COPY, conflicts, then the staged upsert
        assert again.staged["gpu_samples"] == len(values)
        assert again.stored["gpu_samples"] == len(values) - half
        third = writer.write(_chunk_entries("GpuSample", values))
        assert third.stored["gpu_samples"] == 0
    finally:
        writer.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(db_schema, "gpu_samples"))
        ).fetchone()[0]
    assert count == len(values)


def test_the_sink_stores_one_by_one_when_a_chunk_has_no_csv(
    topics: Settings, db_schema: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk polars cannot turn into CSV is not lost: its records take the row-by-row path."""

    refused: list[int] = []

    def refuse(self: Chunk) -> None:
        refused.append(len(self))
        raise pl.exceptions.ComputeError("no CSV for this chunk")

    monkeypatch.setattr(Chunk, "prepare", refuse)
    records = [("gpu.samples", f"k{i}", "GpuSample", gpu_sample(i)) for i in range(300)]
    produce(topics, records)
    with running_sink(topics, db_schema, topics=("gpu.samples",), batch_max=1000) as (_, outcome):
        wait_until(lambda: outcome_stored(outcome) >= 300, 60, "every row stored")
    with psycopg.connect(database_url) as conn:
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(db_schema, "gpu_samples"))
        ).fetchone()[0]
    assert count == 300
    assert sum(refused) >= 64  # the records did reach the columnar path, and left it


def outcome_stored(outcome: dict[str, Any]) -> float:
    registry = outcome["registry"]
    return (
        registry.get_sample_value("aima_sink_rows_total", {"table": "gpu_samples", "outcome": "stored"})
        or 0.0
    )
