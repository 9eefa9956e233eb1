"""Retention (D2, K2) on the real PostgreSQL, each test in a migrated schema of its own: the running sink
applies it by itself, every table's period removes exactly what is older than it, and `db retention` says
what it actually dropped and deleted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from bus.settings import REPO_ROOT, Settings
from consumers.retention import KEPT_FOREVER, POLICIES, apply_retention
from consumers.settings import RetentionSettings
from tests.integration.test_db_sink import gpu_sample, produce, running_sink, wait_until

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
DEFAULTS = RetentionSettings.from_environ({})


def _mode(db: psycopg.Connection) -> str:
    return str(db.execute("SELECT mode FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()[0])


# -- rows of each table, by tag ---------------------------------------------------------------------------


def _cost(db: psycopg.Connection, tag: str, kind: str, end: datetime) -> None:
    db.execute(
        "INSERT INTO costs (time, period_end, kind, project, job_id, currency, source, emitted_at) "
        "VALUES (%s, %s, %s, %s, %s, 'EUR', 'test', %s)",
        (end - timedelta(hours=1), end, kind, tag, tag if kind == "job_cost" else "", end),
    )


def _gpu_energy(db: psycopg.Connection, uuid: str, end: datetime) -> None:
    db.execute(
        "INSERT INTO gpu_energy (time, period_end, gpu_uuid, gpu_model, device_hours, energy_kwh, currency, "
        "source, emitted_at) VALUES (%s, %s, %s, 'L4', 1.0, 0.1, 'EUR', 'test', %s)",
        (end - timedelta(hours=1), end, uuid, end),
    )


def _alert(db: psycopg.Connection, fingerprint: str, status: str, starts: datetime, at: datetime) -> None:
    db.execute(
        "INSERT INTO alert_history (fingerprint, rule, status, severity, starts_at, event_time, labels, "
        "annotations, channels, source) VALUES (%s, 'r', %s, 'warning', %s, %s, '{}', '{}', '{}', 'test')",
        (fingerprint, status, starts, at),
    )


def _notification(db: psycopg.Connection, fingerprint: str, starts: datetime, at: datetime) -> None:
    db.execute(
        "INSERT INTO notification_log (fingerprint, status, starts_at, channel, receiver, outcome, "
        "updated_at) VALUES (%s, 'firing', %s, 'webhook', 'ops', 'delivered', %s)",
        (fingerprint, starts, at),
    )


def _anomaly(db: psycopg.Connection, tag: str, at: datetime) -> None:
    db.execute(
        "INSERT INTO anomalies (time, series, metric, labels, value, expected, score, method, source) "
        "VALUES (%s, %s, 'm', '{}', 1, 0, 9, 'ewma', 'test')",
        (at, tag),
    )


def _dead_letter(db: psycopg.Connection, tag: str, at: datetime) -> None:
    db.execute(
        "INSERT INTO dead_letters (time, stage, origin_topic, reason, error_type, source) "
        "VALUES (%s, 'stream', %s, 'bad', 'Test', 'test')",
        (at, tag),
    )


def _audit(db: psycopg.Connection, tag: str, at: datetime) -> None:
    db.execute("INSERT INTO audit_log (time, endpoint, status) VALUES (%s, %s, 200)", (at, tag))


def _silence(db: psycopg.Connection, tag: str, ends: datetime) -> None:
    db.execute(
        "INSERT INTO silences (matchers, starts_at, ends_at, created_by, comment) "
        "VALUES (%s, %s, %s, 't', %s)",
        (json.dumps([{"name": "host", "op": "=", "value": tag}]), ends - timedelta(hours=2), ends, tag),
    )


def _rollup(db: psycopg.Connection, tier: str, series: str, end: datetime) -> None:
    db.execute(
        "INSERT INTO rollups (series, metric, labels, tier, bucket_start, bucket_end, count, min, max, "
        "sum, avg, p95, sketch, final, watermark, source, emitted_at) "
        "VALUES (%s, 'm', '{}', %s, %s, %s, 1, 1, 1, 1, 1, 1, '{}', true, %s, 'test', %s)",
        (series, tier, end - timedelta(hours=1), end, end, end),
    )


def _gpu(db: psycopg.Connection, host: str, at: datetime) -> None:
    db.execute(
        "INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group) "
        "VALUES (%s, %s, 0, 'GPU-0', 'H100', 'test', 'slow')",
        (at, host),
    )


def _tags(db: psycopg.Connection) -> dict[str, set[str]]:
    """What each table holds, by the tag its rows were written with."""
    queries = {
        "gpu_samples": "SELECT host FROM gpu_samples WHERE source = 'test'",
        "rollups": "SELECT series FROM rollups",
        "costs": "SELECT project FROM costs",
        "alert_history": "SELECT fingerprint || '/' || status FROM alert_history",
        "notification_log": "SELECT fingerprint FROM notification_log",
        "anomalies": "SELECT series FROM anomalies",
        "dead_letters": "SELECT origin_topic FROM dead_letters",
        "audit_log": "SELECT endpoint FROM audit_log",
        "silences": "SELECT comment FROM silences",
        "api_tokens": "SELECT name FROM api_tokens",
    }
    return {table: {tag for (tag,) in db.execute(query)} for table, query in queries.items()}


def _old_and_fresh(db: psycopg.Connection, wave: str) -> None:
    """Per table, a row well past its default period ('<wave>-old') and a fresh one ('<wave>-new')."""
    old = NOW - timedelta(days=800)  # past every default period
    recent = NOW - timedelta(minutes=30)
    _gpu(db, f"{wave}-old", NOW - timedelta(days=5))
    _gpu(db, f"{wave}-new", recent)
    _rollup(db, "hour", f"{wave}-old", NOW - timedelta(days=8))
    _rollup(db, "hour", f"{wave}-new", recent)
    _cost(db, f"{wave}-old", "gpu_hours", old)
    _cost(db, f"{wave}-new", "gpu_hours", recent)
    _alert(db, f"{wave}-old", "firing", old, old)
    _alert(db, f"{wave}-old", "resolved", old, old + timedelta(hours=1))
    _alert(db, f"{wave}-new", "firing", recent, recent)
    _anomaly(db, f"{wave}-old", old)
    _anomaly(db, f"{wave}-new", recent)
    _dead_letter(db, f"{wave}-old", old)
    _dead_letter(db, f"{wave}-new", recent)
    _audit(db, f"{wave}-old", old)
    _audit(db, f"{wave}-new", recent)


def _pause_timescaledb_jobs(db: psycopg.Connection) -> None:
    """TimescaleDB mode: the schema's retention jobs (its raw tables' policies, the rollup job, which
    runs once at migration) paused, so they take no row a test counts."""
    if _mode(db) == "timescaledb":
        db.execute(
            """SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs
                WHERE (proc_name = 'policy_retention' AND hypertable_schema = current_schema())
                   OR (proc_name = 'aima_rollup_retention' AND proc_schema = current_schema())"""
        )


def _only_fresh_left(db: psycopg.Connection, wave: str) -> bool:
    """Whether the sink's retention took the wave's old rows. With TimescaleDB the raw tables and rollups
    are its own jobs' (tests/integration/test_timescaledb.py runs them), the rest the sink's."""
    tags = _tags(db)
    if _mode(db) == "timescaledb":
        tags = {table: held for table, held in tags.items() if table not in ("gpu_samples", "rollups")}
    return not any(tag.startswith(f"{wave}-old") for held in tags.values() for tag in held)


# -- (1) the running sink, nobody typing anything ---------------------------------------------------------


def test_the_running_sink_applies_retention_by_itself(
    topics: Settings, db_schema: str, db: psycopg.Connection
) -> None:
    _old_and_fresh(db, "w1")
    with running_sink(topics, db_schema, retention_every_s=1.0, retention=DEFAULTS):
        # Samples flowing in: the sink's writer runs retention beside its batches.
        produce(topics, [("gpu.samples", "gpu-host-1/GPU-0", "GpuSample", gpu_sample(0))])
        wait_until(lambda: _only_fresh_left(db, "w1"), timeout_s=90, what="the first wave's old rows gone")
        # And again later, on its schedule: a second wave of expired rows goes too.
        _old_and_fresh(db, "w2")
        for i in range(1, 4):
            produce(topics, [("gpu.samples", "gpu-host-1/GPU-1", "GpuSample", gpu_sample(i))])
        wait_until(lambda: _only_fresh_left(db, "w2"), timeout_s=90, what="the second wave's old rows gone")
        wait_until(
            lambda: db.execute("SELECT count(*) FROM gpu_samples WHERE source = 'test'").fetchone()[0] >= 4,
            timeout_s=60,
            what="the produced samples stored",
        )
    tags = _tags(db)
    for wave in ("w1", "w2"):
        assert f"{wave}-new" in tags["gpu_samples"]
        assert f"{wave}-new" in tags["rollups"]
        assert f"{wave}-new" in tags["costs"]
        assert f"{wave}-new/firing" in tags["alert_history"]
        for table in ("anomalies", "dead_letters", "audit_log"):
            assert f"{wave}-new" in tags[table], table


def test_an_idle_sink_applies_retention_too(topics: Settings, db_schema: str, db: psycopg.Connection) -> None:
    # No record comes at all: the sink still hands its writer the upkeep on schedule.
    _old_and_fresh(db, "idle")
    with running_sink(topics, db_schema, retention_every_s=1.0, retention=DEFAULTS):
        wait_until(lambda: _only_fresh_left(db, "idle"), timeout_s=90, what="old rows gone, none sent")
        _old_and_fresh(db, "idle2")
        wait_until(lambda: _only_fresh_left(db, "idle2"), timeout_s=90, what="and again on the schedule")
    tags = _tags(db)
    assert {"idle-new", "idle2-new"} <= tags["gpu_samples"] and {"idle-new", "idle2-new"} <= tags["audit_log"]


# -- (2) each table's period, exactly ---------------------------------------------------------------------


def test_every_table_of_the_schema_has_a_retention(db: psycopg.Connection, db_schema: str) -> None:
    tables = {
        name
        for (name,) in db.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace "
            "AND relkind IN ('r', 'p') AND NOT relispartition",
            (db_schema,),
        )
    }
    covered = {p.relation for p in POLICIES} | set(KEPT_FOREVER)
    assert tables - covered == set()
    assert {p.relation for p in POLICIES} <= tables


def test_each_table_expires_exactly_what_is_older_than_its_period(db: psycopg.Connection) -> None:
    if _mode(db) != "postgres":
        pytest.skip("plain PostgreSQL mode")
    # A variable changes a period: the audit log kept 400 days instead of 365.
    settings = RetentionSettings.from_environ({"AIMA_RETENTION_AUDIT_LOG": "400d"})
    assert settings.audit_log == timedelta(days=400)
    now = NOW
    s = timedelta(seconds=1)

    def edge(keep: timedelta | None) -> tuple[datetime, datetime]:
        assert keep is not None
        return now - keep - s, now - keep + s  # (just expired, just kept)

    kinds = (("gpu_hours", settings.costs), ("job_cost", settings.costs), ("budget", settings.budgets))
    for kind, keep in kinds:
        gone, kept = edge(keep)
        _cost(db, f"{kind}-gone", kind, gone)
        _cost(db, f"{kind}-kept", kind, kept)
    gone, kept = edge(settings.alert_history)
    _alert(db, "episode-over", "firing", gone - timedelta(hours=1), gone - timedelta(hours=1))
    _alert(db, "episode-over", "resolved", gone - timedelta(hours=1), gone)
    _alert(db, "resolved-recently", "firing", gone - timedelta(hours=1), gone)  # its resolution is kept...
    _alert(db, "resolved-recently", "resolved", gone - timedelta(hours=1), kept)
    _alert(db, "still-firing", "firing", gone, gone)  # ... and a current alert never goes
    gone, kept = edge(settings.notification_log)
    _notification(db, "episode-over", gone, gone)
    _notification(db, "resolved-recently", kept, kept)
    _notification(db, "still-firing", gone, gone)  # the episode is still firing: its log stays
    for table, insert in (("anomalies", _anomaly), ("dead_letters", _dead_letter), ("audit_log", _audit)):
        gone, kept = edge(getattr(settings, table))
        insert(db, f"{table}-gone", gone)
        insert(db, f"{table}-kept", kept)
    gone, kept = edge(settings.silences)
    _silence(db, "silence-gone", gone)
    _silence(db, "silence-kept", kept)
    _silence(db, "silence-active", now + timedelta(hours=1))
    gone, kept = edge(settings.energy)
    _gpu_energy(db, "GPU-gone", gone)
    _gpu_energy(db, "GPU-kept", kept)
    db.execute(
        "INSERT INTO api_tokens (name, token_hash, role, created_at) VALUES ('old-token', 'h', 'admin', %s)",
        (now - timedelta(days=3650),),
    )

    before = _tags(db)
    planned = apply_retention(db, now=now, dry_run=True, settings=settings)
    assert _tags(db) == before  # a dry run changes nothing
    done = apply_retention(db, now=now, settings=settings)
    would = {(a.table, a.tier): a.rows for a in planned if a.kind == "delete_rows" and a.rows}
    deleted = {(a.table, a.tier): a.rows for a in done if a.kind == "delete_rows" and a.rows}
    assert (
        deleted
        == would
        == {
            ("costs", "gpu_hours"): 1,
            ("costs", "job_cost"): 1,
            ("costs", "budget"): 1,
            ("alert_history", ""): 3,
            ("notification_log", ""): 1,
            ("anomalies", ""): 1,
            ("dead_letters", ""): 1,
            ("audit_log", ""): 1,
            ("silences", ""): 1,
            ("gpu_energy", ""): 1,
        }
    )
    tags = _tags(db)
    assert tags["costs"] == {"gpu_hours-kept", "job_cost-kept", "budget-kept"}
    assert tags["alert_history"] == {"resolved-recently/resolved", "still-firing/firing"}
    assert tags["notification_log"] == {"resolved-recently", "still-firing"}
    for table in ("anomalies", "dead_letters", "audit_log"):
        assert tags[table] == {f"{table}-kept"}, table
    assert tags["silences"] == {"silence-kept", "silence-active"}
    assert tags["api_tokens"] == {"old-token"}
    assert db.execute("SELECT gpu_uuid FROM gpu_energy").fetchall() == [("GPU-kept",)]
    # The configured periods are what the SQL side reads too.
    assert (
        db.execute(
            "SELECT keep FROM retention_policies WHERE relation = 'rollups' AND tier = 'month'"
        ).fetchone()[0]
        == settings.month
    )


# -- (3) `db retention` says what it did ------------------------------------------------------------------


def _db_retention(dsn: str, schema: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMA_RETENTION_")}
    env["AIMA_DATABASE_URL"] = dsn
    done = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "db", "retention", "--schema", schema, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_db_retention_reports_what_it_dropped_and_deleted(
    database_url: str, db_schema: str, db: psycopg.Connection
) -> None:
    if _mode(db) == "postgres":
        # As if the database had been running for days: daily partitions from five days ago on.
        db.execute("SELECT aima_ensure_partitions(%s)", (NOW - timedelta(days=3),))
    # TimescaleDB's rollup job (it runs once at migration) must not take a row before the count.
    _pause_timescaledb_jobs(db)
    old = NOW - timedelta(days=800)
    for i in range(3):
        _audit(db, f"audit-{i}", old)
    _anomaly(db, "anomaly", old)
    _rollup(db, "day", "day-old", NOW - timedelta(days=40))
    _rollup(db, "day", "day-new", NOW - timedelta(days=1))
    dry = _db_retention(database_url, db_schema, "--dry-run")
    partitions = set(re.findall(r"^drop_partition\s+\S+\s+(\S+)", dry, re.M))
    expected = f"{len(partitions)} partition(s) or chunk(s), {{}} 5 row(s)"
    assert dry.splitlines()[-1] == "would drop " + expected.format("would delete")
    if _mode(db) == "postgres":
        # The days before yesterday have expired.
        assert partitions and all(
            db.execute("SELECT to_regclass(%s)", (p,)).fetchone()[0] for p in partitions
        )
    out = _db_retention(database_url, db_schema)
    assert out.splitlines()[-1] == "dropped " + expected.format("deleted")
    assert set(re.findall(r"^drop_partition\s+\S+\s+(\S+)", out, re.M)) == partitions
    assert not any(db.execute("SELECT to_regclass(%s)", (p,)).fetchone()[0] for p in partitions)
    assert db.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 0
    assert {s for (s,) in db.execute("SELECT series FROM rollups")} == {"day-new"}
    # Nothing left to do: nothing is counted (TimescaleDB policy lines, tables with nothing expired).
    assert _db_retention(database_url, db_schema).splitlines()[-1] == "nothing has expired"
