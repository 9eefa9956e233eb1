"""`aima-metrics`: the command line of the pipeline and its local stack.

Only the standard library and click are imported before :func:`main` runs, so that a long-running command
answers SIGTERM within a tenth of a second of its start (aima_metrics/lifecycle.py)."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING

import click

from aima_metrics.lifecycle import follow_supervisor, guard_loading

if TYPE_CHECKING:
    from aima_metrics.stack import Stack


def main() -> None:
    """The `aima-metrics` entry point."""
    guard_loading(sys.argv[1:])
    # After guard_loading: a stop while pydantic loads for the settings below already ends the process.
    from aima_metrics.settings import LifecycleSettings

    follow_supervisor(LifecycleSettings().supervisor_pid)
    _register_pipeline_commands()
    cli()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The AIMA metrics pipeline: GPU, job, system and cost metrics over Kafka into PostgreSQL."""


def _print_status(stack: Stack) -> bool:
    rows = stack.status()
    width = max(len(name) for name, _, _ in rows)
    for name, up, where in rows:
        click.echo(f"  {name:<{width}}  {'up  ' if up else 'down'}  {where}")
    return all(up for name, up, _ in rows if name != "supervisor")


@cli.command()
def up() -> None:
    """Start the local stack (Kafka, PostgreSQL, topics, migrations, pipeline processes) and keep it
    running in the foreground. Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops all of it: the
    pipeline processes (SIGTERM, SIGKILL after AIMA_STOP_TIMEOUT_S), then PostgreSQL and Kafka; a second
    signal kills the pipeline processes without waiting. A closed terminal or pipe does not stop it."""
    from aima_metrics.lifecycle import STOP_SIGNALS
    from aima_metrics.stack import Interrupted, Output, Stack, StopRequest, processes
    from bus.settings import Settings

    settings = Settings()
    stop = StopRequest()
    say = Output(settings.state_dir / "logs" / "up.log")
    stack = Stack(settings, say=say, stop=stop)
    if (pid := stack.pid_of("up")) is not None:
        say(f"the stack is already up (supervisor pid {pid}); nothing to do")
        _print_status(stack)
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.request(signal.Signals(signum).name)  # no output here: the main thread may be writing

    # Writes to a gone pipe fail with EPIPE, which Output swallows, rather than end the process.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = stack.run_dir / "up.pid"
    pidfile.write_text(str(os.getpid()))
    exit_code = 0
    running = processes(settings, stack.local)
    if all(process.name != "prometheus" for process in running):
        say("no prometheus on PATH: no local Prometheus this time (./dev setup installs it)")
    try:
        mode = stack.start_services()
        for process in running:
            stack.check_stop()
            say(f"starting {process.name}: aima-metrics {' '.join(process.args)}")
            stack.start_process(process)
        say("")
        say("The AIMA metrics stack is up:")
        say(f"  Kafka       {settings.kafka_bootstrap}   log {settings.state_dir}/kafka/logs/server.log")
        say(f"  PostgreSQL  127.0.0.1:{settings.pg_port} ({mode})   DSN in {settings.state_dir}/postgres/dsn")
        say(f"              log {stack.postgres_log()}")
        for process in running:
            say(
                f"  {process.name:<16} {process.address or '-'}   metrics :{process.metrics_port}"
                f"   log {stack.log_dir}/{process.name}.log"
            )
        say("ready. Ctrl-C (or `aima-metrics down`) stops everything.")
        while not stop.requested:
            for process in running:
                if not stop.requested and stack.pid_of(process.name) is None:
                    say(f"{process.name} exited; see {stack.log_dir}/{process.name}.log; restarting")
                    stack.start_process(process)
            for _ in range(20):
                if stop.requested:
                    break
                time.sleep(0.1)
    except Interrupted:
        pass
    except Exception as exc:  # reported, then everything started so far is stopped all the same
        say(f"error: {exc}", err=True)
        exit_code = 1
    finally:
        if stop.requested:
            say(f"\n{stop.why} received: stopping")
        names = [process.name for process in reversed(running)]
        say(f"stopping {', '.join(names)} ...")
        stack.stop_processes(names)
        try:
            stack.stop_services()
        except Exception as exc:
            say(f"error: {exc}", err=True)
            exit_code = 1
        pidfile.unlink(missing_ok=True)
        say("stopped.")
        say.close()
    raise SystemExit(exit_code)


@cli.command()
def down() -> None:
    """Stop the local stack, whether `up` still runs in a terminal or not."""
    from aima_metrics.stack import Output, Stack, processes
    from bus.settings import Settings

    stack = Stack(Settings(), say=Output())
    pid = stack.pid_of("up")
    if pid is not None:
        stack.say(f"asking the supervisor (pid {pid}) to stop everything ...")
        stack.stop_processes(["up"], timeout_s=180)
    stack.stop_processes([p.name for p in reversed(processes(stack.settings, stack.local, gpu=False))])
    stack.stop_services()
    stack.say("down.")


@cli.command()
def status() -> None:
    """Each service up or down, with its address. Exits 1 when any service is down."""
    from aima_metrics.stack import Stack
    from bus.settings import Settings

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


@cli.command()
@click.option("--create", is_flag=True, help="create the missing topics first (idempotent)")
def topics(create: bool) -> None:
    """Each topic with its partitions, retention, message key and the Avro schema it carries."""
    from bus.kafka import describe_topics, ensure_topics
    from bus.settings import Settings

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


@cli.group()
def db() -> None:
    """Database administration."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations and report the mode (TimescaleDB or plain PostgreSQL)."""
    import psycopg

    from bus.settings import Settings
    from consumers.migrate import MigrationError, migrate

    try:
        with psycopg.connect(Settings().database_dsn()) as conn:
            report = migrate(conn)
    except MigrationError as exc:  # a database to fix first: the reason, not a traceback
        raise click.ClickException(str(exc)) from exc
    click.echo(f"mode: {report.mode}")
    for label in report.applied:
        click.echo(f"applied {label}")
    click.echo(f"{len(report.applied)} applied, {len(report.already)} already applied")


@cli.command("metrics")
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


@cli.command()
@click.argument("what", type=click.Choice(["gpu", "system", "jobs-sim", "dcgm", "all"]))
@click.option("--once", is_flag=True, help="collect one sample set, publish it and print it as JSON")
@click.option("--simulate", is_flag=True, help="with `all`: also run the fleet simulator")
@click.option("--url", help="with `dcgm`: the dcgm-exporter endpoint, e.g. http://node:9400/metrics")
def collect(what: str, once: bool, simulate: bool, url: str | None) -> None:
    """Run collectors: GPU (NVML, exporter on :9400), system (psutil, Kubernetes), the job simulator, or
    GPU samples read from a dcgm-exporter endpoint (`dcgm --url ...`)."""
    from aima_metrics.collect import run

    if url is not None and what != "dcgm":
        raise click.UsageError("--url is for `collect dcgm`")
    names = ["gpu", "system"] + (["jobs-sim"] if simulate else []) if what == "all" else [what]
    raise SystemExit(run(names, once, click.echo, dcgm_url=url))


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
        cli.add_command(command)
    db.add_command(commands.db_retention)
    from aima_metrics import reader_commands

    db.add_command(reader_commands.grant_reader)
    db.add_command(reader_commands.revoke_reader)
    from aima_metrics.recommend_commands import recommend

    cli.add_command(recommend)
    from aima_metrics.archive_commands import archive

    cli.add_command(archive)
    from aima_metrics.prometheus_local import prometheus

    cli.add_command(prometheus)
