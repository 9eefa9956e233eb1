"""Every migration, the TimescaleDB variants included, is valid PostgreSQL grammar (parsed by libpg_query,
PostgreSQL's own parser). The TimescaleDB path cannot run here (no extension on this machine), so this is
what keeps a typo in it from reaching the compose stack unnoticed."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest

from consumers.migrate import MIGRATIONS_DIR, discover

FILES = sorted(MIGRATIONS_DIR.glob("*.sql"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_migration_parses(path: Path) -> None:
    statements = pglast.parse_sql(path.read_text())
    assert statements, f"{path.name} holds no statement"


@pytest.mark.parametrize("mode", ["timescaledb", "postgres"])
def test_each_mode_gets_every_migration_in_order(mode: str) -> None:
    migrations = discover()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    for migration in migrations:
        text = migration.sql_for(mode)
        assert pglast.parse_sql(text), f"{migration.name} in {mode} mode is empty"
        other = "postgres" if mode == "timescaledb" else "timescaledb"
        assert not any(f.name.endswith(f".{other}.sql") and f.read_text() in text for f in migration.files)


def test_timescaledb_variants_make_hypertables_with_policies() -> None:
    text = "\n".join(m.sql_for("timescaledb") for m in discover())
    for call in ("create_hypertable", "add_compression_policy", "add_retention_policy"):
        assert call in text
