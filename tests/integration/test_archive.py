"""The long-term archive (D5) on the real PostgreSQL and a real S3 server (SeaweedFS, the `s3` fixture):
retention archives raw days and rollup tiers as Parquet before it drops them, restore brings the very rows
back, a store that is down or refuses writes holds every drop back (counted and logged), and the commands
`archive list` and `archive restore` say what they did or exit 2 on bad parameters."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql
from pydantic import SecretStr

from bus.settings import REPO_ROOT, Settings
from consumers.archive.archiver import list_manifests, restore
from consumers.archive.metrics import ArchiveMetrics
from consumers.archive.store import open_store
from consumers.retention import apply_retention, summary
from consumers.settings import ArchiveSettings, RetentionSettings
from tests.conftest import S3Service
from tests.integration.test_db_sink import running_sink, wait_until
from tests.private_stack import free_port

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
DEFAULTS = RetentionSettings.from_environ({})
GPU_KEY = "host, gpu_uuid, mig_instance, interval_group, time"
ROLLUP_KEY = "series, tier, bucket_start"


@pytest.fixture
def bucket(s3: S3Service) -> Iterator[str]:
    """A bucket of the test's own, emptied and removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    client = s3.client()
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", ()):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def archive(db: psycopg.Connection, s3: S3Service, bucket: str) -> ArchiveSettings:
    """The test's bucket as the archive, after a first retention run with it, as the sink makes when it
    starts. With TimescaleDB that run switches TimescaleDB's own retention policies and rollup job off,
    whose runs (the first comes seconds after the migration) would otherwise drop the expired rows a test
    writes before the archive sees them; nothing has expired yet, so it changes nothing else."""
    settings = _archive(s3, bucket)
    apply_retention(db, settings=DEFAULTS, archive=settings)
    return settings


def _archive(s3: S3Service, bucket: str, **changes: Any) -> ArchiveSettings:
    values: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": s3.endpoint,
        "access_key_id": SecretStr(s3.access_key),
        "secret_access_key": SecretStr(s3.secret_key),
        "timeout_s": 5.0,
        **changes,
    }
    return ArchiveSettings.from_environ({}, **values)


