"""The stream app's hourly rollups beside two peers doing the same job, on the same topic in the same run.

The job: per series (one GPU, by its message key ``host/gpu_uuid``, and one of the catalogue's GPU gauges,
bus/catalogue.py) and per hour of event time, count, min, max, mean and p95. bench/streams.py's ``fill``
publishes the simulator's GpuSamples alone (``--gpu-only``) under a fresh topic prefix; then, one after
the other, over exactly those records:

- plain: one confluent-kafka consumer that reads and decodes every record with the project's codec, one by
  one (``Codec.decode``) and in batches (``bus.frames``), as bench/streams.py does;
- app: one ``streams.main.run`` worker with the rollups processor alone (streams/rollups/processor.py),
  timed from its first batch to its last on its events counter;
- quix: Quix Streams (bench/peers_quix.py), in its own virtual environment, .aima/bench-venvs/quix, made
  here on first use from the ``bench-peers`` group of pyproject.toml (Quix pins its own confluent-kafka);
- faust: faust-streaming (bench/peers_faust.py) with an agent and a tumbling table, its own app id.

Each peer is timed from its first record to its last by itself and writes every (series, hour) it made;
the bench checks them against an offline computation over the same records read back from the topic:
the same (series, hour) set, count, min and max exactly, mean to 1e-9 relative, p95 within the sketch's
relative accuracy of the exact p95 at DDSketch's rank, ``0.95 * (n - 1)``. A wrong peer fails the run
(exit 1) after the report is written, marked as wrong. Writes ``bench/results/peers-<date>.md``.

    infra/kafka/kafka.sh status                   # the broker must be up
    .venv/bin/python bench/peers.py                               # 200,000 GPU samples
    .venv/bin/python bench/peers.py --gpu-samples 20000 --out /tmp/peers.md   # a quick check
    .venv/bin/python bench/peers.py --peers faust                 # without Quix (no venv made)

CPU seconds come from ``getrusage``: the plain consumer's and each peer's over its measured span; each
subprocess's over its whole life (start-up, joining the group and, for the app, its rebalances included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402
from bench.peer_rollup import HOUR_MS, P95, Job  # noqa: E402
from bench.streams import app, drop_topics, fill, plain  # noqa: E402
from bus import schemas  # noqa: E402
from bus.catalogue import METRICS  # noqa: E402
from bus.codec import SINGLE_OBJECT_MAGIC, Codec  # noqa: E402
from bus.kafka import admin, client_config, ensure_topics  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.sketch import DEFAULT_RELATIVE_ACCURACY  # noqa: E402
from bus.topics import BY_KEY, topic_name  # noqa: E402

GPU_RECORD = "aima.metrics.GpuSample"
QUIX_VENV = REPO / ".aima" / "bench-venvs" / "quix"
# One worker with the rollups processor alone, configured as streams.main configures it.
ROLLUPS_ONLY = (
    "import sys; from bus.settings import Settings; from streams.main import run; "
    "from streams.rollups.processor import RollupProcessor; from streams.settings import WorkerSettings; "
    "w = WorkerSettings.load(); "
    "sys.exit(run(Settings(), processors=[RollupProcessor(lateness=w.app.lateness, "
    "emit_interval=w.app.emit_interval)], config=w))"
)


def gauge_fields() -> list[str]:
    """The GpuSample fields of the catalogue's GPU gauges (top-level scalars, not per process)."""
    return [
        metric.field
        for metric in METRICS
        if metric.record == GPU_RECORD and metric.type == "gauge" and not metric.per_process
        if "[]" not in metric.field and not metric.where
    ]


@dataclass
class Exact:
    count: int = 0
    total: float = 0
    low: float = math.inf
    high: float = -math.inf
    values: list[float] = field(default_factory=list)

    def p95(self) -> float:
        """The value at DDSketch's rank ``q * (n - 1)``, rounded down, which the sketch's answer is within
        its relative accuracy of."""
        return sorted(self.values)[math.floor(P95 * (self.count - 1))]


