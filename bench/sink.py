"""Rows per second the database sink sustains, next to a bare COPY of the same rows in the same run.

    .venv/bin/python -m bench.sink [--rows 500000] [--batch-max 5000] [--writers 2] [--out FILE]

Needs the local Kafka and PostgreSQL (``aima-metrics up`` or the scripts in infra/). Steps:
  1. N GPU samples (distinct series and times within the last day) are encoded with the codec and
     produced to a fresh ``gpu.samples`` topic (8 partitions) before anything is timed;
  2. bare COPY: the same rows, already as tuples, are written with psycopg's binary COPY into a plain
     table of gpu_samples' columns (no partitions, no indexes), once into an UNLOGGED one, once into a
     logged one, and into the sink's own gpu_samples table (daily partitions, natural-key and BRIN
     indexes, emptied before and after); COPY plus commit is timed;
  3. sink: ``consumers.sink.run`` (defaults: batch_max 5000, 1 s, 2 writers) in a fresh consumer group
     reads the topic into that freshly migrated schema; timed from the start of ``run`` until the last
     row is committed (group join included), and from the first committed batch to the last (the rate
     it sustains);
  4. bare COPY once more, to see the machine did not drift.
The schema and the two topics it creates are removed at the end.
The headline ratio is the sustained rate over the faster bare COPY into the same table (target: at least
70 %); the report gives the others too.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry
from psycopg import sql

from bus.codec import Codec
from bus.frames import FrameDecoder
from bus.kafka import admin, ensure_topics
from bus.runtime import Service
from bus.settings import REPO_ROOT, Settings
from bus.topics import BY_KEY, topic_name
from consumers import sink
from consumers.migrate import migrate
from consumers.tables import BY_NAME, Origin, rows_for

GPUS_PER_HOST = 8


def gpu_samples(n: int, now: datetime) -> list[dict[str, Any]]:
    """``n`` samples: 400 GPUs (50 hosts x 8), one sample each 10 s going back from ``now``."""
    series = 50 * GPUS_PER_HOST
    out = []
    for i in range(n):
        s, step = i % series, i // series
        host, gpu = f"bench-host-{s // GPUS_PER_HOST:03d}", s % GPUS_PER_HOST
        out.append(
            {
                "time": now - timedelta(seconds=10 * step),
                "host": host,
                "gpu": gpu,
                "gpu_uuid": f"GPU-{host}-{gpu}",
                "gpu_model": "NVIDIA H100 80GB HBM3",
                "mig_instance": None,
                "parent_gpu_uuid": None,
                "source": "bench",
                "interval_group": "fast",
                "utilization_percent": float(i % 101),
                "memory_used_bytes": 40_000_000_000 + i,
                "memory_total_bytes": 80_000_000_000,
                "memory_utilization_percent": 50.0,
                "memory_bandwidth_utilization_percent": 31.0,
                "temperature_celsius": 64.0,
                "power_watts": 412.5,
                "tensor_core_utilization_percent": 22.0,
                "pcie_tx_bytes_per_second": 1.5e9,
                "pcie_rx_bytes_per_second": 2.5e9,
                "energy_joules": 1e9 + i,
                "sm_clock_hz": 1_980_000_000,
                "memory_clock_hz": 2_619_000_000,
                "throttle_reasons": [],
                "ecc_corrected_errors": 0,
                "ecc_uncorrected_errors": 0,
                "xid_errors": [],
                "processes": [{"pid": 1000 + gpu, "name": "python", "used_memory_bytes": 39_000_000_000}],
            }
        )
    return out


def produce(settings: Settings, codec: Codec, records: list[dict[str, Any]]) -> float:
    topic = topic_name(settings, "gpu.samples")
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "zstd",
            "queue.buffering.max.messages": 500_000,
        }
    )
    started = time.perf_counter()
    for record in records:
        key = f"{record['host']}/{record['gpu_uuid']}".encode()
        producer.produce(topic, value=codec.encode("GpuSample", record, topic), key=key)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("records not delivered")
    return time.perf_counter() - started


def bare_copy(conn: psycopg.Connection, rows: list[tuple[Any, ...]], target: str, schema: str) -> float:
    """COPY the rows with psycopg's binary COPY; seconds for COPY + commit. ``target``: ``unlogged`` or
    ``logged`` (a fresh plain table of gpu_samples' columns, no partitions, no indexes) or ``sink`` (the
    migrated gpu_samples table the sink writes, with its daily partitions, natural-key and BRIN indexes;
    emptied before and after)."""
    table = BY_NAME["gpu_samples"]
    columns = sql.SQL(", ").join(map(sql.Identifier, table.column_names))
    if target == "sink":
        name = sql.Identifier(schema, "gpu_samples")
        conn.execute(sql.SQL("TRUNCATE {}").format(name))
    else:
        name = sql.Identifier(f"bench_copy_{target}")
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        conn.execute(
            sql.SQL("CREATE {} TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                sql.SQL("UNLOGGED" if target == "unlogged" else ""),
                name,
                columns,
                sql.Identifier(schema, "gpu_samples"),
            )
        )
    types = [
        oid
        for (_, oid) in conn.execute(
            "SELECT attname, atttypid::integer FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (name.as_string(conn),),
        )
    ]
    started = time.perf_counter()
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(name, columns)
    with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)
    elapsed = time.perf_counter() - started
    count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()[0]
    assert count == len(rows), count
    conn.execute(sql.SQL("TRUNCATE {}" if target == "sink" else "DROP TABLE {}").format(name))
    return elapsed


def run_sink(
    settings: Settings, schema: str, n: int, batch_max: int, writers: int
) -> tuple[float, float, sink.SinkStats, dict[str, float]]:
    """Seconds from the start of run() to the last row committed, and from the first row committed; the
    sink's stats; and the seconds its batches spent filling (consumer thread: reading, decoding),
    writing (writer thread: CSV, COPY, commit) and committing offsets, summed over the batches."""
    registry = CollectorRegistry()
    service = Service("bench-sink", settings, registry=registry)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["stats"] = sink.run(
                settings,
                service=service,
                schema=schema,
                registry=registry,
                topics=("gpu.samples",),
                group_id=f"bench-{uuid.uuid4().hex[:8]}",
                batch_max=batch_max,
                writers=writers,
            )
        except BaseException as exc:
            outcome["error"] = exc

    def stored() -> float:
        value = registry.get_sample_value(
            "aima_sink_rows_total", {"table": "gpu_samples", "outcome": "stored"}
        )
        return value or 0.0

    started = time.perf_counter()
    first = None
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        while stored() < n:
            if "error" in outcome:
                raise outcome["error"]
            if first is None and stored() > 0:
                first = time.perf_counter()
            if time.perf_counter() - started > 900:
                raise TimeoutError(f"only {stored():.0f} of {n} rows stored after 900 s")
            time.sleep(0.05)  # reading the registry costs the sink's thread some of its time
        done = time.perf_counter()
    finally:
        service.stopping.set()
        thread.join(120)
    if "error" in outcome:
        raise outcome["error"]
    phases = {
        phase: registry.get_sample_value("aima_sink_batch_duration_seconds_sum", {"phase": phase}) or 0.0
        for phase in ("fill", "write", "commit")
    }
    return done - started, done - (first or started), outcome["stats"], phases


def _row(what: str, seconds: dict[str, float], rate: dict[str, float], key: str) -> str:
    first, second = f"{key}_1", f"{key}_2"
    return (
        f"| {what} | {seconds[first]:.2f} / {seconds[second]:.2f} | "
        f"{rate[first]:,.0f} / {rate[second]:,.0f} |"
    )


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--writers", type=int, default=2, help="the sink's database writers")
    parser.add_argument("--batch-max", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    n = args.rows

    unique = uuid.uuid4().hex[:8]
    settings = Settings(topic_prefix=f"bench{unique}.")
    schema = f"bench_{unique}"
    ensure_topics(settings, (BY_KEY["gpu.samples"], BY_KEY["deadletter"]))
    codec = Codec()
    now = datetime.now(UTC).replace(microsecond=0)
    records = gpu_samples(n, now)
    print(f"producing {n} GpuSample records ...", flush=True)
    produce_s = produce(settings, codec, records)
    # The same rows the sink writes, as the sink builds them (decoded from the same bytes); the time each
    # step takes on one core bounds what one sink process can do.
    # Chunks of a batch, as in the sink: what a chunk decodes to is garbage once it is rows.
    encoded = [codec.encode("GpuSample", r) for r in records]
    del records
    origin = Origin("bench", 0, 0, int(now.timestamp() * 1000))
    decode_s = rows_s = frame_s = frame_rows_s = 0.0
    rows: list[tuple[Any, ...]] = []
    frames = FrameDecoder(codec, "GpuSample")
    table = BY_NAME["gpu_samples"]
    for start in range(0, n, args.batch_max):
        chunk = encoded[start : start + args.batch_max]
        started = time.perf_counter()
        decoded = [codec.decode(data) for data in chunk]
        decode_s += time.perf_counter() - started
        started = time.perf_counter()
        rows += [row for name, record in decoded for _, row in rows_for(name, record, origin)]
        rows_s += time.perf_counter() - started
        started = time.perf_counter()
        frame = frames.decode(chunk)
        frame_s += time.perf_counter() - started
        assert frame.columns is not None and not frame.rest
        started = time.perf_counter()
        columnar = table.rows_from_columns(frame.columns, [origin] * len(frame.rows))
        frame_rows_s += time.perf_counter() - started
        assert columnar == rows[start : start + args.batch_max]
    del decoded, encoded, frame, columnar
    # The bench's own copy of the rows is no garbage of the sink's: keep the collector off it.
    gc.collect()
    gc.freeze()

    dsn = settings.database_dsn()
    results: dict[str, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        report = migrate(conn, schema=schema)
        server = conn.execute("SHOW server_version").fetchone()[0]
        try:
            print("bare COPY ...", flush=True)
            for target in ("unlogged", "logged", "sink"):
                results[f"copy_{target}_1"] = bare_copy(conn, rows, target, schema)
            print("sink ...", flush=True)
            total_s, steady_s, stats, phases = run_sink(settings, schema, n, args.batch_max, args.writers)
            results["sink_total"], results["sink_steady"] = total_s, steady_s
            stored = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.gpu_samples").format(sql.Identifier(schema))
            )
            assert stored.fetchone()[0] == n
            print("bare COPY again ...", flush=True)
            for target in ("unlogged", "logged", "sink"):
                results[f"copy_{target}_2"] = bare_copy(conn, rows, target, schema)
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            names = [topic_name(settings, key) for key in ("gpu.samples", "deadletter")]
            client = admin(settings)
            for future in client.delete_topics(names, operation_timeout=30).values():
                future.result()

    rate = {k: n / v for k, v in results.items()}
    copy_logged = max(rate["copy_logged_1"], rate["copy_logged_2"])
    copy_unlogged = max(rate["copy_unlogged_1"], rate["copy_unlogged_2"])
    copy_sink = max(rate["copy_sink_1"], rate["copy_sink_2"])
    sustained = (n - args.batch_max) / results["sink_steady"]
    info = machine()
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        f"# Sink throughput, {date}",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, {info['os']}, Python "
        f"{info['python']}, PostgreSQL {server} ({report.mode}); Kafka, PostgreSQL and the benchmark "
        "share it.",
        f"Rows: {n} GpuSample records (27 columns), 8 partitions, pre-produced in {produce_s:.1f} s; "
        f"sink batch_max {args.batch_max}, batch timeout 1 s, {args.writers} writer(s); command "
        f"`python -m bench.sink --rows {n} --batch-max {args.batch_max} --writers {args.writers}`.",
        "",
        "| what | seconds | rows/s |",
        "|---|---:|---:|",
        _row("bare COPY, unlogged table, no index (1st / 2nd)", results, rate, "copy_unlogged"),
        _row("bare COPY, logged table, no index (1st / 2nd)", results, rate, "copy_logged"),
        _row("bare COPY into the sink's table (partitions, indexes; 1st / 2nd)", results, rate, "copy_sink"),
        f"| sink, Kafka to committed rows, from start (group join included) | {results['sink_total']:.2f} | "
        f"{rate['sink_total']:,.0f} |",
        f"| sink, from first committed batch to last (sustained) | {results['sink_steady']:.2f} | "
        f"{sustained:,.0f} |",
        f"| sink, per batch: filling (consumer thread) / writing (writer thread) / committing offsets | "
        f"{phases['fill'] / stats.batches:.3f} / {phases['write'] / stats.batches:.3f} / "
        f"{phases['commit'] / stats.batches:.3f} | |",
        f"| one core, Codec.decode only (no Kafka, no database) | {decode_s:.2f} | {n / decode_s:,.0f} |",
        f"| one core, record to row tuples only | {rows_s:.2f} | {n / rows_s:,.0f} |",
        f"| one core, FrameDecoder (native columnar read, boundaries checked) | {frame_s:.2f} | "
        f"{n / frame_s:,.0f} |",
        f"| one core, columns to row tuples | {frame_rows_s:.2f} | {n / frame_rows_s:,.0f} |",
        "",
        f"**Sink sustained / bare COPY into the same table: {sustained / copy_sink:.0%}** (target >= 70 %); "
        f"from start: {rate['sink_total'] / copy_sink:.0%}. Against a plain logged table: sustained "
        f"{sustained / copy_logged:.0%}, from start {rate['sink_total'] / copy_logged:.0%}; against a plain "
        f"unlogged table: sustained {sustained / copy_unlogged:.0%}. Batches: {stats.batches}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = args.out or REPO_ROOT / "bench" / "results" / f"sink-{date}.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
