"""Least privilege for the dashboards (A2, A3, A4; issue 14 item 2) on the real database: the read-only
logins of migration 0012 and `aima-metrics db grant-reader` (consumers/readers.py) can write nothing, read
neither the API's tokens nor its audit log, run every dashboard query, and a project login sees only its
projects' rows, enforced by the database whatever the dashboard's variables say."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from consumers.readers import Reader, ReaderError, grant_reader, revoke_reader
from tests.integration.test_dashboards import DASHBOARDS, GRAFANA, fill, run_dashboard, timescaledb_flag

pytestmark = pytest.mark.integration

SECRET_TABLES = [
    "api_tokens", "audit_log", "silences", "notification_log", "dead_letters", "schema_migrations",
    "retention_policies",
]  # fmt: skip
Login = Callable[..., tuple[Reader, psycopg.Connection]]


@pytest.fixture
def login(database_url: str, db: psycopg.Connection, unique: str) -> Iterator[Login]:
    """Makes reader logins (dropped afterwards) and returns each one's own connection, opened with its
    password, so the role-level search_path applies as it does for Grafana."""
    made: list[tuple[str, psycopg.Connection]] = []

    def make(kind: str, projects: tuple[str, ...] = ()) -> tuple[Reader, psycopg.Connection]:
        name, password = f"aima_t_{unique}_{kind}", uuid.uuid4().hex
        reader = grant_reader(db, name, password, projects)
        conn = psycopg.connect(make_conninfo(database_url, user=name, password=password), autocommit=True)
        made.append((name, conn))
        return reader, conn

    yield make
    for name, conn in made:
        conn.close()
        revoke_reader(db, name)


def _relations(db: psycopg.Connection, schema: str) -> dict[str, str]:
    """Every table, partition and view of the schema, with its kind."""
    return dict(
        db.execute(
            """SELECT relname, relkind::text FROM pg_class
                WHERE relnamespace = %s::regnamespace AND relkind IN ('r', 'p', 'v', 'm')""",
            (schema,),
        ).fetchall()
    )


def _denied(conn: psycopg.Connection, statement: sql.Composable, strict: bool = True) -> bool:
    """Whether the statement failed: with a privilege error (``strict``), or with any error."""
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return True
    except psycopg.Error:
        return not strict
    return False


def test_readers_write_nothing_and_read_no_secret(
    db: psycopg.Connection, db_schema: str, login: Login
) -> None:
    fleet_reader, fleet = login("fleet")
    project_reader, project = login("project", ("news",))
    assert fleet_reader.group != project_reader.group
    mine = f"{db_schema}_by_project"
    relations = {**_relations(db, db_schema), **{f"{mine}.{r}": k for r, k in _relations(db, mine).items()}}
    assert len(relations) > 60, sorted(relations)
    denied = 0
    for conn, reader in ((fleet, fleet_reader), (project, project_reader)):
        for name, kind in relations.items():
            schema, rel = name.split(".") if "." in name else (db_schema, name)
            target = sql.Identifier(schema, rel)
            first = db.execute(
                """SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0
                      AND attidentity = '' AND attgenerated = '' AND NOT attisdropped
                    ORDER BY attnum LIMIT 1""",
                (target.as_string(db),),
            ).fetchone()[0]
            column = sql.Identifier(first)
            statements = [
                sql.SQL("INSERT INTO {} DEFAULT VALUES").format(target),
                sql.SQL("UPDATE {} SET {} = {}").format(target, column, column),
                sql.SQL("DELETE FROM {}").format(target),
            ]
            if kind in ("r", "p"):
                statements.append(sql.SQL("TRUNCATE {}").format(target))
            privileged = db.execute(
                "SELECT has_table_privilege(%s, %s, 'INSERT, UPDATE, DELETE, TRUNCATE')",
                (reader.login, target.as_string(db)),
            ).fetchone()[0]
            assert not privileged, f"{reader.login} may write {name}"
            for statement in statements:
                # A view that cannot take writes at all may say so before the privilege check does.
                assert _denied(conn, statement, strict=kind in ("r", "p")), f"{statement.as_string(db)} ran"
                denied += 1
        for schema, table in [(db_schema, t) for t in SECRET_TABLES] + [(mine, "reader_projects")]:
            statement = sql.SQL("SELECT * FROM {} LIMIT 1").format(sql.Identifier(schema, table))
            assert _denied(conn, statement), f"{statement.as_string(db)} was allowed"
            denied += 1
        for schema in (db_schema, mine):
            statement = sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(schema, "reader_made"))
            assert _denied(conn, statement), f"{statement.as_string(db)} was allowed"
            denied += 1
    # The project login reaches project rows only through its filtered views, and no process list.
    for statement in (
        sql.SQL("SELECT 1 FROM {}").format(sql.Identifier(db_schema, "job_events")),
        sql.SQL("SELECT 1 FROM {}").format(sql.Identifier(db_schema, "cost_estimated_eur")),
        sql.SQL("SELECT processes FROM {}").format(sql.Identifier(db_schema, "gpu_samples")),
    ):
        assert _denied(project, statement), f"{statement.as_string(db)} was allowed"
        denied += 1
    print(f"\n{denied} statements denied to the two reader logins")
    # The owner, or any role that is not a reader login, is never turned into one nor dropped.
    owner = db.execute("SELECT current_user").fetchone()[0]
    with pytest.raises(ReaderError, match="no reader login"):
        grant_reader(db, owner, "x")
    with pytest.raises(ReaderError, match="no reader login"):
        revoke_reader(db, owner)


def _dashboard_relations(relations: set[str]) -> set[str]:
    text = "\n".join(p.read_text() for p in DASHBOARDS)
    return {r for r in relations if re.search(rf"\b{r}\b", text)}


def test_the_fleet_reader_may_select_exactly_what_the_dashboards_read(
    db: psycopg.Connection, db_schema: str
) -> None:
    group = db.execute("SELECT aima_reader_role('fleet')").fetchone()[0]
    relations = _relations(db, db_schema)
    granted = {
        r
        for r in relations
        if db.execute(
            "SELECT has_table_privilege(%s, %s, 'SELECT')", (group, f'"{db_schema}"."{r}"')
        ).fetchone()[0]
    }
    assert granted == _dashboard_relations(set(relations))


def test_every_dashboard_runs_as_a_reader_and_a_project_login_sees_its_projects_only(
    database_url: str, db: psycopg.Connection, db_schema: str, login: Login
) -> None:
    fill(database_url, db_schema)
    projects = [r[0] for r in db.execute("SELECT DISTINCT project FROM job_events ORDER BY 1")]
    assert len(projects) >= 2, projects
    chosen = projects[0]
    _, fleet = login("fleet")
    _, project = login("project", (chosen,))
    now = datetime.now(UTC)
    timescaledb = timescaledb_flag(db)

    outcomes = [o for path in DASHBOARDS for o in run_dashboard(fleet, path, now, timescaledb)]
    problems = [f"{o.dashboard} / {o.panel} [{o.ref}]: {o.problem}" for o in outcomes if o.problem]
    assert not problems, "as the fleet reader:\n" + "\n".join(problems)
    print(f"\nfleet reader: {len(outcomes)} dashboard queries, all with rows")

    users = GRAFANA / "dashboards" / "users.json"
    outcomes = run_dashboard(project, users, now, timescaledb)
    errors = [f"{o.panel} [{o.ref}]: {o.problem}" for o in outcomes if o.problem and o.problem != "no rows"]
    assert not errors, f"users dashboard as a login of {chosen}:\n" + "\n".join(errors)
    with_rows = sum(1 for o in outcomes if o.rows)
    assert with_rows > len(outcomes) // 2, [(o.panel, o.rows) for o in outcomes]
    print(f"project login ({chosen}): {len(outcomes)} users-dashboard queries, {with_rows} with rows")

    # The project variable offers only its project, and asking for another one (as a crafted URL or an
    # edited variable would) finds nothing: the database filters, not the template.
    variable = json.loads(users.read_text())["templating"]["list"][0]
    assert variable["name"] == "project"
    query = variable["query"].replace("$__timeFilter(time)", "true")
    assert [r[0] for r in project.execute(query)] == [chosen]
    others = projects[1:]
    for view in ("job_events", "job_timings", "costs", "cost_estimated_eur", "job_cost_eur",
                 "job_frame_processing_seconds", "job_model_load_seconds"):  # fmt: skip
        ident = sql.Identifier(view)
        seen = {r[0] for r in project.execute(sql.SQL("SELECT DISTINCT project FROM {}").format(ident))}
        assert seen == {chosen}, f"{view}: {seen}"
        leaked = project.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE project = ANY(%s)").format(sql.Identifier(view)), (others,)
        ).fetchone()[0]
        assert leaked == 0, view
        owner_rows = db.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE project = %s").format(sql.Identifier(view)), (chosen,)
        ).fetchone()[0]
        rows = project.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
        assert rows == owner_rows, f"{view}: {rows} rows seen, {owner_rows} of {chosen}"
    kernel_jobs = {r[0] for r in project.execute("SELECT DISTINCT job_id FROM cuda_kernel_duration_seconds")}
    own_jobs = {r[0] for r in db.execute("SELECT job_id FROM job_timings WHERE project = %s", (chosen,))}
    assert kernel_jobs and kernel_jobs <= own_jobs
    alert_projects = {r[0] for r in project.execute("SELECT DISTINCT labels->>'project' FROM alert_history")}
    assert alert_projects <= {None, chosen}

    # Changing the login's projects changes what it sees, at once and in the database.
    grant_reader(db, project.info.user, project.info.password, (others[0],))
    assert [r[0] for r in project.execute(query)] == [others[0]]
