"""Versioned database migrations: plain SQL files applied in order, each recorded in a table.

A migration ``NNNN_name.sql`` runs in every mode; ``NNNN_name.timescaledb.sql`` or
``NNNN_name.postgres.sql`` beside it runs after it only in that mode, so TimescaleDB and plain PostgreSQL
end with the same tables and views, stored differently.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
Mode = Literal["timescaledb", "postgres"]
_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<mode>timescaledb|postgres))?\.sql$")
# Serialises concurrent migrators (several services start at once) on one database.
_LOCK_ID = 0x41494D41


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    files: tuple[Path, ...]

    def sql_for(self, mode: Mode) -> str:
        parts = [f.read_text() for f in self.files if _FILE.match(f.name)["mode"] in (None, mode)]
        return "\n".join(parts)

    def checksum(self, mode: Mode) -> str:
        return hashlib.sha256(self.sql_for(mode).encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    grouped: dict[int, tuple[str, list[Path]]] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name!r} is not named NNNN_name[.mode].sql")
        version = int(match["version"])
        name, files = grouped.setdefault(version, (match["name"], []))
        if match["name"] != name:
            raise ValueError(f"migration {version:04d} has two names: {name!r} and {match['name']!r}")
        files.append(path)
    # The mode-independent file first, then its mode variant.
    return [
        Migration(v, n, tuple(sorted(fs, key=lambda p: p.name.count("."))))
        for v, (n, fs) in sorted(grouped.items())
    ]


def detect_mode(conn: psycopg.Connection) -> Mode:
    """TimescaleDB when the extension is (or can be) installed in this database, plain PostgreSQL else."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        return "timescaledb"
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if not available:
        return "postgres"
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return "timescaledb"
    except psycopg.Error as exc:
        log.warning("timescaledb is available but cannot be created, using plain PostgreSQL: %s", exc)
        return "postgres"


@dataclass(frozen=True)
class MigrationReport:
    mode: Mode
    applied: list[str]
    already: list[str]


def migrate(
    conn: psycopg.Connection, schema: str | None = None, directory: Path = MIGRATIONS_DIR
) -> MigrationReport:
    """Apply every pending migration, each in its own transaction; returns what was applied."""
    conn.autocommit = True
    if schema is not None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
    mode = detect_mode(conn)
    applied: list[str] = []
    already: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, mode text NOT NULL,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        for migration in discover(directory):
            label = f"{migration.version:04d}_{migration.name}"
            if migration.version in done:
                if done[migration.version] != migration.checksum(mode):
                    log.warning("migration %s changed after it was applied; not re-running it", label)
                already.append(label)
                continue
            log.info("applying migration %s (%s)", label, mode)
            with conn.transaction():
                conn.execute(migration.sql_for(mode))
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, mode, checksum) VALUES (%s, %s, %s, %s)",
                    (migration.version, migration.name, mode, migration.checksum(mode)),
                )
            applied.append(label)
    return MigrationReport(mode=mode, applied=applied, already=already)
