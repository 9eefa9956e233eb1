"""Dashboard logins (A2, A4, P3): database roles that can only read what the dashboards read.

Migration 0012 makes two NOLOGIN group roles per database (``<database>_reader``: the whole fleet;
``<database>_project_reader``: only the rows of the login's projects, through the views of schema
``<schema>_by_project``) and grants them per schema. :func:`grant_reader` makes a LOGIN role a member of one
of them, sets its search_path and, for a project reader, lists its projects in
``<schema>_by_project.reader_projects``; Grafana's
datasource of an organisation then connects as that login. The password is the caller's (a setting or a
prompt), never stored here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["Reader", "ReaderError", "grant_reader", "revoke_reader"]


class ReaderError(RuntimeError):
    """The login cannot be made a reader as asked; the message says why."""


@dataclass(frozen=True)
class Reader:
    login: str
    group: str
    projects: tuple[str, ...]
    search_path: str


def _schema(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_schema()").fetchone()
    if row is None or row[0] is None:
        raise ReaderError("no schema on the search path: run `aima-metrics db migrate` first")
    return str(row[0])


def _role(conn: psycopg.Connection[Any], kind: str, schema: str) -> str:
    try:
        row = conn.execute("SELECT aima_reader_role(%s)", (kind,)).fetchone()
    except psycopg.errors.UndefinedFunction:
        raise ReaderError(f"schema {schema!r} has no reader roles: run `aima-metrics db migrate`") from None
    assert row is not None  # a function call always returns one row
    return str(row[0])


def _is_reader(conn: psycopg.Connection[Any], login: str, groups: list[str]) -> bool:
    """A direct member of a reader group and nothing more: no superuser, no other group."""
    row = conn.execute(
        """SELECT NOT r.rolsuper AND NOT r.rolcreaterole AND NOT r.rolcreatedb
                  AND coalesce(bool_and(g.rolname = ANY(%s)), false)
             FROM pg_roles r
             LEFT JOIN pg_auth_members m ON m.member = r.oid
             LEFT JOIN pg_roles g ON g.oid = m.roleid
            WHERE r.rolname = %s
            GROUP BY r.rolsuper, r.rolcreaterole, r.rolcreatedb""",
        (groups, login),
    ).fetchone()
    return bool(row and row[0])


def grant_reader(
    conn: psycopg.Connection[Any], login: str, password: str, projects: Iterable[str] = ()
) -> Reader:
    """Create ``login`` (or update its password) as a fleet reader, or, with ``projects``, as a reader of
    those projects only (the list replaces the previous one). Runs in the migrated schema of ``conn``."""
    wanted = tuple(sorted({p.strip() for p in projects if p.strip()}))
    if not login or not password:
        raise ReaderError("a reader needs a login name and a password")
    schema = _schema(conn)
    kind = "project" if wanted else "fleet"
    with conn.transaction():
        group, other = _role(conn, kind, schema), _role(conn, "fleet" if wanted else "project", schema)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone()
        if exists and not _is_reader(conn, login, [group, other]):
            # The owner or any other role keeps its privileges whatever is granted here.
            raise ReaderError(f"role {login!r} exists and is no reader login: pick another name")
        ident = sql.Identifier(login)
        verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
        options = sql.SQL("LOGIN NOCREATEDB NOCREATEROLE PASSWORD {}").format(sql.Literal(password))
        conn.execute(sql.SQL("{} {} {}").format(verb, ident, options))
        # A login is one kind of reader: a fleet member would see every project through the fleet grants.
        member = conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (login, other)).fetchone()
        if member and member[0]:
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(other), ident))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), ident))
        path = [f"{schema}_by_project", schema] if wanted else [schema]
        path += [] if schema == "public" else ["public"]
        database = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path TO {}").format(
                ident, sql.Identifier(database), sql.SQL(", ").join(map(sql.Identifier, path))
            )
        )
        table = sql.Identifier(f"{schema}_by_project", "reader_projects")
        conn.execute(sql.SQL("DELETE FROM {} WHERE login = %s").format(table), (login,))
        insert = sql.SQL("INSERT INTO {} (login, project) VALUES (%s, %s)").format(table)
        for project in wanted:
            conn.execute(insert, (login, project))
    return Reader(login, group, wanted, ", ".join(path))


def revoke_reader(conn: psycopg.Connection[Any], login: str) -> bool:
    """Drop a reader login and its project list; False when there was no such role. A role that is no
    reader (the owner, say) is refused, never dropped."""
    schema = _schema(conn)
    with conn.transaction():
        table = sql.Identifier(f"{schema}_by_project", "reader_projects")
        conn.execute(sql.SQL("DELETE FROM {} WHERE login = %s").format(table), (login,))
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone() is None:
            return False
        groups = [_role(conn, kind, schema) for kind in ("fleet", "project")]
        if not _is_reader(conn, login, groups):
            raise ReaderError(f"{login!r} is no reader login (a member of {' or '.join(groups)})")
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
    return True