def _is_plain(db: psycopg.Connection) -> bool:
    mode = db.execute("SELECT mode FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()
    return mode is not None and mode[0] == "postgres"


def _gpu(db: psycopg.Connection, host: str, at: datetime, i: int) -> None:
    """A sample with every kind of column: arrays, jsonb, nulls, doubles, big integers."""
    db.execute(
        "INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group, "
        "utilization_percent, memory_used_bytes, throttle_reasons, xid_errors, processes, parent_gpu_uuid) "
        "VALUES (%s, %s, %s, 'GPU-0', 'H100', 'test', 'slow', %s, %s, %s, %s, %s, NULL)",
        (
            at,
            host,
            i % 8,
            i * 1.25,
            (1 << 40) + i,
            ["sw_power_cap", "hw_slowdown"][: i % 3],
            [13, 31 + i] if i % 2 else [],
            psycopg.types.json.Jsonb([{"pid": i, "name": f"p{i}", "used": {"bytes": i * 1024}}]),
        ),
    )


def _rollup(db: psycopg.Connection, tier: str, series: str, end: datetime, value: float) -> None:
    span = {"hour": timedelta(hours=1), "day": timedelta(days=1)}[tier]
    db.execute(
        "INSERT INTO rollups (series, metric, labels, tier, bucket_start, bucket_end, count, min, max, "
        "sum, avg, p95, sketch, final, watermark, source, emitted_at) "
        "VALUES (%s, 'm', %s, %s, %s, %s, 3, %s, %s, %s, %s, %s, %s, true, %s, 'test', %s)",
        (
            series,
            psycopg.types.json.Jsonb({"host": series}),
            tier,
            end - span,
            end,
            value,
            value + 2,
            value * 3,
            value + 1,
            value + 1.9,
            psycopg.types.json.Jsonb({"relative_accuracy": 0.01, "keys": [1, 2], "counts": [2, 1]}),
            end,
            end,
        ),
    )


def _rows(db: psycopg.Connection, query: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in db.execute(query).fetchall()]


def _count(db: psycopg.Connection, query: str) -> int:
    row = db.execute(query).fetchone()
    return int(row[0]) if row else 0


TODAY = datetime(NOW.year, NOW.month, NOW.day, tzinfo=UTC)
RAW_DAYS = [(TODAY - timedelta(days=d)).date() for d in (5, 1, 0)]


def _raw_days(db: psycopg.Connection) -> tuple[datetime, list[tuple[Any, ...]]]:
    """40 raw samples on each of RAW_DAYS, expired at the returned 'now': today and yesterday in their
    daily partitions, five days back (before the partitions) in the DEFAULT partition; and fresh ones that
    stay."""
    for i in range(40):
        for day, host in zip(RAW_DAYS, ("old-c", "old-a", "old-b"), strict=True):
            _gpu(db, host, datetime(day.year, day.month, day.day, 1, i, tzinfo=UTC), i)
    later = TODAY + timedelta(days=2, hours=1)
    for i in range(7):
        _gpu(db, "fresh", later - timedelta(minutes=i), i)
    return later, _rows(db, f"SELECT * FROM gpu_samples WHERE host LIKE 'old-%' ORDER BY {GPU_KEY}")


# -- round trips ------------------------------------------------------------------------------------------


def test_raw_rows_archived_dropped_and_restored_equal(
    db: psycopg.Connection, archive: ArchiveSettings
) -> None:
    registry = CollectorRegistry()
    metrics = ArchiveMetrics(registry)
    later, before = _raw_days(db)
    assert len(before) == 120

    actions = apply_retention(db, later, settings=DEFAULTS, archive=archive, archive_metrics=metrics)

    # Dropped: nothing of the old days is left; the fresh rows are.
    assert _count(db, "SELECT count(*) FROM gpu_samples WHERE host LIKE 'old-%'") == 0
    assert _count(db, "SELECT count(*) FROM gpu_samples WHERE host = 'fresh'") == 7
    gpu = [a for a in actions if a.table == "gpu_samples"]
    assert gpu and all(a.done for a in gpu), gpu
    if _is_plain(db):
        # Two daily partitions dropped, the DEFAULT partition's day deleted.
        assert sorted(a.kind for a in gpu) == ["delete_rows", "drop_partition", "drop_partition"]
    # One object per day, each with its manifest, Parquet in zstd.
    store = open_store(archive)
    manifests = list(list_manifests(store, "gpu_samples"))
    assert [m.rows for m in manifests] == [40, 40, 40]
    assert [m.day for m in manifests] == RAW_DAYS
    for manifest in manifests:
        assert len(manifest.parts) == 1
        assert manifest.parts[0].key.startswith(f"gpu_samples/day={manifest.day.isoformat()}/part-")
        data = store.get_bytes(manifest.parts[0].key)
        assert data is not None
        metadata = pq.ParquetFile(io.BytesIO(data)).metadata
        assert metadata.num_rows == 40 and metadata.row_group(0).column(0).compression == "ZSTD"
    assert registry.get_sample_value("aima_archive_rows_total", {"table": "gpu_samples", "tier": ""}) == 120
    assert registry.get_sample_value("aima_archive_objects_total", {"table": "gpu_samples", "tier": ""}) == 3

    # Restored into the table itself: the very rows, column for column.
    result = restore(db, store, table="gpu_samples", start=NOW - timedelta(days=6), end=later)
    assert (result.days, result.read, result.inserted) == (3, 120, 120)
    after = _rows(db, f"SELECT * FROM gpu_samples WHERE host LIKE 'old-%' ORDER BY {GPU_KEY}")
    assert after == before
    # Once more: nothing new (ON CONFLICT DO NOTHING on the natural key).
    again = restore(db, store, table="gpu_samples", start=NOW - timedelta(days=6), end=later)
    assert (again.read, again.inserted) == (120, 0)

    # The restored rows expire again; the archive holds them already, so it is not written twice.
    keys_before = sorted(store.keys("gpu_samples/"))
    apply_retention(db, later, settings=DEFAULTS, archive=archive, archive_metrics=metrics)
    assert _count(db, "SELECT count(*) FROM gpu_samples WHERE host LIKE 'old-%'") == 0
    assert sorted(store.keys("gpu_samples/")) == keys_before


def test_a_rollup_tier_archived_deleted_and_restored_into_a_scratch_schema(
    db: psycopg.Connection, db_schema: str, s3: S3Service, bucket: str, archive: ArchiveSettings
) -> None:
    archive = _archive(s3, bucket, prefix="deploy-1")
    old_day = TODAY - timedelta(days=9)
    for h in range(24):
        for s in range(3):
            _rollup(db, "hour", f"host-{s}", old_day + timedelta(hours=h, minutes=30), h + s / 10)
    _rollup(db, "hour", "recent", NOW - timedelta(days=1), 1.0)
    _rollup(db, "day", "kept", NOW - timedelta(days=9), 2.0)  # the day tier keeps 30 days
    query = f"SELECT * FROM {{}} WHERE tier = 'hour' AND series LIKE 'host-%' ORDER BY {ROLLUP_KEY}"
    before = _rows(db, query.format("rollups"))
    assert len(before) == 72

    actions = apply_retention(db, NOW, settings=DEFAULTS, archive=archive)

    hour = [a for a in actions if a.table == "rollups" and a.tier == "hour" and a.kind == "delete_rows"]
    assert sum(a.rows or 0 for a in hour) == 72 and all(a.done for a in hour)
    assert {s for (s,) in db.execute("SELECT series FROM rollups")} == {"recent", "kept"}
    store = open_store(archive)
    (manifest,) = list_manifests(store, "rollups", "hour")
    assert manifest.rows == 72 and manifest.day == old_day.date() and manifest.time_column == "bucket_end"
    assert manifest.parts[0].key.startswith(f"deploy-1/rollups/tier=hour/day={old_day.date()}/part-")
    assert list(list_manifests(store, "rollups", "day")) == []

    scratch = f"{db_schema}_scratch"
    try:
        result = restore(
            db,
            store,
            table="rollups",
            tier="hour",
            start=old_day,
            end=NOW,
            into_schema=scratch,
        )
        assert (result.read, result.inserted) == (72, 72)
        assert result.target == f"{scratch}.rollups"
        assert _rows(db, query.format(f"{scratch}.rollups")) == before
        # Nothing went back into the original table.
        assert _count(db, "SELECT count(*) FROM rollups WHERE series LIKE 'host-%'") == 0
    finally:
        db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(scratch)))


