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
@click.option(
    "--idle-below",
    type=click.FloatRange(0, 100),
    default=None,
    help="idle: hourly mean utilization below this percent (default AIMA_API_RECOMMEND_IDLE_BELOW_PERCENT)",
)
@click.option(
    "--min-idle-hours",
    type=click.IntRange(1, 24 * 31),
    default=None,
    help="consecutive idle hours before a GPU is listed (default AIMA_API_RECOMMEND_IDLE_MIN_HOURS)",
)
@click.option(
    "--min-batch-factor",
    type=click.FloatRange(1, 100, min_open=True),
    default=None,
    help="least batch factor for a job to be listed (default AIMA_API_RECOMMEND_BATCH_MIN_FACTOR)",
)
@click.option(
    "--min-slowdown",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    default=None,
    help="least drop of a job's frames/s, percent, for an hour to be slow "
    "(default AIMA_API_RECOMMEND_SLOWDOWN_MIN_DROP_PERCENT)",
)
@click.option(
    "--job-model", default=None, help="job profile of the cheapest provider: jobs running this model"
)
def recommend(
    projects: tuple[str, ...],
    as_json: bool,
    schema: str | None,
    idle_below: float | None,
    min_idle_hours: int | None,
    min_batch_factor: float | None,
    min_slowdown: float | None,
    job_model: str | None,
) -> None:
    """Idle GPU capacity with its cost per day (per project and GPU by GPU), jobs with memory headroom
    for a larger batch, jobs that got slow with the GPU metrics that moved most, the cheapest provider and
    GPU model per million frames, and period-end spend against budget per project (thresholds: the
    AIMA_API_RECOMMEND_* settings, or the options)."""
    from api import recommend as rec

    config = ApiSettings()
    if min_idle_hours is not None and min_idle_hours > config.recommend_window_hours:
        raise click.BadParameter(
            f"{min_idle_hours} is longer than the window, "
            f"AIMA_API_RECOMMEND_WINDOW_HOURS={config.recommend_window_hours}",
            param_hint="--min-idle-hours",
        )
    thresholds = rec.Thresholds.of(
        config,
        idle_below_percent=idle_below,
        idle_min_hours=min_idle_hours,
        batch_min_factor=min_batch_factor,
        slowdown_min_drop_percent=min_slowdown,
    )
    with psycopg.connect(Settings().database_dsn(), autocommit=True) as conn:
        if schema is not None:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        try:
            body = rec.build(
                conn, config, list(projects) or None, datetime.now(UTC), thresholds, job_model=job_model
            )
        except psycopg.errors.UndefinedTable as exc:
            raise click.ClickException(
                f"{exc.diag.message_primary}: migrate the database or pass --schema"
            ) from None
    click.echo(json.dumps(body, indent=2) if as_json else rec.render(body))