def offline(
    settings: Settings, topic: str, total: int, fields: list[str]
) -> dict[tuple[str, str, int], Exact]:
    """Every (key, field, hour) over the ``total`` records of ``topic``, read back and decoded with the
    codec. Also checks what a series per message key assumes: one key, one GPU entity."""
    codec = Codec()
    consumer = Consumer(
        client_config(
            settings,
            **{"group.id": f"offline-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"},
            **{"enable.auto.commit": False},
        )
    )
    consumer.subscribe([topic])
    found: dict[tuple[str, str, int], Exact] = {}
    entities: dict[str, tuple[Any, ...]] = {}
    seen = 0
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        for message in consumer.consume(1000, 1.0):
            if message.error() is not None:
                raise RuntimeError(f"offline read: {message.error()}")
            key = message.key().decode()
            name, record = codec.decode(message.value())
            if name != GPU_RECORD:
                raise RuntimeError(f"offline read: a {name} on {topic}")
            entity = tuple(
                record[label] for label in ("host", "gpu", "gpu_uuid", "gpu_model", "mig_instance")
            )
            if entities.setdefault(key, entity) != entity:
                raise RuntimeError(f"key {key} carries two GPUs, {entities[key]} and {entity}")
            ms = round(record["time"].timestamp() * 1000)
            hour = ms - ms % HOUR_MS
            for column in fields:
                x = record[column]
                if x is None:
                    continue
                exact = found.setdefault((key, column, hour), Exact())
                exact.count += 1
                exact.total += x
                exact.low = min(exact.low, x)
                exact.high = max(exact.high, x)
                exact.values.append(x)
            seen += 1
    consumer.close()
    if seen != total:
        raise RuntimeError(f"offline read {seen} of {total} records")
    return found