def test_late_rows_of_an_archived_day_are_merged_into_it(
    db: psycopg.Connection, s3: S3Service, bucket: str, archive: ArchiveSettings
) -> None:
    archive = _archive(s3, bucket, tables="gpu_samples")
    old = NOW - timedelta(days=5)
    for i in range(10):
        _gpu(db, "early", old + timedelta(seconds=i), i)
    apply_retention(db, NOW, settings=DEFAULTS, archive=archive)
    store = open_store(archive)
    (first,) = list_manifests(store, "gpu_samples")
    # Rows of that day arrive after it was archived and dropped: the next run merges them in.
    for i in range(3):
        _gpu(db, "late", old + timedelta(seconds=i), i)
    apply_retention(db, NOW, settings=DEFAULTS, archive=archive)
    (merged,) = list_manifests(store, "gpu_samples")
    assert (first.rows, merged.rows, len(merged.parts)) == (10, 13, 1)
    assert merged.parts[0].key != first.parts[0].key
    # The replaced part is gone: one part and one manifest for the day.
    assert len(list(store.keys("gpu_samples/"))) == 2
    result = restore(db, store, table="gpu_samples", start=old - timedelta(hours=1), end=NOW)
    assert result.inserted == 13
    assert {h for (h,) in db.execute("SELECT DISTINCT host FROM gpu_samples")} == {"early", "late"}


