"""The pipeline's long-running processes and their administration as `aima-metrics` commands: each one a
thin layer over the package that does the work."""

from __future__ import annotations

from datetime import timedelta

import click
import psycopg

from bus.durations import InvalidDuration, parse_duration
from bus.runtime import Service
from bus.settings import Settings


@click.command()
def stream() -> None:
    """Run a stream-processing worker (rollups, costs, alerts, anomalies); start several for more
    throughput: they share the work as one consumer group."""
    from streams.main import run

    raise SystemExit(run(Settings()))


@click.command()
@click.option("--batch-max", default=5000, show_default=True, help="records per database batch at most")
@click.option("--batch-timeout-s", default=1.0, show_default=True, help="seconds a batch waits to fill")
@click.option(
    "--writers",
    type=int,
    default=None,
    help="database connections writing batches side by side (default AIMA_SINK_WRITERS or 2)",
)
def sink(batch_max: int, batch_timeout_s: float, writers: int | None) -> None:
    """Store samples, rollups, costs, alerts, anomalies and dead letters in PostgreSQL/TimescaleDB."""
    from bus.selective_storage import SelectiveStorageError
    from bus.selective_storage import load as load_selective
    from consumers.settings import ArchiveSettings, RetentionSettings, SinkSettings
    from consumers.sink import run

    if writers is not None and writers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--writers")
    settings = Settings()
    sink_settings = SinkSettings()
    retention = RetentionSettings()  # read now, so a bad period stops the sink at its start
    archive = ArchiveSettings()  # and a bad archive setting (D5)
    try:
        selective = load_selective(sink_settings.selective_storage)
    except SelectiveStorageError as exc:  # a bad deadband file stops the sink before it reads
        raise click.ClickException(str(exc)) from None
    writers = writers if writers is not None else sink_settings.writers
    service = Service("sink", settings)
    service.start()
    run(
        settings,
        service=service,
        batch_max=batch_max,
        batch_timeout_s=batch_timeout_s,
        writers=writers,
        # Retention by itself (K2): the running sink applies it, under `up`, compose and Kubernetes alike.
        retention_every_s=sink_settings.retention_every_s or None,
        retention=retention,
        archive=archive,
        selective=selective,
    )
    service.stopped()


@click.command()
def notify() -> None:
    """Deliver alerts to their channels (webhook, Slack, Teams, email, SMS), routed by AIMA_NOTIFY_CONFIG."""
    from consumers.notify.config import ConfigError, load_configured
    from consumers.notify.notifier import run
    from consumers.settings import NotifySettings

    settings = Settings()
    try:
        config = load_configured(NotifySettings())
    except ConfigError as exc:  # a routing file that cannot be used stops the notifier before it reads
        raise click.ClickException(str(exc)) from None
    service = Service("notify", settings)
    service.start()
    run(settings, service=service, config=config)  # marks the service stopped itself


@click.group()
def silence() -> None:
    """Mute matching alerts for a while (stored in the database; the notifier honours them)."""


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except InvalidDuration as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None


@silence.command("add")
@click.argument("matchers", nargs=-1, required=True)
@click.option("--duration", default="2h", show_default=True, help="how long, e.g. 30m, 2h, 1d, 1w, 1h30m")
@click.option("--comment", default="", help="why")
@click.option("--by", "created_by", required=True, help="who (name or e-mail)")
def silence_add(matchers: tuple[str, ...], duration: str, comment: str, created_by: str) -> None:
    """Add a silence: MATCHERS like alertname=GpuTemperatureHigh host=~gpu-.* severity!=info (or a list in
    Alertmanager's form, '{host="a", gpu=~"0|1"}')."""
    from api.audit_log import Origin, record_event
    from bus.silences import InvalidSilence, create_silence

    with psycopg.connect(Settings().database_dsn()) as conn:
        try:
            with conn.transaction():  # the silence and its audit row commit together
                created = create_silence(
                    conn, matchers, created_by=created_by, comment=comment, duration=_duration(duration)
                )
                record_event(
                    conn,
                    "silence.create",
                    endpoint="aima-metrics silence add",
                    origin=Origin.local(created_by),
                    target=created.id,
                    parameters={"matchers": [str(m) for m in created.matchers], "duration": duration},
                )
        except InvalidSilence as exc:
            raise click.UsageError(str(exc)) from None
    click.echo(f"silence {created.id} active until {created.ends_at.isoformat()}")