def check(
    name: str, rows: list[dict[str, Any]], expected: dict[tuple[str, str, int], Exact], accuracy: float
) -> list[str]:
    """What is wrong with a peer's rows, at most 10 lines; empty when every (series, hour) is right."""
    problems: list[str] = []
    got = {(row["key"], row["field"], row["hour"]): row for row in rows}
    if len(got) != len(rows):
        problems.append(f"{name}: {len(rows) - len(got)} (series, hour) rows twice")
    missing = expected.keys() - got.keys()
    extra = got.keys() - expected.keys()
    if missing:
        problems.append(f"{name}: {len(missing)} (series, hour) missing, e.g. {sorted(missing)[0]}")
    if extra:
        problems.append(f"{name}: {len(extra)} (series, hour) not in the records, e.g. {sorted(extra)[0]}")
    for key in sorted(expected.keys() & got.keys()):
        exact, row = expected[key], got[key]
        want = {"count": exact.count, "min": exact.low, "max": exact.high}
        for stat, value in want.items():
            if row[stat] != value:
                problems.append(f"{name} {key}: {stat} {row[stat]!r}, exact {value!r}")
        mean = exact.total / exact.count
        if not math.isclose(row["mean"], mean, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{name} {key}: mean {row['mean']!r}, exact {mean!r}")
        p95 = exact.p95()
        if abs(row["p95"] - p95) > accuracy * abs(p95) * (1 + 1e-9) + 1e-12:
            problems.append(f"{name} {key}: p95 {row['p95']!r}, exact {p95!r}, beyond {accuracy:.0%}")
        if len(problems) >= 10:
            break
    return problems[:10]


def bench_requirements() -> list[str]:
    """The ``bench-peers`` optional dependencies of pyproject.toml: what the Quix peer's venv holds."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["bench-peers"])


def quix_python() -> Path:
    """The Quix peer's interpreter, its venv made (or remade, when the group changed) from PyPI."""
    requirements = bench_requirements()
    stamp = QUIX_VENV / "bench-peers.json"
    python = QUIX_VENV / "bin" / "python"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == requirements:
        return python
    print(f"making {QUIX_VENV} with {', '.join(requirements)} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(QUIX_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    stamp.write_text(json.dumps(requirements))
    return python


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Reader:
    name: str
    records: float
    seconds: float
    cpu_measured: float | None = None
    """CPU seconds over the measured span."""
    cpu_process: float | None = None
    """CPU seconds of the whole process (a subprocess), start-up included."""
    verdict: str = "-"

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def run_peer(
    label: str, python: Path, script: str, job: Job, job_path: Path, log: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Runs one peer to its end; returns its summary, its rows and its process's CPU seconds."""
    job.write(job_path)
    before = children_cpu()
    with log.open("wb") as out:
        proc = subprocess.run(
            [str(python), str(REPO / "bench" / script), str(job_path)],
            cwd=REPO,
            stdout=out,
            stderr=out,
            timeout=job.timeout_s + 120,
            check=False,
        )
    cpu = children_cpu() - before
    if not Path(job.out).exists():
        raise RuntimeError(
            f"{label} wrote no results (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}"
        )
    lines = [json.loads(line) for line in Path(job.out).read_text().splitlines()]
    summary = lines[-1]["summary"]
    return summary, lines[:-1], cpu


def drop_run_topics(settings: Settings, app_id: str) -> None:
    """The run's prefix and the app's topics (bench/streams.py), and the peers' changelogs, which carry
    the run's id in their names (Quix: ``changelog__<group>--...``; faust: ``<app id>-...``)."""
    drop_topics(settings, app_id)
    client = admin(settings)
    left = [name for name in client.list_topics(timeout=15).topics if app_id in name]
    if left:
        for future in client.delete_topics(left, operation_timeout=30).values():
            future.result()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-samples", type=int, default=200_000)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--gpus-per-host", type=int, default=8)
    parser.add_argument("--step-s", type=float, default=10.0)
    parser.add_argument("--batch-max", type=int, default=10000)
    parser.add_argument("--peers", default="quix,faust", help="comma-separated, of quix and faust")
    parser.add_argument("--peer-timeout-s", type=float, default=900)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"peers-{date.today()}.md")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    if set(peers) - {"quix", "faust"}:
        parser.error(f"unknown peers: {set(peers) - {'quix', 'faust'}}")
    started = datetime.now(UTC)
    load_before = load()
    quix = quix_python() if "quix" in peers else None  # before anything is timed: pip takes minutes

    settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    fields = gauge_fields()
    accuracy = DEFAULT_RELATIVE_ACCURACY
    ensure_topics(settings)
    readers: list[Reader] = []
    problems: list[str] = []
    versions: dict[str, str] = {}
    try:
        counts = fill(settings, args.gpu_samples, args.hosts, args.gpus_per_host, args.step_s, gpu_only=True)
        total = counts["gpu.samples"]
        topic = topic_name(settings, "gpu.samples")
        print(f"published {total} GpuSamples to {topic}")
        expected = offline(settings, topic, total, fields)
        print(f"offline: {len(expected)} (series, hour) over {len(fields)} fields")

        for together, name in (
            (False, "plain consumer, `Codec.decode` one by one"),
            (True, "plain consumer, `bus.frames` batch decode"),
        ):
            before = self_cpu()
            seconds = plain(settings, [topic], total, together=together)
            readers.append(Reader(name, total, seconds, cpu_measured=self_cpu() - before))
            print(f"{name}: {readers[-1].rate:,.0f}/s")

        with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
            before = children_cpu()
            measured = app(
                settings, app_id, total, 1, args.batch_max, Path(tmp), command=("-c", ROLLUPS_ONLY)
            )
            readers.append(
                Reader(
                    "stream app, 1 worker, rollups processor alone",
                    measured["measured_events"],
                    measured["seconds"],
                    cpu_process=children_cpu() - before,
                )
            )
            print(f"app: {readers[-1].rate:,.0f}/s")

            header = (SINGLE_OBJECT_MAGIC + schemas.fingerprint("GpuSample")).hex()
            runs: dict[str, tuple[Callable[[], Path], str]] = {
                "quix": (lambda: quix, "peers_quix.py"),
                "faust": (lambda: Path(sys.executable), "peers_faust.py"),
            }
            for peer in peers:
                python, script = runs[peer]
                job = Job(
                    bootstrap=settings.kafka_bootstrap,
                    topic=topic,
                    group=f"{app_id}-{peer}",
                    schema_json=schemas.schema_json("GpuSample"),
                    header_hex=header,
                    fields=fields,
                    partitions=BY_KEY["gpu.samples"].partitions,
                    records=total,
                    relative_accuracy=accuracy,
                    out=str(Path(tmp) / f"{peer}.jsonl"),
                    state_dir=str(Path(tmp) / f"{peer}-state"),
                    timeout_s=args.peer_timeout_s,
                )
                log = Path(tmp) / f"{peer}.log"
                summary, rows, cpu = run_peer(peer, python(), script, job, Path(tmp) / f"{peer}.json", log)
                versions[summary["peer"]] = summary["version"]
                wrong = check(peer, rows, expected, accuracy)
                if summary["records"] != total:
                    wrong.insert(0, f"{peer}: read {summary['records']} of {total} records")
                reader = Reader(
                    f"{summary['peer']} {summary['version']} ({script})",
                    summary["records"],
                    summary["seconds"],
                    cpu_measured=summary["cpu_seconds"],
                    cpu_process=cpu,
                    verdict="right" if not wrong else "**WRONG**",
                )
                readers.append(reader)
                problems += wrong
                print(f"{peer}: {reader.rate:,.0f}/s, {len(rows)} rows, {reader.verdict}")
                for line in wrong:
                    print(f"  {line}")
    finally:
        drop_run_topics(settings, app_id)

    report = render(args, readers, total, len(expected), fields, started, load_before, accuracy, problems)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"written to {args.out}")
    if problems:
        print("A PEER IS WRONG:\n" + "\n".join(problems), file=sys.stderr)
        sys.exit(1)


