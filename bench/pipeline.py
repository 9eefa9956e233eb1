"""The whole pipeline at once: broker, stream workers (every processor) and the sink with PostgreSQL, all
on this machine, with each consumer group's lag sampled every few seconds.

Two phases, on topics under a fresh prefix and a freshly migrated schema (both removed at the end):

1. capacity: ``--gpu-samples`` GpuSamples of the simulator's full mix (with the system, job, queue and
   pod records the same fleet produces; event times ending now) are on the broker before anything starts;
   then ``--workers`` stream workers and one sink start and drain them. This drives the pipeline above
   what it can take, so what it absorbs is its capacity: per group, records/s over the window in which
   every group is busy, and each process's CPU seconds per million GPU samples (from /proc).
2. live: GpuSamples stamped with the wall clock are produced at ``--live-fraction`` of the absorbed GPU
   rate for ``--live-s`` seconds; every ``--probe-every``-th is a probe whose row the bench looks for in
   the database. Reports the lag of each group at the start and the end (flat or not) and the p50/p99
   delay from a probe's produce to its row being visible.

    infra/kafka/kafka.sh status && infra/postgres/postgres.sh status     # both must be up
    .venv/bin/python -m bench.pipeline                                    # defaults below
    .venv/bin/python -m bench.pipeline --gpu-samples 100000 --live-s 60  # shorter

Writes ``bench/results/pipeline-<date>.md``. The broker and PostgreSQL are the shared local ones: their CPU
includes whatever else used them meanwhile (the report says so); PostgreSQL's is its sink backends and
background processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402
from bench.streams import _free_port, _scrape, drop_topics, fill  # noqa: E402
from bus.codec import Codec  # noqa: E402
from bus.kafka import admin, client_config, ensure_topics  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.topics import TOPICS, topic_name  # noqa: E402
from consumers.migrate import migrate  # noqa: E402
from consumers.sink import DEFAULT_TOPICS as SINK_TOPICS  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 3.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def kafka_pid() -> int | None:
    path = Settings().state_dir / "kafka" / "kafka.pid"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def postgres_pids(conn: psycopg.Connection, since: datetime) -> list[int]:
    """The sink's backends (application_name aima-sink, started since the run began) and the server's
    background processes (WAL writer, checkpointer, background writer, autovacuum)."""
    rows = conn.execute(
        """SELECT pid FROM pg_stat_activity
            WHERE (application_name = 'aima-sink' AND backend_start >= %s)
               OR backend_type IN ('walwriter', 'checkpointer', 'background writer',
                                   'autovacuum launcher', 'autovacuum worker')""",
        (since,),
    ).fetchall()
    return [row[0] for row in rows]


class Lag:
    """Committed offsets of each group against the topics' end offsets, sampled over time, with the
    caller's admin client and a consumer that only reads end offsets."""

    def __init__(self, client: AdminClient, reader: Consumer, groups: dict[str, list[str]]) -> None:
        self.client, self.reader = client, reader
        self.groups = groups
        """group id -> topic names it reads"""
        self.samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
        """(monotonic time, lag per group, committed records per group)"""

    def sample(self) -> None:
        lag, done = {}, {}
        meta = self.client.list_topics(timeout=10).topics
        for group, topics in self.groups.items():
            partitions = [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]
            request = [ConsumerGroupTopicPartitions(group, partitions)]
            committed = self.client.list_consumer_group_offsets(request)[group].result().topic_partitions
            ends = {
                (tp.topic, tp.partition): self.reader.get_watermark_offsets(tp, timeout=10)[1]
                for tp in partitions
            }
            lag[group] = sum(ends[(c.topic, c.partition)] - max(c.offset, 0) for c in committed)
            done[group] = sum(max(c.offset, 0) for c in committed)
        self.samples.append((time.monotonic(), lag, done))


