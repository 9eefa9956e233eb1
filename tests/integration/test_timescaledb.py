"""TimescaleDB mode on the real extension, whenever the session's database has it (the `timescaledb`
fixture skips them on plain PostgreSQL, as in CI): the extension lives in public, so every schema
migrates and none takes it along when dropped; every job of a schema runs at least hourly, also after an
upgrade; and retention removes the expired rows through TimescaleDB's own jobs and through
consumers/retention.py."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from consumers.migrate import MIGRATIONS_DIR, MigrationError, discover, migrate
from consumers.retention import RAW_TABLES, apply_retention, summary
from consumers.settings import RetentionSettings

pytestmark = pytest.mark.integration

HOUR = timedelta(hours=1)


def _extension_schema(conn: psycopg.Connection) -> str | None:
    row = conn.execute(
        "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    return None if row is None else str(row[0])


def _hypertables(conn: psycopg.Connection, schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_schema = %s",
        (schema,),
    ).fetchall()
    return {name for (name,) in rows}


def _use(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))


@pytest.fixture
def fresh_database(timescaledb: None, database_url: str) -> Iterator[str]:
    """A new database on the session's server, without the extension yet: the state the first migration
    of a deployment meets. Skips where the session's role may not create databases."""
    name = f"aima_fresh_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.InsufficientPrivilege as exc:
            pytest.skip(f"the session's role cannot create a database: {exc}")
    try:
        yield make_conninfo(database_url, dbname=name)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -- the extension's schema (issue 13: it landed in the first migrated schema) ----------------------------