# -- failures: nothing dropped ----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["store down", "writes refused"])
def test_a_failing_store_holds_every_drop_back(
    db: psycopg.Connection,
    s3: S3Service,
    bucket: str,
    archive: ArchiveSettings,
    failure: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    working = archive
    if failure == "store down":
        archive = _archive(s3, bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout_s=2.0)
        reason = "unavailable"
    else:
        archive = _archive(s3, bucket, secret_access_key=SecretStr("not-the-secret"))
        reason = "refused"
    registry = CollectorRegistry()
    metrics = ArchiveMetrics(registry)
    later, before = _raw_days(db)
    old_day = NOW - timedelta(days=9)
    _rollup(db, "hour", "old", old_day, 1.0)

    with caplog.at_level(logging.WARNING, logger="consumers.archive"):
        actions = apply_retention(db, later, settings=DEFAULTS, archive=archive, archive_metrics=metrics)

    assert _rows(db, f"SELECT * FROM gpu_samples WHERE host LIKE 'old-%' ORDER BY {GPU_KEY}") == before
    assert _count(db, "SELECT count(*) FROM rollups WHERE series = 'old'") == 1
    held = [a for a in actions if a.kind == "held_back"]
    assert {(a.table, a.tier) for a in held} >= {("gpu_samples", ""), ("rollups", "hour")}
    assert not [a for a in actions if a.table in ("gpu_samples", "rollups") and a.done]
    assert (
        registry.get_sample_value(
            "aima_archive_failures_total", {"table": "gpu_samples", "tier": "", "reason": reason}
        )
        == 1
    )
    assert (
        registry.get_sample_value("aima_archive_held_back_drops", {"table": "gpu_samples", "tier": ""}) == 3
    )
    warnings = [r for r in caplog.records if r.getMessage() == "archive failed; drop held back"]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert {getattr(r, "reason", None) for r in warnings} == {reason}
    assert "3 drop(s) held back" in summary([a for a in actions if a.table == "gpu_samples"])

    # Once the store works again, the next run archives and drops; the gauge goes back to 0.
    apply_retention(db, later, settings=DEFAULTS, archive=working, archive_metrics=metrics)
    assert _count(db, "SELECT count(*) FROM gpu_samples WHERE host LIKE 'old-%'") == 0
    assert (
        registry.get_sample_value("aima_archive_held_back_drops", {"table": "gpu_samples", "tier": ""}) == 0
    )


# -- the sink's scheduled run -----------------------------------------------------------------------------


def test_the_running_sink_archives_before_its_retention_drops(
    topics: Settings, db_schema: str, db: psycopg.Connection, archive: ArchiveSettings
) -> None:
    old = NOW - timedelta(days=5)
    for i in range(5):
        _gpu(db, "sink-old", old + timedelta(minutes=i), i)
    _rollup(db, "hour", "sink-old", NOW - timedelta(days=9), 1.0)
    with running_sink(topics, db_schema, retention_every_s=1.0, retention=DEFAULTS, archive=archive) as (
        _,
        outcome,
    ):
        wait_until(
            lambda: (
                _count(db, "SELECT count(*) FROM gpu_samples WHERE host = 'sink-old'") == 0
                and _count(db, "SELECT count(*) FROM rollups WHERE series = 'sink-old'") == 0
            ),
            timeout_s=90,
            what="the sink's retention dropped the old rows",
        )
        registry = outcome["registry"]
        assert registry.get_sample_value("aima_archive_rows_total", {"table": "gpu_samples", "tier": ""}) == 5
    store = open_store(archive)
    assert [m.rows for m in list_manifests(store, "gpu_samples")] == [5]
    assert [m.rows for m in list_manifests(store, "rollups", "hour")] == [1]


# -- the commands -----------------------------------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIMA_ARCHIVE_", "AIMA_RETENTION_"))}
    return subprocess.run(
        [sys.executable, "-m", "aima_metrics", "archive", *args],
        cwd=REPO_ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _env(s3: S3Service, bucket: str, database_url: str) -> dict[str, str]:
    return {
        "AIMA_DATABASE_URL": database_url,
        "AIMA_ARCHIVE_BUCKET": bucket,
        "AIMA_ARCHIVE_ENDPOINT_URL": s3.endpoint,
        "AIMA_ARCHIVE_ACCESS_KEY_ID": s3.access_key,
        "AIMA_ARCHIVE_SECRET_ACCESS_KEY": s3.secret_key,
    }


def test_archive_list_and_restore_commands(
    db: psycopg.Connection,
    db_schema: str,
    database_url: str,
    s3: S3Service,
    bucket: str,
    archive: ArchiveSettings,
) -> None:
    env = _env(s3, bucket, database_url)
    later, before = _raw_days(db)
    apply_retention(db, later, settings=DEFAULTS, archive=archive)
    days = RAW_DAYS

    listed = _cli(env, "list", "--table", "gpu_samples")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["table", "tier", "day", "rows"]
    assert [line.split()[:4] for line in lines[1:-1]] == [
        ["gpu_samples", "-", d.isoformat(), "40"] for d in days
    ]
    assert lines[-1].startswith("3 day(s), 120 row(s), ") and f"in s3://{bucket}/" in lines[-1]
    one = _cli(env, "list", "--from", days[0].isoformat(), "--to", days[0].isoformat())
    assert one.returncode == 0 and one.stdout.splitlines()[-1].startswith("1 day(s), 40 row(s)")

    scratch = f"{db_schema}_scratch"
    try:
        restored = _cli(
            env,
            "restore",
            "--table",
            "gpu_samples",
            "--from",
            days[0].isoformat(),
            "--to",
            (days[-1] + timedelta(days=1)).isoformat(),
            "--schema",
            db_schema,
            "--into-schema",
            scratch,
        )
        assert restored.returncode == 0, restored.stderr
        assert restored.stdout.strip() == (
            f"restored 120 row(s) into {scratch}.gpu_samples from 3 archived day(s) (120 row(s) in range, "
            "0 there already)"
        )
        assert _rows(db, f"SELECT * FROM {scratch}.gpu_samples ORDER BY {GPU_KEY}") == before
        # The scratch table has the original's natural key: restoring again adds nothing. A range ending
        # at a day's start does not touch that day.
        again = _cli(
            env,
            "restore",
            "--table",
            "gpu_samples",
            "--from",
            days[1].isoformat(),
            "--to",
            days[2].isoformat(),
            "--schema",
            db_schema,
            "--into-schema",
            scratch,
        )
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == (
            f"restored 0 row(s) into {scratch}.gpu_samples from 1 archived day(s) (40 row(s) in range, "
            "40 there already)"
        )
    finally:
        db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(scratch)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("restore", "--table", "costs", "--from", "2026-01-01", "--to", "2026-01-02"), "--table"),
        (("restore", "--table", "gpu_samples", "--from", "2026-01-02", "--to", "2026-01-01"), "--to"),
        (("restore", "--table", "gpu_samples", "--from", "yesterday", "--to", "2026-01-01"), "--from"),
        (
            ("restore", "--table", "gpu_samples", "--tier", "hour", "--from", "2026-01-01", "--to", "now"),
            "--tier",
        ),
        (("restore", "--table", "rollups", "--from", "2026-01-01"), "--to"),
        (("list", "--tier", "week"), "--tier"),
    ],
)
def test_bad_parameters_exit_2_with_a_clear_error(
    s3: S3Service, bucket: str, database_url: str, args: tuple[str, ...], message: str
) -> None:
    done = _cli(_env(s3, bucket, database_url), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Error:" in done.stderr and message in done.stderr


def test_the_commands_say_when_no_archive_is_configured(database_url: str) -> None:
    done = _cli({"AIMA_DATABASE_URL": database_url}, "list")
    assert done.returncode == 2
    assert "AIMA_ARCHIVE_BUCKET" in done.stderr


def test_with_timescaledb_its_own_retention_leaves_archived_tables_to_the_archive(
    db: psycopg.Connection, archive: ArchiveSettings
) -> None:
    if _is_plain(db):
        pytest.skip("TimescaleDB mode: its retention policies and rollup job")
    # The archive fixture's first run took over: no policy drops an archived hypertable's chunks, the
    # rollup job is paused, and a later run (as the sink's every hour) keeps it so.
    apply_retention(db, settings=DEFAULTS, archive=archive, scheduled=True)
    policies = db.execute(
        """SELECT hypertable_name FROM timescaledb_information.jobs
            WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()"""
    ).fetchall()
    assert policies == []
    (scheduled,) = db.execute(
        """SELECT scheduled FROM timescaledb_information.jobs
            WHERE proc_name = 'aima_rollup_retention' AND proc_schema = current_schema()"""
    ).fetchone()
    assert scheduled is False