class Processes:
    """The pipeline's processes, started as subprocesses and stopped with SIGTERM."""

    def __init__(self, settings: Settings, database_url: str, workers: int, log_dir: Path) -> None:
        self.app_id = f"pipe-{uuid.uuid4().hex[:8]}"
        self.sink_group = f"pipe-sink-{uuid.uuid4().hex[:6]}"
        self.ports = [_free_port() for _ in range(workers)]
        base = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
            AIMA_TOPIC_PREFIX=settings.topic_prefix,
            AIMA_DATABASE_URL=database_url,
            AIMA_STREAMS_APP_ID=self.app_id,
            AIMA_STREAMS_LOG_LEVEL="warn",
            AIMA_LOG_LEVEL="warning",
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        for index, port in enumerate(self.ports):
            env = dict(base, AIMA_STATE_DIR=str(log_dir / f"state{index}"), AIMA_METRICS_PORT=str(port))
            self._start(f"worker{index}", [sys.executable, "-m", "streams.main"], env, log_dir)
        sink = [sys.executable, "-m", "bench.pipeline", "--sink-group", self.sink_group]
        self._start("sink", sink, dict(base, AIMA_METRICS_PORT="0"), log_dir)

    def _start(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.logs[name] = log_dir / f"{name}.log"
        with self.logs[name].open("wb") as log:
            self.procs[name] = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log)

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.logs[name].read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n" + "\n".join(tail))

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(proc.pid) for name, proc in self.procs.items()}

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = -9
        return codes


def run_sink(group: str) -> None:
    """The sink of the bench (a subprocess, so its CPU is its own): ``consumers.sink.run`` in its own
    consumer group, into the schema the database URL's search_path names."""
    from bus.runtime import Service
    from consumers import sink

    settings = Settings()
    service = Service("sink", settings)
    service.start()
    sink.run(settings, service=service, group_id=group, retention_every_s=None)
    service.stopped()


@dataclass
class Usage:
    """CPU seconds of every process between two moments."""

    before: dict[str, float]
    after: dict[str, float] = field(default_factory=dict)

    def spent(self) -> dict[str, float]:
        return {name: self.after.get(name, 0.0) - self.before.get(name, 0.0) for name in self.before}


def usage_now(procs: Processes, conn: psycopg.Connection, since: datetime) -> dict[str, float]:
    found = procs.cpu()
    broker = kafka_pid()
    found["broker (shared)"] = cpu_seconds(broker) if broker else 0.0
    found["postgresql (sink backends + background)"] = sum(
        cpu_seconds(pid) for pid in postgres_pids(conn, since)
    )
    found["bench process (producer, sampler)"] = cpu_seconds(os.getpid())
    return found


def capacity(
    procs: Processes, lag: Lag, conn: psycopg.Connection, since: datetime, total: int
) -> dict[str, Any]:
    """Until every group has committed all ``total`` records (or 15 minutes pass): the window in which
    every group was busy, its per-group rates and the CPU spent in it."""
    deadline = time.monotonic() + 900
    window_start = usage = None
    while time.monotonic() < deadline:
        procs.check()
        lag.sample()
        _, lags, done = lag.samples[-1]
        if window_start is None and all(done.values()):
            window_start, usage = len(lag.samples) - 1, Usage(usage_now(procs, conn, since))
        if min(lags.values()) == 0:
            break  # the first group is done: after this not every group is busy
        time.sleep(SAMPLE_S)
    if window_start is None or usage is None or len(lag.samples) - 1 <= window_start:
        raise RuntimeError("the groups never worked side by side long enough to measure")
    usage.after = usage_now(procs, conn, since)
    t0, _, done0 = lag.samples[window_start]
    t1, lags1, done1 = lag.samples[-1]
    rates = {group: (done1[group] - done0[group]) / (t1 - t0) for group in done0}
    return {"seconds": t1 - t0, "rates": rates, "usage": usage, "lag_end": lags1}


