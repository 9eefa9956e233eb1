"""The whole pipeline at once: broker, stream workers (every processor) and the sink with PostgreSQL, all
on this machine, with each consumer group's lag sampled every few seconds (every topic the group commits:
its inputs and, for the stream app, its internal topics).

On topics under a fresh prefix and a freshly migrated schema (both removed at the end):

1. overdrive: live GpuSamples (``--live-gpus`` GPUs, stamped with the wall clock as a fleet sends them) at
   ``--drive-rate``, above what the pipeline can take, for ``--warmup-s`` + ``--drive-s``; what each group
   commits per second meanwhile is what it absorbs. The backlog then drains.
2. sustained: ``--fraction`` of the slower group's absorbed rate (or ``--rate``), ``--warmup-s`` of
   warm-up and ``--sustain-s`` measured (5 minutes by default). The lag is flat when its least-squares
   growth over the measured part is under 3 s of input; if it is not, the run is repeated 15 % slower, up
   to ``--tries`` runs. Reports, for each run, the lag's growth and highest value, each process's CPU
   seconds per million GPU samples (broker, each worker, the sink, PostgreSQL's sink backends and
   background processes, this bench's producer), and the delay from a probe's produce (every
   ``--probe-every``-th sample) to its row in gpu_samples: p50, p99, max.
3. with ``--gpu-samples N`` first: the simulator's full mix (GPU, system, job, queue and pod records of
   one fleet; event times compressed into the hours before now) as a backlog before anything starts,
   drained by the same processes: records/s per group and CPU seconds per million GPU samples.

The bench's producer encodes each GPU's samples once and splices the time in (class Feed), so that it
takes a small share of the two cores it shares with what it measures.

    infra/kafka/kafka.sh status && infra/postgres/postgres.sh status     # both must be up
    .venv/bin/python -m bench.pipeline                                    # overdrive, then 5 minutes
    .venv/bin/python -m bench.pipeline --rate 20000 --sustain-s 60 --tries 1   # one short run
    .venv/bin/python -m bench.pipeline --gpu-samples 300000               # with the full-mix backlog

Writes ``bench/results/pipeline-<date>.md`` (appends to the day's file). The broker and PostgreSQL are the
shared local ones: their CPU includes whatever else used them meanwhile, so run it on a quiet machine.
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
from functools import partial
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
from bench.streams import START, _free_port, _scrape, drop_topics, fill  # noqa: E402
from bench.tracing import Profile  # noqa: E402
from bus.codec import Codec  # noqa: E402
from bus.kafka import admin, client_config, ensure_topics  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.topics import TOPICS, topic_name  # noqa: E402
from consumers.migrate import migrate  # noqa: E402
from consumers.sink import DEFAULT_TOPICS as SINK_TOPICS  # noqa: E402
from producers.simulator import Fleet, generate  # noqa: E402

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
            partitions = {(t, p) for t in topics if t in meta for p in meta[t].partitions}
            # Whatever else the group commits (the app's internal topics: repartitioned jobs, device
            # hours, rollup partials) counts too: a stage behind on those is behind.
            every = self.client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
            partitions |= {(c.topic, c.partition) for c in every[group].result().topic_partitions}
            request = [
                ConsumerGroupTopicPartitions(group, [TopicPartition(*tp) for tp in sorted(partitions)])
            ]
            committed = self.client.list_consumer_group_offsets(request)[group].result().topic_partitions
            ends = {
                (tp.topic, tp.partition): self.reader.get_watermark_offsets(tp, timeout=10)[1]
                for tp in committed
            }
            lag[group] = sum(ends[(c.topic, c.partition)] - max(c.offset, 0) for c in committed)
            done[group] = sum(max(c.offset, 0) for c in committed if c.topic in topics)
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
        self.log_dir = log_dir
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


GPU = "aima.metrics.GpuSample"
STEPS = 12
"""Simulator steps each GPU's samples are taken from (10 s each: fast samples every step, slow ones with
temperature, power, energy and clocks every third, as the collectors send them)."""


def _zigzag(value: int) -> bytes:
    """Avro's encoding of a long: zigzag, then 7-bit groups, low first."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Feed:
    """The simulator's GpuSamples of ``gpus`` GPUs (fast and slow groups, jobs coming and going), re-stamped
    with the wall clock as they are sent, cheaply enough to send tens of thousands a second from this
    process, which shares the two cores with the pipeline it measures (the codec takes about 20 us a
    record here). Each GPU's first ``STEPS`` steps are encoded once, by the codec; a send splices the
    current millisecond into the next one of its GPU's cycle. That works because ``time`` is the first
    field of the body and its zigzag varint is 6 bytes for every millisecond timestamp from 1970-07 to
    2109, so the bytes around it never move; ``__init__`` checks this on every template."""

    def __init__(self, codec: Codec, gpus: int) -> None:
        fleet = Fleet(seed=11, hosts=max(1, gpus // 8), gpus_per_host=8, start=START)
        by_gpu: dict[str, list[tuple[bytes, bytes]]] = {}
        for topic_key, key, record, value in generate(
            fleet, START, START + timedelta(seconds=10 * STEPS), 10.0
        ):
            if topic_key != "gpu.samples":
                continue
            data = codec.encode(record, value)
            stamp = _zigzag(int(value["time"].timestamp() * 1000))
            at = data.find(stamp)
            if not 0 < at <= 16 or data.find(stamp, at + 1) != -1:
                raise RuntimeError(f"the time field is not where the feed splices it ({at})")
            by_gpu.setdefault(key, []).append((data[:at], data[at + len(stamp) :]))
        self.keys = [key.encode() for key in by_gpu]
        self.uuids = [key.rsplit("/", 1)[1] for key in by_gpu]
        self.templates = list(by_gpu.values())
        self.gpus = len(self.keys)
        self._last_ms = [0] * self.gpus

    def sample(self, i: int) -> tuple[int, bytes, bytes, int]:
        """The ``i``-th sample: (GPU index, key, value, its time in epoch ms), the time strictly after
        the same GPU's previous one so that no two share the database's natural key."""
        gpu = i % self.gpus
        now = max(int(time.time() * 1000), self._last_ms[gpu] + 1)
        self._last_ms[gpu] = now
        cycle = self.templates[gpu]
        head, tail = cycle[(i // self.gpus) % len(cycle)]
        return gpu, self.keys[gpu], head + _zigzag(now) + tail, now


class Probes:
    """Every ``every``-th sample sent is a probe; a thread looks for the probes' rows in gpu_samples and
    notes when each appears."""

    def __init__(self, database_url: str, every: int) -> None:
        self.every = every
        self.sent: dict[tuple[str, datetime], float] = {}
        self.seen: dict[tuple[str, datetime], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(database_url,), daemon=True)
        self._thread.start()

    def add(self, uuid_: str, ms: int) -> None:
        self.sent[(uuid_, datetime.fromtimestamp(ms / 1000, UTC))] = time.time()

    def _watch(self, database_url: str) -> None:
        with psycopg.connect(database_url, autocommit=True) as watcher:
            while not self._stop.is_set():
                # Every unseen probe, oldest first (the likeliest to be there), looked up through the
                # natural-key index one by one (a nested loop over the list, partitions pruned by its time
                # range): a hash join of the list against all of gpu_samples would scan the table and take
                # PostgreSQL's CPU from the sink it measures.
                for chunk in due(self.sent, self.seen, time.time()):
                    rows = watcher.execute(
                        "SELECT g.gpu_uuid, g.time FROM unnest(%s::text[], %s::timestamptz[]) AS p(u, t) "
                        "JOIN LATERAL (SELECT gpu_uuid, time FROM gpu_samples WHERE gpu_uuid = p.u "
                        "AND time = p.t AND time BETWEEN %s AND %s) AS g ON true",
                        (
                            [k[0] for k in chunk],
                            [k[1] for k in chunk],
                            min(k[1] for k in chunk),
                            max(k[1] for k in chunk),
                        ),
                    ).fetchall()
                    now = time.time()
                    for row in rows:
                        self.seen.setdefault((row[0], row[1]), now)
                    if self._stop.is_set():
                        return
                self._stop.wait(0.2)

    def delays(self, since: float, until: float, wait_s: float = 120) -> tuple[int, list[float]]:
        """(probes sent between ``since`` and ``until`` (time.time()), the sorted delays of those found),
        waiting up to ``wait_s`` for the missing ones."""
        chosen = [key for key, sent in self.sent.items() if since <= sent < until]
        deadline = time.time() + wait_s
        while time.time() < deadline and any(key not in self.seen for key in chosen):
            time.sleep(0.5)
        return len(chosen), sorted(self.seen[k] - self.sent[k] for k in chosen if k in self.seen)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def due(
    sent: dict[tuple[str, datetime], float],
    seen: dict[tuple[str, datetime], float],
    now: float,
    chunk: int = 500,
) -> list[list[tuple[str, datetime]]]:
    """The probes to look for now, in lookups of at most ``chunk``, oldest first: every one sent in the last
    PROBE_GIVE_UP_S and not yet seen. None is left out while pending: a watcher that looked only at the
    newest would never look again at one whose row came late (a sink's commit burst), and count it missing.
    """
    oldest = now - PROBE_GIVE_UP_S
    pending = [key for key, at in list(sent.items()) if at >= oldest and key not in seen]
    return [pending[i : i + chunk] for i in range(0, len(pending), chunk)]


@dataclass
class Drive:
    """What one phase of sending at a fixed rate gave."""

    rate: float
    seconds: float
    sent: int = 0
    measured_from: int = 0
    """Index of the first lag sample after the warm-up."""
    lag: list[tuple[float, dict[str, int], dict[str, int]]] = field(default_factory=list)
    usage: Usage | None = None
    window: tuple[float, float] = (0.0, 0.0)
    """Wall-clock (time.time()) start and end of the measured part."""
    sent_measured: int = 0
    profiles: dict[str, Path] = field(default_factory=dict)
    """py-spy's stacks of each process over the measured part, when profiled."""


def drive(
    settings: Settings,
    feed: Feed,
    probes: Probes,
    procs: Processes,
    lag: Lag,
    conn: psycopg.Connection,
    since: datetime,
    rate: float,
    seconds: float,
    warmup_s: float,
    py_spy: Path | None = None,
) -> Drive:
    """Send ``feed``'s samples at ``rate`` for ``warmup_s`` plus ``seconds``, sampling every group's lag
    every few seconds and the processes' CPU at the start and end of the measured part."""
    producer = Producer(client_config(settings, **{"linger.ms": 5, "queue.buffering.max.messages": 500_000}))
    topic = topic_name(settings, "gpu.samples")
    result = Drive(rate=rate, seconds=seconds)
    profilers: list[Profile] = []
    first = len(lag.samples)
    start = time.monotonic()
    next_sample, measuring = start, False
    total = warmup_s + seconds
    while (elapsed := time.monotonic() - start) < total:
        if not measuring and elapsed >= warmup_s:
            measuring = True
            lag.sample()
            result.measured_from = len(lag.samples) - 1 - first
            result.usage = Usage(usage_now(procs, conn, since))
            result.window = (time.time(), 0.0)
            sent_at_start = result.sent
            for name, proc in procs.procs.items() if py_spy else ():
                out = procs.log_dir / f"{name}-{len(lag.samples)}.py-spy.txt"
                profilers.append(Profile(py_spy, out))
                profilers[-1].attach(proc.pid)
                result.profiles[name] = out
            next_sample = time.monotonic() + SAMPLE_S
        due = min(int(elapsed * rate), result.sent + 20_000)
        while result.sent < due:
            gpu, key, value, ms = feed.sample(result.sent)
            try:
                producer.produce(topic, key=key, value=value)
            except BufferError:
                producer.poll(0.05)
                continue
            if result.sent % probes.every == 0:
                probes.add(feed.uuids[gpu], ms)
            result.sent += 1
            if result.sent % 2000 == 0:
                producer.poll(0)
        producer.poll(0.001)
        if time.monotonic() >= next_sample:
            procs.check()
            lag.sample()
            next_sample += SAMPLE_S
    lag.sample()
    for profiler in profilers:
        profiler.stop()
    if result.usage is not None:
        result.usage.after = usage_now(procs, conn, since)
        result.window = (result.window[0], time.time())
        result.sent_measured = result.sent - sent_at_start
    producer.flush(60)
    result.lag = lag.samples[first:]
    return result


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) points: units of y per second."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


def absorbed(phase: Drive) -> dict[str, float]:
    """Per group, the input records per second it committed over the measured part of an overdriven
    phase (least squares over the committed offsets, so that commit steps do not matter)."""
    measured = phase.lag[phase.measured_from :]
    groups = measured[0][2]
    return {g: slope([(t, done[g]) for t, _, done in measured]) for g in groups}


def lag_growth(phase: Drive) -> dict[str, float]:
    """Per group, the lag's least-squares growth over the measured part (records)."""
    measured = phase.lag[phase.measured_from :]
    span = measured[-1][0] - measured[0][0]
    return {g: slope([(t, lags[g]) for t, lags, _ in measured]) * span for g in measured[0][1]}


STAGES = (
    ("waiting (event loop idle)", ("EpollSelector.select", "_PollLikeSelector.select")),
    ("database write (writer threads: COPY, upsert, commit)", ("Writer.write (consumers/sink_writer.py",)),
    ("decode (polars Avro reader, columns)", ("FrameDecoder", "Dispatcher._decode")),
    ("CSV chunks for COPY (polars)", ("Chunk.prepare",)),
    ("publishing outputs", ("Dispatcher._publish",)),
    ("accepting records into the batch", ("Sink._accept_many",)),
    ("committing offsets", ("Sink._commit",)),
    ("Kafka client (aiokafka)", ("aiokafka/",)),
    ("consume call (librdkafka; includes waiting for records)", ("Sink._step",)),
)
"""Where a sampled stack's time goes, by the first of these its frames show (after a processor's own
``process``, which names itself)."""


def stages(stacks: Path) -> tuple[int, dict[str, float]]:
    """(samples, share of each stage) of one process's py-spy stacks (raw, collapsed)."""
    counts: Counter[str] = Counter()
    for line in stacks.read_text().splitlines() if stacks.exists() else []:
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        label = next(
            (f.split(" ", 1)[0].removesuffix(".process") for f in frames if "Processor.process " in f),
            None,
        )
        if label is None:
            label = next(
                (name for name, marks in STAGES if any(m in f for f in frames for m in marks)), "other"
            )
        counts[label] += int(number)
    total = sum(counts.values())
    return total, {k: v / total for k, v in counts.most_common()} if total else {}


PROBE_GIVE_UP_S = 150.0
"""A probe whose row has not appeared this long after its produce is missing (and reported as such)."""

FLAT_S = 3.0
"""The lag is flat when its growth over the measured part is under this many seconds of input: a pipeline
that keeps up only on average drifts by more over five minutes, one that cannot grows by a lot more."""


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpu-samples", type=int, default=0, help="the full-mix backlog phase's GPU samples (0: skip it)"
    )
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--gpus-per-host", type=int, default=8)
    parser.add_argument("--step-s", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--live-gpus", type=int, default=3000, help="GPUs of the live feed")
    parser.add_argument("--drive-rate", type=float, default=60_000.0, help="overdrive, samples/s")
    parser.add_argument("--drive-s", type=float, default=90.0)
    parser.add_argument("--rate", type=float, help="skip the overdrive: sustain this many samples/s")
    parser.add_argument("--fraction", type=float, default=0.9, help="of the absorbed rate, sustained")
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--sustain-s", type=float, default=300.0)
    parser.add_argument("--tries", type=int, default=3, help="sustained runs, each 15 %% slower")
    parser.add_argument("--probe-every", type=int, default=200)
    parser.add_argument(
        "--py-spy", type=Path, help="a py-spy binary: where each process's time goes in the sustained runs"
    )
    parser.add_argument("--sink-group", help=argparse.SUPPRESS)  # the sink subprocess
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"pipeline-{date.today()}.md"
    )
    args = parser.parse_args(argv)
    if args.sink_group:
        run_sink(args.sink_group)
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped bench still stops what it started

    settings = Settings(topic_prefix=f"pipe{uuid.uuid4().hex[:6]}.")
    schema = f"bench_pipe_{uuid.uuid4().hex[:6]}"
    ensure_topics(settings)
    database_url = settings.database_dsn()
    conn = psycopg.connect(database_url, autocommit=True)
    migrate(conn, schema=schema)
    url = make_conninfo(database_url, options=f"-c search_path={schema},public")
    counts: Counter[str] = Counter()
    if args.gpu_samples:
        duration_s = args.gpu_samples / (args.hosts * args.gpus_per_host) * args.step_s
        start = datetime.now(UTC) - timedelta(seconds=duration_s + 60)
        t0 = time.perf_counter()
        counts = fill(settings, args.gpu_samples, args.hosts, args.gpus_per_host, args.step_s, start=start)
        print(
            f"published {sum(counts.values()):,} records {dict(counts)} in {time.perf_counter() - t0:.0f} s"
        )
    inputs = set(counts) | {"gpu.samples"}
    app_topics = [topic_name(settings, spec.key) for spec in TOPICS if spec.key in inputs]
    sink_topics = [topic_name(settings, key) for key in SINK_TOPICS if key in inputs]
    feed = Feed(Codec(), args.live_gpus)
    since = datetime.now(UTC)
    measured: dict[str, Any] | None = None
    overdriven: Drive | None = None
    sustained: list[Drive] = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        procs = Processes(settings, url, args.workers, Path(tmp))
        reader = Consumer(client_config(settings, **{"group.id": f"lag-{uuid.uuid4().hex[:6]}"}))
        lag = Lag(admin(settings), reader, {procs.app_id: app_topics, procs.sink_group: sink_topics})
        probes = Probes(url, args.probe_every)
        run = partial(drive, settings, feed, probes, procs, lag, conn, since)
        try:
            if counts:
                measured = capacity(procs, lag, conn, since, sum(counts.values()))
                drain(procs, lag)
                print(f"full-mix capacity: {measured['rates']}")
            # Every process up, in its group and through its first batches before anything is measured.
            run(1000.0, 10.0, 0.0)
            drain(procs, lag, timeout_s=300)
            rate = args.rate
            if rate is None:
                overdriven = run(args.drive_rate, args.drive_s, args.warmup_s)
                rate = min(absorbed(overdriven).values()) * args.fraction
                print(f"overdrive at {args.drive_rate:,.0f}/s absorbed {absorbed(overdriven)}")
                drain(procs, lag)
            for _ in range(args.tries):
                print(f"sustaining {rate:,.0f} GPU samples/s for {args.sustain_s:.0f} s")
                phase = run(rate, args.sustain_s, args.warmup_s, args.py_spy)
                sustained.append(phase)
                growth = lag_growth(phase)
                print(f"lag growth {growth}")
                if max(growth.values()) < FLAT_S * rate:
                    break
                drain(procs, lag)
                rate *= 0.85
            app_outputs = Counter[str]()
            for port in procs.ports:
                app_outputs.update(_scrape(port))
            found = {
                id(phase): probes.delays(*phase.window, wait_s=120 if phase is sustained[-1] else 0)
                for phase in sustained
            }
            spent = {id(phase): {n: stages(p) for n, p in phase.profiles.items()} for phase in sustained}
        finally:
            codes = procs.stop()
            probes.close()
            reader.close()
            drop_topics(settings, procs.app_id)
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    report = render(args, counts, measured, overdriven, sustained, found, spent, codes, app_outputs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():
        report = args.out.read_text() + "\n" + report.replace("# Pipeline", "## Pipeline", 1)
    args.out.write_text(report)
    print(report)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cpu_table(usage: Usage, samples: float) -> str:
    return "\n".join(
        f"| {name} | {seconds:.1f} | {seconds / samples * 1e6:,.0f} |"
        for name, seconds in usage.spent().items()
    )


def render(
    args: argparse.Namespace,
    counts: Counter[str],
    measured: dict[str, Any] | None,
    overdriven: Drive | None,
    sustained: list[Drive],
    found: dict[int, tuple[int, list[float]]],
    spent: dict[int, dict[str, tuple[int, dict[str, float]]]],
    codes: dict[str, int],
    app_outputs: Counter[str],
) -> str:
    dead = sum(v for k, v in app_outputs.items() if k.startswith("aima_stream_dead_letters"))
    parts = [
        f"""# Pipeline end to end, {date.today()}

Machine: {machine()}; Kafka 4.1 (one local KRaft broker) and PostgreSQL (plain) on the same machine.
Command: `.venv/bin/python -m bench.pipeline {" ".join(sys.argv[1:])}`. {args.workers} stream workers with
every processor, one sink (2 writers), the broker, PostgreSQL and this bench's producer share the machine.
"""
    ]
    if overdriven is not None:
        rates = absorbed(overdriven)
        rows = "\n".join(f"| {_group_name(g)} | {r:,.0f} |" for g, r in rates.items())
        sent_rate = overdriven.sent / (overdriven.seconds + args.warmup_s)
        parts.append(
            f"""**Overdrive**: live GpuSamples of {args.live_gpus:,} GPUs at {sent_rate:,.0f}/s for
{args.warmup_s:g} + {overdriven.seconds:g} s; what each group committed in the last {overdriven.seconds:g} s:

| group | GPU samples/s absorbed |
|---|---:|
{rows}
"""
        )
    for number, phase in enumerate(sustained, 1):
        growth = lag_growth(phase)
        measured_lag = phase.lag[phase.measured_from :]
        highest = {g: max(s[1][g] for s in measured_lag) for g in growth}
        flat = max(growth.values()) < FLAT_S * phase.rate
        probes, delays = found[id(phase)]
        cpu = _cpu_table(phase.usage, phase.sent_measured) if phase.usage else ""
        grew = ", ".join(f"{_group_name(g)} {v:+,.0f}" for g, v in growth.items())
        top = ", ".join(f"{_group_name(g)} {v:,}" for g, v in highest.items())
        parts.append(
            f"""**Sustained run {number}**: {phase.rate:,.0f} GPU samples/s ({args.live_gpus:,} GPUs) for
{args.warmup_s:g} s of warm-up and {phase.seconds:g} s measured ({phase.sent_measured:,} samples); lag sampled
every {SAMPLE_S:g} s. Lag growth over the measured part (least squares): {grew} records; highest {top}:
**{"flat" if flat else "NOT flat"}** (flat: growth under {FLAT_S:g} s of input, {FLAT_S * phase.rate:,.0f}
records). Sample to row in the database ({len(delays)} of {probes} probes of the measured part found):
p50 **{_pct(delays, 0.5):.2f} s**, p99 **{_pct(delays, 0.99):.2f} s**, max {_pct(delays, 1.0):.2f} s.

| process | CPU s | CPU s per million GPU samples |
|---|---:|---:|
{cpu}
"""
        )
        for name, (samples, shares) in spent.get(id(phase), {}).items():
            rows = "\n".join(f"| {stage} | {share:.1%} |" for stage, share in shares.items())
            parts.append(
                f"""Where {name}'s time went in run {number} (py-spy `--nonblocking`, 250/s, {samples:,}
samples of its busy threads; a stack counts for the first processor or stage in it):

| stage | share |
|---|---:|
{rows}
"""
            )
    if measured is not None:
        total = sum(counts.values())
        gpu_share = counts["gpu.samples"] / total
        gpu_in_window = min(measured["rates"].values()) * gpu_share * measured["seconds"]
        group_rows = "\n".join(
            f"| {_group_name(group)} | {rate:,.0f} | {rate * gpu_share:,.0f} |"
            for group, rate in measured["rates"].items()
        )
        records = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
        hours = args.gpu_samples / (args.hosts * args.gpus_per_host) * args.step_s / 3600
        fleet = args.hosts * args.gpus_per_host
        parts.append(
            f"""**Full-mix backlog** ({total:,} records: {records}; event times compressed: {hours:.1f} h of a
{fleet}-GPU fleet), measured over {measured["seconds"]:.0f} s in which both groups were busy:

| group | records/s | GPU samples/s |
|---|---:|---:|
{group_rows}

| process | CPU s | CPU s per million GPU samples |
|---|---:|---:|
{_cpu_table(measured["usage"], gpu_in_window)}
"""
        )
    inputs = sum(v for k, v in app_outputs.items() if k.startswith("aima_stream_events_total"))
    outputs = {
        k.split(":", 1)[1]: v for k, v in app_outputs.items() if k.startswith("aima_stream_outputs_total")
    }
    made = ", ".join(f"{topic.split('.', 1)[-1]} {n:,.0f}" for topic, n in sorted(outputs.items()))
    parts.append(
        f"The stream app over the whole run: {inputs:,.0f} records in (internal topics included), out: "
        f"{made or 'none'}."
    )
    parts.append(f"Dead letters of the stream app: {dead:.0f}. Exit codes after SIGTERM: {codes}.\n")
    return "\n".join(parts)


def _group_name(group: str) -> str:
    return f"sink (`{group}`)" if "-sink-" in group else f"stream app (`{group}`)"


if __name__ == "__main__":
    raise SystemExit(main())
