"""PostgreSQL: connect, run the migrations, report the mode."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from consumers.migrate import discover, migrate

pytestmark = pytest.mark.integration


def test_migrations_apply_once_and_report_mode(database_url: str, unique: str) -> None:
    schema = f"m_{unique}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            first = migrate(conn, schema=schema)
            second = migrate(conn, schema=schema)
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
                )
            }
            recorded = conn.execute(
                sql.SQL("SELECT version, mode FROM {}.schema_migrations ORDER BY version").format(
                    sql.Identifier(schema)
                )
            ).fetchall()
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    versions = [m.version for m in discover()]
    assert first.mode in ("timescaledb", "postgres")
    assert len(first.applied) == len(versions) and first.already == []
    assert second.applied == [] and len(second.already) == len(versions)
    assert recorded == [(v, first.mode) for v in versions]
    assert {"schema_migrations", "dead_letters"} <= tables


def test_mode_matches_the_extension(database_url: str) -> None:
    from consumers.migrate import detect_mode

    with psycopg.connect(database_url, autocommit=True) as conn:
        mode = detect_mode(conn)
        installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    assert mode == ("timescaledb" if installed else "postgres")


def test_a_migration_fixed_after_it_landed_is_told_apart_from_one_changed(
    database_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema that applied an earlier text listed in SUPERSEDED hears why that is fine (info); one that
    applied any other text is warned."""
    from consumers.migrate import SUPERSEDED

    schema = f"m_{unique}"
    version, earlier = next((v, next(iter(texts))) for v, texts in SUPERSEDED.items())
    recorded = sql.SQL("UPDATE {}.schema_migrations SET checksum = %s WHERE version = %s").format(
        sql.Identifier(schema)
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            migrate(conn, schema=schema)
            conn.execute(recorded, (earlier, version))
            with caplog.at_level("INFO", logger="consumers.migrate"):
                caplog.clear()
                again = migrate(conn, schema=schema)
                told = [
                    (r.levelname, r.getMessage())
                    for r in caplog.records
                    if f"{version:04d}" in r.getMessage()
                ]
                conn.execute(recorded, ("0" * 64, version))
                caplog.clear()
                migrate(conn, schema=schema)
                warned = [
                    (r.levelname, r.getMessage())
                    for r in caplog.records
                    if f"{version:04d}" in r.getMessage()
                ]
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    assert again.applied == []
    assert [level for level, _ in told] == ["INFO"] and "earlier text" in told[0][1]
    assert [level for level, _ in warned] == ["WARNING"] and "changed after it was applied" in warned[0][1]