def drain(procs: Processes, lag: Lag, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        lag.sample()
        if max(lag.samples[-1][1].values()) == 0:
            return
        time.sleep(SAMPLE_S)
    raise RuntimeError(f"the backlog was not drained in {timeout_s:.0f} s: {lag.samples[-1][1]}")


def live(
    settings: Settings,
    procs: Processes,
    lag: Lag,
    database_url: str,
    rate: float,
    seconds: float,
    probe_every: int,
) -> dict[str, Any]:
    """GpuSamples of 400 GPUs stamped with the wall clock at ``rate`` per second; returns the probes'
    delays (seconds from produce to row) and the lag samples taken meanwhile."""
    codec = Codec()
    producer = Producer(client_config(settings, **{"linger.ms": 5}))
    topic = topic_name(settings, "gpu.samples")
    probes: dict[tuple[str, datetime], float] = {}
    seen: dict[tuple[str, datetime], float] = {}
    stop = threading.Event()

    def watch() -> None:
        with psycopg.connect(database_url, autocommit=True) as watcher:
            while not stop.is_set() or len(seen) < len(probes):
                pending = [key for key in list(probes) if key not in seen]
                if pending:
                    rows = watcher.execute(
                        "SELECT gpu_uuid, time FROM gpu_samples WHERE (gpu_uuid, time) IN "
                        "(SELECT * FROM unnest(%s::text[], %s::timestamptz[]))",
                        ([k[0] for k in pending], [k[1] for k in pending]),
                    ).fetchall()
                    now = time.time()
                    for row in rows:
                        seen.setdefault((row[0], row[1]), now)
                if stop.is_set() and time.time() > stop_at[0] + 120:
                    return  # what is still missing after two minutes is reported as missing
                time.sleep(0.2)

    stop_at = [0.0]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first_lag = len(lag.samples)
    start = time.monotonic()
    sent, next_sample = 0, start
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            now = datetime.now(UTC)  # in whole milliseconds, as the schema keeps it
            moment = now.replace(microsecond=now.microsecond // 1000 * 1000)
            value = _gpu_sample(sent, moment)
            producer.produce(topic, key=value["gpu_uuid"].encode(), value=codec.encode(GPU, value))
            if sent % probe_every == 0:
                probes[(value["gpu_uuid"], moment)] = time.time()
            sent += 1
            if sent % 1000 == 0:
                producer.poll(0)
        producer.poll(0.001)
        if time.monotonic() >= next_sample:
            lag.sample()
            next_sample += SAMPLE_S * 2
    producer.flush(60)
    stop_at[0] = time.time()
    stop.set()
    lag.sample()
    watcher.join(180)
    delays = sorted(seen[key] - produced for key, produced in probes.items() if key in seen)
    return {
        "sent": sent,
        "rate": sent / seconds,
        "probes": len(probes),
        "found": len(delays),
        "delays": delays,
        "lag": lag.samples[first_lag:],
    }


GPU = "aima.metrics.GpuSample"


def _gpu_sample(i: int, moment: datetime) -> dict[str, Any]:
    gpu = i % 400
    return {
        "time": moment,
        "host": f"live-host-{gpu // 8:03d}",
        "gpu": gpu % 8,
        "gpu_uuid": f"GPU-live-{gpu:04d}",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "mig_instance": None,
        "parent_gpu_uuid": None,
        "source": "bench",
        "interval_group": "fast",
        "utilization_percent": float(i % 100),
        "memory_used_bytes": 10_000_000_000 + i % 1000,
        "memory_utilization_percent": 12.5,
        "power_watts": 300.0 + i % 50,
        "temperature_celsius": 60.0 + i % 10,
    }


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-samples", type=int, default=300_000)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--gpus-per-host", type=int, default=8)
    parser.add_argument("--step-s", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--live-s", type=float, default=120.0)
    parser.add_argument("--live-fraction", type=float, default=0.5)
    parser.add_argument("--probe-every", type=int, default=200)
    parser.add_argument("--sink-group", help=argparse.SUPPRESS)  # the sink subprocess
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"pipeline-{date.today()}.md"
    )
    args = parser.parse_args(argv)
    if args.sink_group:
        run_sink(args.sink_group)
        return 0

    settings = Settings(topic_prefix=f"pipe{uuid.uuid4().hex[:6]}.")
    schema = f"bench_pipe_{uuid.uuid4().hex[:6]}"
    ensure_topics(settings)
    database_url = settings.database_dsn()
    conn = psycopg.connect(database_url, autocommit=True)
    migrate(conn, schema=schema)
    url = make_conninfo(database_url, options=f"-c search_path={schema},public")
    duration_s = args.gpu_samples / (args.hosts * args.gpus_per_host) * args.step_s
    start = datetime.now(UTC) - timedelta(seconds=duration_s + 60)
    t0 = time.perf_counter()
    counts = fill(settings, args.gpu_samples, args.hosts, args.gpus_per_host, args.step_s, start=start)
    total = sum(counts.values())
    print(f"published {total:,} records {dict(counts)} in {time.perf_counter() - t0:.0f} s")
    app_topics = [topic_name(settings, spec.key) for spec in TOPICS if spec.key in counts]
    sink_topics = [topic_name(settings, key) for key in SINK_TOPICS if key in counts]
    since = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        procs = Processes(settings, url, args.workers, Path(tmp))
        reader = Consumer(client_config(settings, **{"group.id": f"lag-{uuid.uuid4().hex[:6]}"}))
        lag = Lag(admin(settings), reader, {procs.app_id: app_topics, procs.sink_group: sink_topics})
        try:
            measured = capacity(procs, lag, conn, since, total)
            drain(procs, lag)
            gpu_share = counts["gpu.samples"] / total
            gpu_rate = min(measured["rates"].values()) * gpu_share
            live_rate = max(100.0, gpu_rate * args.live_fraction)
            print(f"capacity: {measured['rates']}; live at {live_rate:,.0f} GPU samples/s")
            lived = live(settings, procs, lag, url, live_rate, args.live_s, args.probe_every)
            app_outputs = Counter[str]()
            for port in procs.ports:
                app_outputs.update(_scrape(port))
        finally:
            codes = procs.stop()
            reader.close()
            drop_topics(settings, procs.app_id)
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    report = render(args, counts, measured, lived, codes, app_outputs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():
        report = args.out.read_text() + "\n" + report.replace("# Pipeline", "## Pipeline", 1)
    args.out.write_text(report)
    print(report)
    return 0


def render(
    args: argparse.Namespace,
    counts: Counter[str],
    measured: dict[str, Any],
    lived: dict[str, Any],
    codes: dict[str, int],
    app_outputs: Counter[str],
) -> str:
    total = sum(counts.values())
    gpu_share = counts["gpu.samples"] / total
    spent = measured["usage"].spent()
    gpu_in_window = min(measured["rates"].values()) * gpu_share * measured["seconds"]
    cpu_rows = "\n".join(
        f"| {name} | {seconds:.1f} | {seconds / gpu_in_window * 1e6:,.0f} |"
        for name, seconds in spent.items()
    )
    group_rows = "\n".join(
        f"| {'stream app' if group.startswith('pipe-') and 'sink' not in group else 'sink'} (`{group}`) | "
        f"{rate:,.0f} | {rate * gpu_share:,.0f} |"
        for group, rate in measured["rates"].items()
    )
    lag_series = lived["lag"]
    lag_first, lag_last = lag_series[0][1], lag_series[-1][1]
    lag_max = {group: max(sample[1][group] for sample in lag_series) for group in lag_first}
    delays = lived["delays"]
    records = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    dead = sum(v for k, v in app_outputs.items() if k.startswith("aima_stream_dead_letters"))
    return f"""# Pipeline end to end, {date.today()}

Machine: {machine()}; Kafka 4.1 (one local KRaft broker) and PostgreSQL (plain) on the same machine, shared
with whatever else ran. Command: `.venv/bin/python -m bench.pipeline --gpu-samples {args.gpu_samples} \
--workers {args.workers} --live-s {args.live_s:g} --live-fraction {args.live_fraction:g}`.

**Capacity** (a backlog of {total:,} records: {records}; {args.workers} stream workers with every processor,
one sink with 2 writers): measured over {measured["seconds"]:.0f} s in which both groups were busy.

| group | records/s | GPU samples/s |
|---|---:|---:|
{group_rows}

The pipeline absorbs **{min(measured["rates"].values()) * gpu_share:,.0f} GPU samples/s** end to end (the
slower group; target 30,000, goal 50,000).

CPU in that window ({gpu_in_window:,.0f} GPU samples through the slower group):

| process | CPU s | CPU s per million GPU samples |
|---|---:|---:|
{cpu_rows}

**Live** ({lived["rate"]:,.0f} GPU samples/s stamped with the wall clock for {args.live_s:g} s, on top of
the drained backlog): lag at the start {lag_first}, at the end {lag_last}, highest {lag_max}.
Sample to row in the database ({lived["found"]} of {lived["probes"]} probes found): p50
**{_pct(delays, 0.5):.2f} s**, p99 **{_pct(delays, 0.99):.2f} s**, max {_pct(delays, 1.0):.2f} s.

Dead letters of the stream app: {dead:.0f}. Exit codes after SIGTERM: {codes}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
