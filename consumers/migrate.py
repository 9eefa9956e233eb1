"""Versioned database migrations: plain SQL files applied in order, each recorded in a table.

A migration ``NNNN_name.sql`` runs in every mode; ``NNNN_name.timescaledb.sql`` or
``NNNN_name.postgres.sql`` beside it runs after it only in that mode, so TimescaleDB and plain PostgreSQL
end with the same tables and views, stored differently.

The mode is TimescaleDB when the server can load the extension (it is installed and in
``shared_preload_libraries``); the extension is created once per database, in ``public``, so every
migrated schema finds it on its ``<schema>, public`` search path. A schema keeps the mode of its first
migration: hypertables and daily partitions cannot be swapped under running data.
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

SUPERSEDED: dict[int, dict[str, str]] = {
    12: {
        "4999e2c27dc95a893b39f4ee1e29021518b5c9f4eb7a92741fc2fd54c726f3d7": "its column grant on gpu_samples "
        "failed on TimescaleDB (compressed hypertables have no such columns) and is a view now; a plain "
        "PostgreSQL schema that applied the grant gives project readers the same columns",
    },
}
"""Earlier texts of landed migrations that were fixed afterwards, by version and checksum, with why a
schema that applied the earlier text needs nothing more. A migration's text is otherwise never changed
once landed: a schema that applied another text is warned about."""


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


class MigrationError(RuntimeError):
    """The database cannot be migrated as it is; the message says why and what to change."""


EXTENSION_SCHEMA = "public"
"""Where the timescaledb extension is created: one schema every migrated schema has on its search path
(``<schema>, public``). Created inside a migrated schema instead, it would be missing from every other
schema and go with a ``DROP SCHEMA ... CASCADE`` of that one."""


def timescaledb_preloaded(conn: psycopg.Connection) -> bool:
    """Whether the server loaded TimescaleDB at start (shared_preload_libraries), without which creating
    or using the extension ends the session with FATAL. shared_preload_libraries itself is readable by
    superusers only; the settings the preloaded loader registers at server start are visible to all."""
    row = conn.execute(
        """SELECT 1 FROM pg_settings
            WHERE name = 'timescaledb.max_background_workers' AND context = 'postmaster'"""
    ).fetchone()
    return row is not None


def detect_mode(conn: psycopg.Connection) -> Mode:
    """TimescaleDB when the extension is installed in this database, or can be: then it is created in
    :data:`EXTENSION_SCHEMA`. Plain PostgreSQL when it is not available, or available but not preloaded
    (a warning names shared_preload_libraries; the connection stays usable, since the attempt that would
    end it is never made). :class:`MigrationError` when it is installed but unusable from this
    connection."""
    installed = conn.execute(
        "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    available = (
        installed
        or conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    )
    if not available:
        return "postgres"
    if not timescaledb_preloaded(conn):
        if installed:
            raise MigrationError(
                "the timescaledb extension is installed in this database but the server did not preload "
                "it: add shared_preload_libraries = 'timescaledb' to postgresql.conf and restart the server"
            )
        log.warning(
            "timescaledb is installed on the server but not in shared_preload_libraries, using plain "
            "PostgreSQL; to use TimescaleDB set shared_preload_libraries = 'timescaledb' and restart "
            "the server before the first migration"
        )
        return "postgres"
    if installed:
        _check_reachable(conn, installed[0])
        return "timescaledb"
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA {}").format(
                    sql.Identifier(EXTENSION_SCHEMA)
                )
            )
    except psycopg.Error as exc:
        if conn.closed or conn.broken:
            raise MigrationError(f"the server ended the session while creating timescaledb: {exc}") from exc
        log.warning("timescaledb is available but cannot be created, using plain PostgreSQL: %s", exc)
        return "postgres"
    _check_reachable(conn, EXTENSION_SCHEMA)
    return "timescaledb"


def _check_reachable(conn: psycopg.Connection, extension_schema: str) -> None:
    path = conn.execute("SELECT current_schemas(false)").fetchone()
    schemas = list(path[0]) if path else []
    if extension_schema not in schemas:
        raise MigrationError(
            f"the timescaledb extension lives in schema {extension_schema!r}, which is not on this "
            f"connection's search path {schemas}, so its functions (create_hypertable, time_bucket, ...) "
            f"cannot be found; put {extension_schema!r} on the search path (an extension is never moved: "
            "one created inside a migrated schema by an older aima-metrics serves that schema only, and "
            f"is re-created in {EXTENSION_SCHEMA!r} after DROP EXTENSION timescaledb CASCADE)"
        )


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
    server_mode = detect_mode(conn)
    applied: list[str] = []
    already: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, mode text NOT NULL,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        mode = _schema_mode(conn, server_mode)
        done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        for migration in discover(directory):
            label = f"{migration.version:04d}_{migration.name}"
            if migration.version in done:
                applied_text = done[migration.version]
                if applied_text != migration.checksum(mode):
                    why = SUPERSEDED.get(migration.version, {}).get(applied_text)
                    if why is None:
                        log.warning("migration %s changed after it was applied; not re-running it", label)
                    else:
                        log.info("migration %s was applied in an earlier text: %s", label, why)
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


def _schema_mode(conn: psycopg.Connection, server_mode: Mode) -> Mode:
    """The mode of the schema's first migration when it has one, else the server's."""
    row = conn.execute("SELECT mode FROM schema_migrations ORDER BY version LIMIT 1").fetchone()
    if row is None or row[0] == server_mode:
        return server_mode
    if row[0] == "timescaledb":
        raise MigrationError(
            "this schema was migrated with TimescaleDB (its raw tables are hypertables), which this server "
            "cannot use now: install the extension and preload it (shared_preload_libraries = 'timescaledb')"
        )
    log.warning(
        "this schema was migrated for plain PostgreSQL and stays so, though TimescaleDB is available now "
        "(its raw tables are daily partitions; a schema of its own, migrated afresh, gets hypertables)"
    )
    return "postgres"