def test_every_schema_migrates_and_dropping_one_keeps_the_extension(fresh_database: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        first = migrate(conn, schema="first")
        if first.mode != "timescaledb":
            pytest.skip("the session's role cannot create the extension (that needs a superuser)")
        assert _extension_schema(conn) == "public"
    # Each on a connection of its own, as each service migrates.
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        second = migrate(conn, schema="second")  # was: function by_range(unknown, interval) does not exist
        assert second.mode == "timescaledb" and len(second.applied) == len(discover())
        assert {"gpu_samples", "job_events"} <= _hypertables(conn, "second")
        conn.execute("DROP SCHEMA first CASCADE")  # was: took the extension, and every hypertable, along
        assert _extension_schema(conn) == "public"
        assert set(RAW_TABLES) <= _hypertables(conn, "second")
        _use(conn, "second")
        now = datetime.now(UTC)
        conn.execute(
            "INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group) "
            "VALUES (%s, 'h', 0, 'GPU-0', 'H100', 'test', 'slow')",
            (now,),
        )
        bucket = conn.execute("SELECT time_bucket('1 hour', time) FROM gpu_samples").fetchone()
        assert bucket is not None and bucket[0] <= now
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        assert migrate(conn, schema="third").mode == "timescaledb"


def test_an_extension_left_inside_a_schema_is_named_not_a_lost_function(fresh_database: str) -> None:
    # A database an older aima-metrics migrated: the extension was created inside its first schema.
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA old")
        _use(conn, "old")
        try:
            conn.execute("CREATE EXTENSION timescaledb")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the session's role cannot create the extension (that needs a superuser)")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        # That schema goes on working ...
        assert migrate(conn, schema="old").mode == "timescaledb"
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        # ... and another one is refused with the reason, before anything is applied.
        with pytest.raises(MigrationError, match=r"lives in schema 'old'.*search path"):
            migrate(conn, schema="other")
        assert conn.execute("SELECT to_regclass('other.gpu_samples')").fetchone() == (None,)


# -- the jobs' schedules (issue 13: retention ran daily, so raw rows lived about 49 h) --------------------


def _jobs(conn: psycopg.Connection, schema: str) -> list[tuple[str, str | None, timedelta]]:
    rows = conn.execute(
        """SELECT proc_name, hypertable_name, schedule_interval FROM timescaledb_information.jobs
            WHERE hypertable_schema = %s OR (proc_schema = %s AND proc_name = 'aima_rollup_retention')
            ORDER BY proc_name, hypertable_name""",
        (schema, schema),
    ).fetchall()
    return [(str(p), h, s) for p, h, s in rows]


def test_every_job_of_a_schema_runs_at_least_hourly(ts_db: psycopg.Connection, db_schema: str) -> None:
    jobs = _jobs(ts_db, db_schema)
    by_kind: dict[str, set[str | None]] = {}
    for proc, table, _ in jobs:
        by_kind.setdefault(proc, set()).add(table)
    assert by_kind == {
        "policy_retention": set(RAW_TABLES),
        "policy_compression": set(RAW_TABLES),
        "aima_rollup_retention": {None},
    }
    assert [(p, t, s) for p, t, s in jobs if s > HOUR] == []


def _next_retention_run(conn: psycopg.Connection, schema: str) -> datetime:
    """The latest next start of the schema's retention jobs (a job never run yet counts as now: the
    scheduler starts a new job at once)."""
    row = conn.execute(
        """SELECT max(coalesce(s.next_start, now())) FROM timescaledb_information.jobs j
             LEFT JOIN timescaledb_information.job_stats s USING (job_id)
            WHERE j.proc_name = 'policy_retention' AND j.hypertable_schema = %s""",
        (schema,),
    ).fetchone()
    assert row is not None and isinstance(row[0], datetime)
    return row[0]


def test_an_upgraded_schema_gets_hourly_retention(
    timescaledb: None, database_url: str, unique: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) < 14:
            shutil.copy(path, before)
    schema = f"up_{unique}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            migrate(conn, schema=schema, directory=before)
            # What a database migrated before 0014 has: TimescaleDB's default, daily.
            daily = {s for p, _, s in _jobs(conn, schema) if p == "policy_retention"}
            assert daily == {timedelta(days=1)}
            with caplog.at_level(logging.WARNING, logger="consumers.migrate"):
                report = migrate(conn, schema=schema)
            assert report.mode == "timescaledb" and report.applied[0] == "0014_job_schedules"
            assert [r.getMessage() for r in caplog.records] == []  # no migration counts as changed
            assert all(s <= HOUR for _, _, s in _jobs(conn, schema))
            # The next run is at most an hour away, not the day the old schedule had left.
            assert _next_retention_run(conn, schema) <= datetime.now(UTC) + HOUR
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# -- retention in TimescaleDB mode -----------------------------------------------------------------------


def _gpu(db: psycopg.Connection, host: str, at: datetime) -> None:
    db.execute(
        "INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group, power_watts) "
        "VALUES (%s, %s, 0, 'GPU-0', 'H100', 'test', 'slow', 300)",
        (at, host),
    )


def _event(db: psycopg.Connection, job: str, at: datetime) -> None:
    db.execute(
        "INSERT INTO job_events (time, job_id, event, project, gpu_count, source) "
        "VALUES (%s, %s, 'started', 'p', 1, 'test')",
        (at, job),
    )


def _rollup(db: psycopg.Connection, tier: str, series: str, end: datetime) -> None:
    db.execute(
        "INSERT INTO rollups (series, metric, labels, tier, bucket_start, bucket_end, count, min, max, "
        "sum, avg, p95, sketch, final, watermark, source, emitted_at) "
        "VALUES (%s, 'm', '{}', %s, %s, %s, 1, 1, 1, 1, 1, 1, '{}', true, %s, 'test', %s)",
        (series, tier, end - HOUR, end, end, end),
    )


def _run_jobs(db: psycopg.Connection, schema: str, proc: str) -> int:
    """Runs the schema's jobs of one kind now, as TimescaleDB's scheduler would at their next start."""
    ids = [
        job
        for (job,) in db.execute(
            """SELECT job_id FROM timescaledb_information.jobs
                WHERE proc_name = %s AND (hypertable_schema = %s OR proc_schema = %s) ORDER BY job_id""",
            (proc, schema, schema),
        )
    ]
    for job in ids:
        db.execute("CALL run_job(%s)", (job,))
    return len(ids)


def test_timescaledb_jobs_remove_the_expired_rows(ts_db: psycopg.Connection, db_schema: str) -> None:
    db, now = ts_db, datetime.now(UTC)
    _gpu(db, "expired", now - timedelta(days=3))
    _gpu(db, "a-day-old", now - timedelta(hours=25, minutes=30))  # its chunk ended over 24 h ago
    _gpu(db, "kept", now - timedelta(hours=22))
    _gpu(db, "recent", now - timedelta(minutes=5))
    _event(db, "expired-job", now - timedelta(days=2))
    _event(db, "kept-job", now - timedelta(hours=3))
    _rollup(db, "hour", "hour-expired", now - timedelta(days=7, hours=2))
    _rollup(db, "hour", "hour-kept", now - timedelta(days=6))
    _rollup(db, "day", "day-expired", now - timedelta(days=31))
    _rollup(db, "day", "day-kept", now - timedelta(days=20))
    _rollup(db, "year", "year-kept", now - timedelta(days=3650))

    # Compressed first, as chunks older than 2 hours are by then: retention drops those too.
    assert _run_jobs(db, db_schema, "policy_compression") == len(RAW_TABLES)
    compressed = db.execute(
        "SELECT count(*) FROM timescaledb_information.chunks "
        "WHERE hypertable_schema = %s AND hypertable_name = 'gpu_samples' AND is_compressed",
        (db_schema,),
    ).fetchone()
    assert compressed is not None and compressed[0] >= 3
    assert _run_jobs(db, db_schema, "policy_retention") == len(RAW_TABLES)
    assert _run_jobs(db, db_schema, "aima_rollup_retention") == 1

    hosts = {h for (h,) in db.execute("SELECT host FROM gpu_samples")}
    assert hosts == {"kept", "recent"}
    assert {j for (j,) in db.execute("SELECT job_id FROM job_events")} == {"kept-job"}
    series = {s for (s,) in db.execute("SELECT series FROM rollups")}
    assert series == {"hour-kept", "day-kept", "year-kept"}

    # What is left is not expired: `db retention` then lists TimescaleDB's policies and counts nothing.
    actions = apply_retention(db, now=now, settings=RetentionSettings.from_environ({}))
    assert {a.table for a in actions if a.kind == "policy"} == set(RAW_TABLES)
    assert all("every 01:00:00" in a.detail for a in actions if a.kind == "policy")
    assert summary(actions) == "nothing has expired"
    # The sink's scheduled run leaves to TimescaleDB what its jobs trim.
    scheduled = apply_retention(db, now=now, settings=RetentionSettings.from_environ({}), scheduled=True)
    assert {a.table for a in scheduled} & {*RAW_TABLES, "rollups"} == set()


def test_db_retention_drops_the_chunks_of_a_hypertable_without_policy(
    ts_db: psycopg.Connection, db_schema: str
) -> None:
    db, now = ts_db, datetime.now(UTC)
    db.execute("SELECT remove_retention_policy('gpu_samples')")
    _gpu(db, "expired", now - timedelta(days=3))
    _gpu(db, "kept", now - timedelta(hours=2))
    settings = RetentionSettings.from_environ({})
    planned = apply_retention(db, now=now, dry_run=True, settings=settings)
    would = [a.target for a in planned if a.kind == "drop_chunk" and a.table == "gpu_samples"]
    assert len(would) == 1
    assert {h for (h,) in db.execute("SELECT host FROM gpu_samples")} == {"expired", "kept"}
    done = apply_retention(db, now=now, settings=settings)
    assert [a.target for a in done if a.kind == "drop_chunk" and a.done] == would
    assert summary(done) == "dropped 1 partition(s) or chunk(s), deleted 0 row(s)"
    assert {h for (h,) in db.execute("SELECT host FROM gpu_samples")} == {"kept"}
