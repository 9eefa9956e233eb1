"""`aima-metrics archive list` and `archive restore`: what the long-term archive (D5, consumers/archive/)
holds, and its rows back into their table or a scratch schema for analysis. Bad parameters, and an archive
that is not configured, exit with status 2."""

from __future__ import annotations

from datetime import UTC, date, datetime

import click

from consumers.settings import ARCHIVABLE

TABLES = sorted({name.split(":")[0] for name in ARCHIVABLE})
TIERS = sorted({name.split(":")[1] for name in ARCHIVABLE if ":" in name})


def _moment(text: str, param: str) -> datetime:
    """A UTC day (2026-12-01), an ISO time with a zone, or now-<n><unit>."""
    from aima_metrics.export import ExportError, parse_time

    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        try:
            return parse_time(text)
        except ExportError as exc:
            raise click.BadParameter(f"{exc}; or a day such as 2026-12-01", param_hint=param) from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _tier(table: str, tier: str | None) -> None:
    if tier and table != "rollups":
        raise click.BadParameter(f"only rollups have tiers, not {table}", param_hint="--tier")


def _store():  # type: ignore[no-untyped-def]
    from consumers.archive.store import open_store
    from consumers.settings import ArchiveSettings

    settings = ArchiveSettings()
    if not settings.enabled:
        raise click.UsageError("the archive is not configured: set AIMA_ARCHIVE_BUCKET (README, Archive)")
    return open_store(settings)


def _fail(exc: Exception) -> None:
    raise click.ClickException(f"archive: {exc}") from None


@click.group()
def archive() -> None:
    """The long-term archive (D5): Parquet files per table and UTC day in the S3 bucket AIMA_ARCHIVE_BUCKET,
    written by retention before it drops raw rows and rollups."""


@archive.command("bucket")
def archive_bucket() -> None:
    """Create the bucket AIMA_ARCHIVE_BUCKET when it does not exist (the compose stack runs this once)."""
    from consumers.archive.store import ArchiveError

    store = _store()
    try:
        created = store.ensure_bucket()
    except ArchiveError as exc:
        _fail(exc)
    click.echo(f"{'created' if created else 'exists'}: s3://{store.bucket}")


@archive.command("list")
@click.option("--table", type=click.Choice(TABLES), default=None, help="one table (default: all)")
@click.option("--tier", type=click.Choice(TIERS), default=None, help="one rollup tier (with --table rollups)")
@click.option("--from", "start", default=None, help="first day (2026-12-01 or an ISO time with zone)")
@click.option("--to", "end", default=None, help="last day, included")
def archive_list(table: str | None, tier: str | None, start: str | None, end: str | None) -> None:
    """Each archived day: table, tier, day, rows, first and last time, parts, size."""
    from consumers.archive.archiver import list_manifests
    from consumers.archive.store import ArchiveError

    if tier:
        _tier(table or "", tier)
    first = _moment(start, "--from").date() if start else None
    last = _moment(end, "--to").date() if end else None
    if first and last and last < first:
        raise click.BadParameter("must not lie before --from", param_hint="--to")
    store = _store()
    days = rows = size = 0
    click.echo(f"{'table':<24} {'tier':<6} {'day':<10} {'rows':>10}  {'first':<25} {'last':<25} parts bytes")
    try:
        for m in list_manifests(store, table, tier, first, last):
            low = m.min_time.isoformat() if m.min_time else "-"
            high = m.max_time.isoformat() if m.max_time else "-"
            click.echo(
                f"{m.table:<24} {m.tier or '-':<6} {m.day.isoformat():<10} {m.rows:>10}  "
                f"{low:<25} {high:<25} {len(m.parts):>5} {m.bytes}"
            )
            days, rows, size = days + 1, rows + m.rows, size + m.bytes
    except ArchiveError as exc:
        _fail(exc)
    click.echo(f"{days} day(s), {rows} row(s), {size} byte(s) in s3://{store.bucket}/{store.prefix}")


@archive.command("restore")
@click.option("--table", type=click.Choice(TABLES), required=True, help="the table whose rows come back")
@click.option("--tier", type=click.Choice(TIERS), default=None, help="rollups: one tier (default: all)")
@click.option("--from", "start", required=True, help="start, included (2026-12-01 or an ISO time with zone)")
@click.option("--to", "end", required=True, help="end, excluded (a day means its start)")
@click.option(
    "--into-schema",
    default=None,
    help="restore into <schema>.<table>, created like the original (default: into the table itself)",
)
@click.option("--schema", default=None, help="schema of the original table (default: the search_path)")
def archive_restore(
    table: str, tier: str | None, start: str, end: str, into_schema: str | None, schema: str | None
) -> None:
    """Insert archived rows with a time in [--from, --to) into their table, or into a scratch schema;
    rows the target holds already are kept as they are. Rows restored into the original table expire
    again at the next retention run (and are not archived twice)."""
    import psycopg
    from psycopg import sql

    from bus.settings import Settings
    from consumers.archive.archiver import restore
    from consumers.archive.store import ArchiveError

    _tier(table, tier)
    first, last = _moment(start, "--from"), _moment(end, "--to")
    if last <= first:
        raise click.BadParameter("must lie after --from", param_hint="--to")
    if into_schema is not None and (not into_schema.strip() or into_schema == schema):
        raise click.BadParameter("must name another schema than the table's", param_hint="--into-schema")
    store = _store()
    with psycopg.connect(Settings().database_dsn(), autocommit=True) as conn:
        if schema:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        try:
            result = restore(
                conn, store, table=table, tier=tier, start=first, end=last, into_schema=into_schema
            )
        except ArchiveError as exc:
            _fail(exc)
            return
    click.echo(
        f"restored {result.inserted} row(s) into {result.target} from {result.days} archived day(s) "
        f"({result.read} row(s) in range, {result.read - result.inserted} there already)"
    )