@silence.command("list")
@click.option("--state", type=click.Choice(["pending", "active", "expired"]))
def silence_list(state: str | None) -> None:
    """List silences."""
    from bus.silences import list_silences

    with psycopg.connect(Settings().database_dsn()) as conn:
        for item in list_silences(conn, state=state):  # type: ignore[arg-type]
            matchers = " ".join(str(m) for m in item.matchers)
            span = f"{item.starts_at:%Y-%m-%d %H:%M} .. {item.ends_at:%Y-%m-%d %H:%M}"
            click.echo(
                f"{item.id}  {item.state():<8} {span}  {matchers}  by {item.created_by}  {item.comment}"
            )


@silence.command("rm")
@click.argument("silence_id")
@click.option("--by", "by", default=None, help="who (default: your login)")
def silence_rm(silence_id: str, by: str | None) -> None:
    """Expire a silence now (its record stays)."""
    from api.audit_log import Origin, record_event
    from bus.silences import InvalidSilence, delete_silence

    with psycopg.connect(Settings().database_dsn()) as conn:
        try:
            with conn.transaction():  # the expiry and its audit row commit together
                found = delete_silence(conn, silence_id)
                record_event(
                    conn,
                    "silence.expire",
                    endpoint="aima-metrics silence rm",
                    origin=Origin.local(by),
                    target=silence_id,
                    outcome="allowed" if found else "invalid",
                    reason=None if found else "no_active_silence",
                )
        except InvalidSilence as exc:
            raise click.UsageError(str(exc)) from None
    if not found:
        raise click.ClickException(f"no silence {silence_id}")
    click.echo(f"silence {silence_id} expired")


@click.command("retention")
@click.option("--dry-run", is_flag=True, help="only list what would be dropped")
@click.option("--schema", default=None, help="schema to work in (default: the database's search_path)")
def db_retention(dry_run: bool, schema: str | None) -> None:
    """Apply retention once (periods: AIMA_RETENTION_*; raw 24 h, hourly 7 d, daily 30 d, monthly 1 y,
    yearly forever, ...). The running sink does this by itself every AIMA_SINK_RETENTION_EVERY_S."""
    from psycopg import sql

    from consumers.retention import apply_retention, summary
    from consumers.settings import RetentionSettings

    retention = RetentionSettings()
    with psycopg.connect(Settings().database_dsn(), autocommit=True) as conn:
        if schema:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        actions = apply_retention(conn, dry_run=dry_run, settings=retention)
    for action in actions:
        if action.kind == "delete_rows" and not action.rows:
            continue  # a table with nothing expired
        rows = "" if action.rows is None else f" ({action.rows} rows)"
        cutoff = action.cutoff.isoformat() if action.cutoff else "-"
        where = f"{action.kind:<14} {action.table:<18} {action.target:<40}"
        tier = f" {action.tier}" if action.tier else ""
        detail = f" {action.detail}" if action.detail else ""
        click.echo(f"{where}{tier} before {cutoff}{rows}{detail}")
    click.echo(summary(actions, dry_run))


