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
