"""The local stack's TimescaleDB path (infra/postgres/postgres.sh), on a PostgreSQL of the test's own from
the PostgreSQL that script runs, when that one has the TimescaleDB library (skipped otherwise, as in CI):
the script preloads the library, so the stack reaches TimescaleDB mode; and the same server started
without the preload (issue 13: the server ended the session and `db migrate` failed with "the connection
is lost") migrates a new database in plain PostgreSQL with a warning naming shared_preload_libraries,
refuses with that reason a database where the extension is installed, and a schema keeps its mode once
the preload is back."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bus.settings import REPO_ROOT
from consumers.migrate import MigrationError, migrate, timescaledb_preloaded
from tests.private_stack import INFRA, PrivateStack

pytestmark = pytest.mark.integration


def _script_bindir() -> Path | None:
    """The bin folder postgres.sh runs: `postgres` on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("postgres")
    if found:
        folder = Path(found).resolve().parent
        if all((folder / tool).exists() for tool in ("pg_ctl", "initdb", "psql")):
            return folder
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    return next((c for c in candidates if (c / "postgres").exists()), None)


def _has_timescaledb(bindir: Path) -> bool:
    done = subprocess.run([bindir / "pg_config", "--pkglibdir"], capture_output=True, text=True)
    lib = Path(done.stdout.strip()) if done.returncode == 0 else bindir.parent / "lib"
    return (lib / "timescaledb.so").exists()


class _Server:
    """The test's PostgreSQL, started by postgres.sh (preloaded) or by pg_ctl without the preload."""

    def __init__(self, stack: PrivateStack, bindir: Path) -> None:
        self.stack, self.bindir = stack, bindir
        self.data = (stack.state_dir / "postgres" / "datadir").read_text().strip()
        self.port = stack.pg_port
        # PostgreSQL refuses to run as root; postgres.sh then runs it as the 'postgres' user.
        self.owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def pg_ctl(self, *args: str) -> None:
        log = f"{self.data}/server.log"
        command = [*self.owner, str(self.bindir / "pg_ctl"), "-D", self.data, "-l", log, "-w", "-t", "60"]
        subprocess.run([*command, *args], check=True, capture_output=True, timeout=120)

    def start_without_preload(self) -> None:
        self.stack.stop_postgres()
        self.pg_ctl("-o", "-c shared_preload_libraries=", "start")

    def start_with_script(self) -> None:
        self.pg_ctl("-m", "fast", "stop")
        self.stack.start_postgres()

    def superuser(self, database: str, statement: str) -> None:
        """As postgres.sh does it: the superuser over the local socket."""
        psql = [str(self.bindir / "psql"), "-h", "/tmp", "-p", str(self.port), "-d", database]
        subprocess.run([*self.owner, *psql, "-v", "ON_ERROR_STOP=1", "-c", statement], check=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    bindir = _script_bindir()
    if bindir is None or not _has_timescaledb(bindir):
        pytest.skip(
            f"the PostgreSQL postgres.sh runs ({bindir}) has no TimescaleDB library; put one that has "
            "it first on PATH to run these"
        )
    stack = PrivateStack(tmp_path / "stack", kafka=False)
    try:
        stack.start()
        yield _Server(stack, bindir)
    finally:
        stack.close()


def _status(stack: PrivateStack) -> str:
    done = subprocess.run(
        [INFRA / "postgres" / "postgres.sh", "status"], env=stack.env, capture_output=True, text=True
    )
    return done.stdout.strip()


def test_the_local_stack_preloads_timescaledb_and_migrates_in_its_mode(server: _Server) -> None:
    assert _status(server.stack).endswith(" timescaledb")
    with psycopg.connect(server.stack.database_url, autocommit=True) as conn:
        assert timescaledb_preloaded(conn)
        assert migrate(conn).mode == "timescaledb"
        ext = conn.execute(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = %s", ("timescaledb",)
        )
        assert ext.fetchone() == ("public",)


def test_without_the_preload_migrations_say_so_and_keep_the_connection(
    server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(server.stack.database_url, autocommit=True) as conn:
        assert migrate(conn, schema="made_with_timescaledb").mode == "timescaledb"
        conn.execute("CREATE DATABASE fresh")
    server.start_without_preload()
    fresh = make_conninfo(server.stack.database_url, dbname="fresh")

    # The extension installed (postgres.sh made it): the reason, not "the connection is lost".
    with psycopg.connect(server.stack.database_url, autocommit=True) as conn:
        with pytest.raises(MigrationError, match="shared_preload_libraries"):
            migrate(conn, schema="made_with_timescaledb")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMA_")}
    done = subprocess.run(
        [sys.executable, "-m", "aima_metrics", "db", "migrate"],
        cwd=REPO_ROOT,
        env=dict(env, AIMA_DATABASE_URL=server.stack.database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "shared_preload_libraries" in done.stderr, done.stderr
    assert "connection is lost" not in done.stderr and "Traceback" not in done.stderr

    # Not installed yet: plain PostgreSQL, on the same connection, with a warning saying how to get it.
    with psycopg.connect(fresh, autocommit=True) as conn:
        with caplog.at_level(logging.WARNING, logger="consumers.migrate"):
            report = migrate(conn, schema="plain")
        assert report.mode == "postgres"
        assert any("shared_preload_libraries" in r.getMessage() for r in caplog.records)
        assert conn.execute("SELECT to_regclass('plain.gpu_samples_default')").fetchone() != (None,)

    # The preload back and the extension created: that schema stays plain, a new one gets TimescaleDB.
    server.start_with_script()
    server.superuser("fresh", "CREATE EXTENSION timescaledb WITH SCHEMA public")
    caplog.clear()
    with psycopg.connect(fresh, autocommit=True) as conn:
        with caplog.at_level(logging.WARNING, logger="consumers.migrate"):
            assert migrate(conn, schema="plain").mode == "postgres"
        assert any("stays so" in r.getMessage() for r in caplog.records)
        assert migrate(conn, schema="hyper").mode == "timescaledb"
        recorded = conn.execute(
            sql.SQL("SELECT DISTINCT mode FROM {}.schema_migrations").format(sql.Identifier("plain"))
        ).fetchall()
        assert recorded == [("postgres",)]