@click.command()
@click.option("--metric", required=True, help="catalogue name, e.g. gpu_utilization_percent")
@click.option(
    "--from", "start", default="now-1h", show_default=True, help="ISO time with zone, or now-<n><unit>"
)
@click.option("--to", "end", default="now", show_default=True)
@click.option("--labels", default=None, help="filter, k=v,k2=v2")
@click.option("--format", "fmt", type=click.Choice(["json", "csv", "remote-write"]), default="json")
@click.option("--endpoint", default=None, help="Prometheus remote-write URL (with --format remote-write)")
@click.option("--output", type=click.File("w"), default="-", help="file to write (default stdout)")
def export(
    metric: str, start: str, end: str, labels: str | None, fmt: str, endpoint: str | None, output: object
) -> None:
    """Export a metric's raw samples as JSON or CSV, or send them to Prometheus by remote write."""
    from aima_metrics.export import ExportError, export_command, parse_time

    try:
        count = export_command(
            Settings(), metric, parse_time(start), parse_time(end), fmt, labels, endpoint, output
        )
    except ExportError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"exported {count} rows", err=True)


@click.command()
@click.option("--host", default=None, help="bind address (default AIMA_API_HOST or 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default AIMA_API_PORT or 8000)")
def api(host: str | None, port: int | None) -> None:
    """Serve the REST API (OpenAPI at /docs) until SIGTERM."""
    from api.main import run

    run(Settings(), host=host, port=port)


@click.group()
def token() -> None:
    """API tokens: bearer tokens with a role and scopes, stored hashed."""


@token.command("create")
@click.option("--role", type=click.Choice(["admin", "user", "finance"]), required=True)
@click.option("--scope", "scopes", multiple=True, help="metrics:read:<name> or metrics:read:* (repeatable)")
@click.option("--project", "projects", multiple=True, help="a user token's projects (repeatable)")
@click.option("--name", default="", help="what the token is for")
@click.option("--by", "by", default=None, help="who creates it, for the audit log (default: your login)")
def token_create(
    role: str, scopes: tuple[str, ...], projects: tuple[str, ...], name: str, by: str | None
) -> None:
    """Create a token and print it once; only its hash is stored. Audited (token.create)."""
    from api.cli import create_token_cmd
    from api.config import ApiSettings

    try:
        pepper = ApiSettings().pepper()
        click.echo(create_token_cmd(Settings(), role, scopes, projects, name, pepper=pepper, by=by))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@token.command("list")
def token_list() -> None:
    """Every token (never its secret)."""
    from api.cli import list_tokens

    for row in list_tokens(Settings()):
        state = "revoked" if row["revoked_at"] else "active"
        scopes = ",".join(row["scopes"]) or "-"
        projects = ",".join(row["projects"]) or "-"
        click.echo(
            f"{row['id']}  {state:<7} {row['role']:<7} scopes={scopes} projects={projects}  {row['name']}"
        )


@token.command("revoke")
@click.argument("token_id")
@click.option("--by", "by", default=None, help="who revokes it, for the audit log (default: your login)")
def token_revoke(token_id: str, by: str | None) -> None:
    """Revoke a token by id. Audited (token.revoke)."""
    from api.cli import revoke_token

    try:
        found = revoke_token(Settings(), token_id, by=by)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not found:
        raise click.ClickException(f"no active token {token_id}")
    click.echo(f"token {token_id} revoked")


@click.command("webhook-receiver")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9099, show_default=True)
@click.option(
    "--out", type=click.Path(), default=None, help="JSON lines file (default <state>/webhook/received.jsonl)"
)
def webhook_receiver(host: str, port: int, out: str | None) -> None:
    """A local receiver for signed alert webhooks (checks the HMAC from AIMA_WEBHOOK_KEY) for development."""
    from pathlib import Path

    from aima_metrics.settings import StackSettings
    from aima_metrics.webhook_receiver import serve

    configured = StackSettings().webhook_key
    if configured is None:
        raise click.UsageError("set AIMA_WEBHOOK_KEY to the key the notifier signs with")
    key = configured.get_secret_value()
    settings = Settings()
    service = Service("webhook-receiver", settings)
    service.start()
    serve(service, host, port, key, Path(out) if out else settings.state_dir / "webhook" / "received.jsonl")
    service.stopped()
