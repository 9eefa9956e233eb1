"""`aima-metrics db grant-reader` and `db revoke-reader`: the read-only logins Grafana's datasources use
(consumers/readers.py; the group roles come from migration 0012)."""

from __future__ import annotations

import click
import psycopg
from psycopg import sql

from bus.settings import Settings


def _connect(schema: str | None) -> psycopg.Connection:
    conn = psycopg.connect(Settings().database_dsn(), autocommit=True)
    if schema is not None:
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
    return conn


@click.command("grant-reader")
@click.argument("login")
@click.option("--project", "projects", multiple=True, help="a project it may see (repeat); none: the fleet")
@click.option("--schema", default=None, help="schema to work in (default: the database's search_path)")
def grant_reader(login: str, projects: tuple[str, ...], schema: str | None) -> None:
    """Create or update LOGIN as a read-only dashboard login: the whole fleet, or with --project only
    those projects' rows (the list replaces the previous one). Password: AIMA_DB_READER_PASSWORD, else
    asked."""
    from consumers.readers import ReaderError
    from consumers.readers import grant_reader as grant
    from consumers.settings import ReaderSettings

    secret = ReaderSettings().password
    password = secret.get_secret_value() if secret else click.prompt(
        f"password for {login}", hide_input=True, confirmation_prompt=True
    )  # fmt: skip
    with _connect(schema) as conn:
        try:
            reader = grant(conn, login, password, projects)
        except ReaderError as exc:
            raise click.ClickException(str(exc)) from None
    seen = ", ".join(reader.projects) if reader.projects else "every project"
    click.echo(f"{reader.login}: member of {reader.group}, sees {seen}; search_path {reader.search_path}")


@click.command("revoke-reader")
@click.argument("login")
@click.option("--schema", default=None, help="schema to work in (default: the database's search_path)")
def revoke_reader(login: str, schema: str | None) -> None:
    """Drop the dashboard login LOGIN and its project list."""
    from consumers.readers import ReaderError
    from consumers.readers import revoke_reader as revoke

    with _connect(schema) as conn:
        try:
            found = revoke(conn, login)
        except ReaderError as exc:
            raise click.ClickException(str(exc)) from None
    if not found:
        raise click.ClickException(f"no role {login}")
    click.echo(f"{login} dropped")
