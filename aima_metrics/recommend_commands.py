"""`aima-metrics recommend`: the recommendations of `GET /recommendations` (api/recommend.py), read
straight from the database with the fleet's view, as a readable report or JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click
import psycopg
from psycopg import sql

from api.config import ApiSettings
from bus.settings import Settings


@click.command("recommend")
@click.option("--project", "projects", multiple=True, help="only this project (repeat); none: every project")
@click.option("--json", "as_json", is_flag=True, help="print the JSON body of GET /recommendations")
@click.option("--schema", default=None, help="schema to read (default: the database's search_path)")
def recommend(projects: tuple[str, ...], as_json: bool, schema: str | None) -> None:
    """Idle GPU capacity with its cost per day and period-end spend against budget per project
    (thresholds: AIMA_API_RECOMMEND_WINDOW_HOURS, AIMA_API_RECOMMEND_IDLE_MIN_SHARE)."""
    from api import recommend as rec

    with psycopg.connect(Settings().database_dsn(), autocommit=True) as conn:
        if schema is not None:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        try:
            body = rec.build(conn, ApiSettings(), list(projects) or None, datetime.now(UTC))
        except psycopg.errors.UndefinedTable as exc:
            raise click.ClickException(
                f"{exc.diag.message_primary}: migrate the database or pass --schema"
            ) from None
    click.echo(json.dumps(body, indent=2) if as_json else rec.render(body))
