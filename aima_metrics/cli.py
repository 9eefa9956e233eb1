"""`aima-metrics`: the command line of the pipeline and its local stack."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from types import FrameType

import click

from aima_metrics.stack import Stack, StackError, processes
from bus.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The AIMA metrics pipeline: GPU, job, system and cost metrics over Kafka into PostgreSQL."""


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _print_status(stack: Stack) -> bool:
    rows = stack.status()
    width = max(len(name) for name, _, _ in rows)
    for name, up, where in rows:
        click.echo(f"  {name:<{width}}  {'up  ' if up else 'down'}  {where}")
    return all(up for name, up, _ in rows if name != "supervisor")


@main.command()
def up() -> None:
    """Start the local stack (Kafka, PostgreSQL, topics, migrations, pipeline processes) and keep it
    running in the foreground; Ctrl-C or SIGTERM stops all of it."""
    settings = Settings()
    stack = Stack(settings, say=click.echo)
    if (pid := stack.pid_of("up")) is not None:
        click.echo(f"the stack is already up (supervisor pid {pid}); nothing to do")
        _print_status(stack)
        return
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = stack.run_dir / "up.pid"
    pidfile.write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    exit_code = 0
    running = processes(settings)
    try:
        mode = stack.start_services()
        for process in running:
            click.echo(f"starting {process.name}: aima-metrics {' '.join(process.args)}")
            stack.start_process(process)
        click.echo("")
        click.echo("The AIMA metrics stack is up:")
        click.echo(
            f"  Kafka       {settings.kafka_bootstrap}   log {settings.state_dir}/kafka/logs/server.log"
        )
        click.echo(
            f"  PostgreSQL  127.0.0.1:{settings.pg_port} ({mode})   DSN in {settings.state_dir}/postgres/dsn"
        )
        click.echo(f"              log {stack.postgres_log()}")
        for process in running:
            click.echo(
                f"  {process.name:<16} {process.address or '-'}   metrics :{process.metrics_port}"
                f"   log {stack.log_dir}/{process.name}.log"
            )
        click.echo("ready. Ctrl-C (or `aima-metrics down`) stops everything.")
        while True:
            for process in running:
                if stack.pid_of(process.name) is None:
                    click.echo(f"{process.name} exited; see {stack.log_dir}/{process.name}.log; restarting")
                    stack.start_process(process)
            time.sleep(2)
    except _Stop as stop:
        click.echo(f"\n{stop.args[0]} received: stopping")
    except StackError as exc:
        click.echo(f"error: {exc}", err=True)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in reversed(running):
            click.echo(f"stopping {process.name} ...")
            stack.stop_process(process.name)
        try:
            stack.stop_services()
        except StackError as exc:
            click.echo(f"error: {exc}", err=True)
            exit_code = 1
        pidfile.unlink(missing_ok=True)
        click.echo("stopped.")
    raise SystemExit(exit_code)


@main.command()
def down() -> None:
    """Stop the local stack, whether `up` still runs in a terminal or not."""
    stack = Stack(Settings(), say=click.echo)
    pid = stack.pid_of("up")
    if pid is not None:
        click.echo(f"asking the supervisor (pid {pid}) to stop everything ...")
        stack.stop_process("up", timeout_s=120)
    for process in reversed(processes(stack.settings, gpu=False)):
        stack.stop_process(process.name)
    stack.stop_services()
    click.echo("down.")


@main.command()
def status() -> None:
    """Each service up or down, with its address. Exits 1 when any service is down."""
    stack = Stack(Settings())
    if not _print_status(stack):
        raise SystemExit(1)


def _retention(ms: int | None) -> str:
    if ms is None:
        return "?"
    if ms < 0:
        return "forever"
    delta = timedelta(milliseconds=ms)
    return f"{delta.days} d" if delta.days and not delta.seconds else str(delta)


@main.command()
@click.option("--create", is_flag=True, help="create the missing topics first (idempotent)")
def topics(create: bool) -> None:
    """Each topic with its partitions, retention, message key and the Avro schema it carries."""
    from bus.kafka import describe_topics, ensure_topics

    settings = Settings()
    if create:
        for name in ensure_topics(settings):
            click.echo(f"created {name}")
    click.echo(f"{'topic':<22} {'partitions':>10}  {'retention':<9}  {'key':<26} schema")
    for state in describe_topics(settings):
        assert state.spec is not None
        partitions = str(state.partitions) if state.exists else "missing"
        click.echo(
            f"{state.name:<22} {partitions:>10}  {_retention(state.retention_ms):<9}  "
            f"{state.spec.message_key:<26} {state.spec.schema}"
        )


@main.group()
def db() -> None:
    """Database administration."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations and report the mode (TimescaleDB or plain PostgreSQL)."""
    import psycopg

    from consumers.migrate import migrate

    with psycopg.connect(Settings().database_dsn()) as conn:
        report = migrate(conn)
    click.echo(f"mode: {report.mode}")
    for label in report.applied:
        click.echo(f"applied {label}")
    click.echo(f"{len(report.applied)} applied, {len(report.already)} already applied")


@main.command("metrics")
def metrics_catalogue() -> None:
    """The metric catalogue: every metric's name, unit, source, interval, labels and Avro field."""
    from bus.catalogue import METRICS

    click.echo(f"{'metric':<44} {'unit':<8} {'source':<16} {'interval':<12} {'record.field':<48} labels")
    for m in METRICS:
        where = "".join(f"[{k}={v}]" for k, v in m.where)
        field = f"{m.record.rsplit('.', 1)[-1]}.{m.field}{where}"
        click.echo(
            f"{m.name:<44} {m.unit:<8} {m.source:<16} {m.interval:<12} {field:<48} {','.join(m.labels)}"
        )


@main.command()
@click.argument("what", type=click.Choice(["gpu", "system", "jobs-sim", "all"]))
@click.option("--once", is_flag=True, help="collect one sample set, publish it and print it as JSON")
@click.option("--simulate", is_flag=True, help="with `all`: also run the fleet simulator")
def collect(what: str, once: bool, simulate: bool) -> None:
    """Run collectors: GPU (NVML, exporter on :9400), system (psutil, Kubernetes), the job simulator."""
    from aima_metrics.collect import run

    names = ["gpu", "system"] + (["jobs-sim"] if simulate else []) if what == "all" else [what]
    raise SystemExit(run(names, once, click.echo))


def _register_pipeline_commands() -> None:
    from aima_metrics import pipeline_commands as commands

    for command in (
        commands.stream,
        commands.sink,
        commands.notify,
        commands.silence,
        commands.export,
        commands.api,
        commands.token,
        commands.webhook_receiver,
    ):
        main.add_command(command)
    db.add_command(commands.db_retention)


_register_pipeline_commands()