def render(
    args: argparse.Namespace,
    readers: list[Reader],
    total: int,
    windows: int,
    fields: list[str],
    started: datetime,
    load_before: str,
    accuracy: float,
    problems: list[str],
) -> str:
    plain_rate = readers[0].rate
    batch_rate = readers[1].rate
    app_rate = readers[2].rate
    app_seconds = readers[2].seconds

    def cpu(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = "\n".join(
        f"| {r.name} | {r.rate:,.0f} | {r.rate / plain_rate:.1%} | {r.rate / batch_rate:.1%} | "
        f"{r.rate / app_rate:.1%} | {cpu(r.cpu_measured)} | {cpu(r.cpu_process)} | {r.verdict} |"
        for r in readers
    )
    command = (
        f".venv/bin/python bench/peers.py --gpu-samples {args.gpu_samples} --hosts {args.hosts} "
        f"--gpus-per-host {args.gpus_per_host} --step-s {args.step_s:g} --batch-max {args.batch_max} "
        f"--peers {args.peers}"
    )
    verdict = (
        "Every peer's rollups match the offline computation."
        if not problems
        else "**A peer is wrong:**\n\n" + "\n".join(f"- {p}" for p in problems)
    )
    return f"""# Hourly rollups: the stream app and its peers, {started:%Y-%m-%d}

Machine: {machine()}; Kafka 4.1 (KRaft, one local broker on the same machine). Started {started:%H:%M} UTC;
load average (1, 5, 15 min) {load_before} at the start and {load()} at the end: the machine is shared with
other people's test runs, so these figures are from a loaded machine.
Command: `{command}`

Input: {total:,} GpuSamples of a simulator fleet of {args.hosts} hosts x {args.gpus_per_host} GPUs, \
{args.step_s:g} s steps, on one topic of 8 partitions; every reader below read exactly these, one after the \
other. The job: per series (message key = one GPU, x {len(fields)} GPU gauges) and hour of event time, \
count, min, max, mean and p95 (a DDSketch of {accuracy:.0%} relative accuracy): {windows:,} \
(series, hour) rollups.

| reader | records/s | / plain | / plain batch | / app | CPU s, measured span | CPU s, whole process | \
rollups |
|---|---:|---:|---:|---:|---:|---:|---|
{rows}

Rates from each reader's first record to its last (the app: from its first batch to its last on its events
counter, read every 0.25 s, over {app_seconds:.1f} s here). "Whole process" includes start-up and joining the
group. The app's rollups processor also rolls up the catalogue's three GPU counters (energy, ECC errors): 14
series per GPU where the peers make 11. The plain consumers check nothing; each peer's
rollups are checked against the offline computation over the same records (count, min, max exact, mean to
1e-9, p95 within {accuracy:.0%} of the exact value at DDSketch's rank): {verdict}

How the peers are written: bench/peers_quix.py (Application, custom Avro deserializer, event-time
timestamp extractor, `tumbling_window(1 h).agg(...)` of one custom Aggregator per field, `.current()`);
bench/peers_faust.py (agent over `stream.items()`, a custom codec and Record, `Table(default=dict)
.tumbling(3600, expires=...).relative_to_field(Sample.time)`). Both share bench/peer_rollup.py for the
decoding and the aggregate, so the difference is the frameworks'.
"""


if __name__ == "__main__":
    main()
