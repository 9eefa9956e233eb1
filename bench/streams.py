"""Throughput of the stream app against a plain consumer, on the same records in the same run.

The simulator (producers/simulator.py) fills the input topics under a fresh prefix until it has written
``--gpu-samples`` GpuSamples (with the system, job, queue and pod records the same fleet produces alongside).
Then, one after the other, over exactly those records:

- plain: one confluent-kafka consumer that only reads every record and decodes it with the codec;
- app: ``python -m streams.main`` worker subprocesses (``--workers``, same app id) with every processor of
  ``streams.main.default_processors``, measured from the first to the last batch it reports on its
  Prometheus port (``aima_stream_events_total``), so start-up and rebalancing are not counted.

Targets (issue): the app sustains at least 25 % of the plain consumer's rate, and at least 50,000 GPU
samples per second. Writes ``bench/results/streams-<date>.md``.

    infra/kafka/kafka.sh status                  # the broker must be up
    .venv/bin/python bench/streams.py                         # 200,000 GPU samples and the rest
    .venv/bin/python bench/streams.py --gpu-only --append     # the GPU samples alone, same file
    .venv/bin/python bench/streams.py --gpu-samples 50000 --workers 2
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from confluent_kafka import Consumer, Producer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402
from bus.codec import Codec  # noqa: E402
from bus.frames import FrameDecoders  # noqa: E402
from bus.kafka import admin, client_config, ensure_topics  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.topics import TOPICS, topic_name  # noqa: E402
from producers.simulator import Fleet, generate  # noqa: E402
from streams.main import default_processors  # noqa: E402
from streams.settings import WorkerSettings  # noqa: E402

START = datetime(2026, 3, 2, tzinfo=UTC)


def fill(
    settings: Settings,
    gpu_samples: int,
    hosts: int,
    gpus_per_host: int,
    step_s: float,
    gpu_only: bool = False,
    start: datetime = START,
) -> Counter[str]:
    """Publish simulator records from ``start`` until ``gpu_samples`` GpuSamples are written (with the
    fleet's other records unless ``gpu_only``); returns counts by topic. Uncompressed: aiokafka (Faust's
    client) reads zstd and lz4 only with the optional cramjam package."""
    codec = Codec()
    producer = Producer(client_config(settings, **{"linger.ms": 20, "batch.num.messages": 10000}))
    counts: Counter[str] = Counter()
    fleet = Fleet(seed=7, hosts=hosts, gpus_per_host=gpus_per_host, start=start)
    end = start.replace(year=start.year + 1)
    for topic_key, key, record, value in generate(fleet, start, end, step_s):
        if gpu_only and topic_key != "gpu.samples":
            continue
        data = codec.encode(record, value)
        while True:
            try:
                producer.produce(topic_name(settings, topic_key), key=key.encode(), value=data)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        counts[topic_key] += 1
        if counts["gpu.samples"] >= gpu_samples:
            break
    if producer.flush(60) != 0:
        raise RuntimeError("the broker did not take every record")
    return counts


def plain(settings: Settings, topics: list[str], total: int, together: bool = False) -> float:
    """Seconds a plain consumer takes to read and decode ``total`` records, first record to last: one by
    one with ``Codec.decode``, or (``together``) each topic's records of a consume in one native pass of
    ``bus.frames`` into the same dicts, as the stream app now decodes."""
    codec = Codec()
    frames = FrameDecoders(codec)
    records = {topic_name(settings, spec.key): spec.schema for spec in TOPICS}
    consumer = Consumer(
        client_config(
            settings,
            **{"group.id": f"plain-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"},
            **{"enable.auto.commit": False},
        )
    )
    consumer.subscribe(topics)
    seen, first = 0, None
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        messages = [m for m in consumer.consume(1000, 1.0) if m.error() is None]
        if messages and first is None:
            first = time.perf_counter()
        if not together:
            for message in messages:
                codec.decode(message.value())
            seen += len(messages)
            continue
        by_topic: dict[str, list[bytes]] = {}
        for message in messages:
            by_topic.setdefault(message.topic(), []).append(message.value())
        for topic, values in by_topic.items():
            decoder = frames.get(records[topic])
            rest = range(len(values))
            if decoder is not None:
                frame = decoder.decode(values)
                frame.records()
                rest = frame.rest
            for position in rest:
                codec.decode(values[position])
        seen += len(messages)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    if seen < total:
        raise RuntimeError(f"plain consumer read {seen} of {total} records")
    return elapsed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    """Sums of the app's counters on one metrics port, by metric and topic."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(
            r"(aima_stream_(?:events|outputs|dead_letters|late_records|handed_records)_total)"
            r"\{(.*?)\} (\S+)",
            line,
        )
        if match:
            topic = re.search(r'topic="([^"]*)"', match[2])
            form = re.search(r'form="([^"]*)"', match[2])
            name = f"{match[1]}:{topic[1] if topic else ''}" + (f":{form[1]}" if form else "")
            found[name] = found.get(name, 0.0) + float(match[3])
    return found


def app(
    settings: Settings,
    app_id: str,
    total: int,
    workers: int,
    batch_max: int,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] = ("-m", "streams.main"),
) -> dict[str, float]:
    """Run the app's workers until they have processed ``total`` records; returns their counters and the
    measured seconds (first batch seen to last). ``env``: more environment for the workers (e.g. tracing),
    given here rather than in ``os.environ`` so that two runs can go side by side from two threads.
    ``command``: the worker's arguments to Python, e.g. ``("-c", ...)`` calling ``streams.main.run`` with
    fewer processors (bench/peers.py runs the rollups alone)."""
    extra = dict(env or {})
    ports = [_free_port() for _ in range(workers)]
    procs = []
    for index, port in enumerate(ports):
        worker_env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
            AIMA_TOPIC_PREFIX=settings.topic_prefix,
            AIMA_STATE_DIR=str(log_dir / f"state{index}"),
            AIMA_METRICS_PORT=str(port),
            AIMA_STREAMS_APP_ID=app_id,
            AIMA_STREAMS_BATCH_MAX=str(batch_max),
            AIMA_STREAMS_LOG_LEVEL="warn",
        )
        worker_env.update(extra)
        log = (log_dir / f"worker{index}.log").open("wb")
        procs.append(
            subprocess.Popen([sys.executable, *command], env=worker_env, cwd=REPO, stdout=log, stderr=log)
        )
    try:
        first_at = first_count = all_at = all_count = None
        last: dict[str, float] = {}
        deadline = time.monotonic() + 900
        done_at = None
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited with {proc.returncode}; see {log_dir}")
            counters: dict[str, float] = {}
            working = 0
            for port in ports:
                try:
                    scraped = _scrape(port)
                except OSError:
                    continue
                working += any(k.startswith("aima_stream_events_total") and v for k, v in scraped.items())
                for name, value in scraped.items():
                    counters[name] = counters.get(name, 0.0) + value
            events = sum(v for k, v in counters.items() if k.startswith("aima_stream_events_total"))
            now = time.perf_counter()
            if events and first_at is None:
                first_at, first_count = now, events
            if working == len(ports) and all_at is None:
                all_at, all_count = now, events
            last = counters
            if events >= total:
                done_at = now
                break
            time.sleep(0.25)  # each scrape costs the workers CPU: every 0.1 s took 3 % of it
        if done_at is None or first_at is None:
            raise RuntimeError(f"the app processed {events} of {total} records in time; see {log_dir}")
        if done_at <= first_at:
            raise RuntimeError(
                f"the app took all {total} records in one reading of its counters: too few to time; "
                "give it more (--gpu-samples)"
            )
        result = dict(last)
        result["seconds"] = done_at - first_at
        result["measured_events"] = total - (first_count or 0)
        # From the moment every worker holds partitions: without the start-up rebalance (a second worker
        # joining moves partitions and their state), when the last one joined before the end.
        if all_at is not None and done_at > all_at and total - (all_count or 0) >= total / 4:
            result["sustained_seconds"] = done_at - all_at
            result["sustained_events"] = total - (all_count or 0)
        return result
    finally:
        codes = []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=60))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(-9)
        print(f"workers stopped with exit codes {codes}")


def drop_topics(settings: Settings, app_id: str) -> None:
    """Delete the run's topics (its prefix) and the app's internal ones, so runs do not pile up."""
    client = admin(settings)
    names = [
        name
        for name in client.list_topics(timeout=15).topics
        if name.startswith(settings.topic_prefix) or name.startswith(f"{app_id}-")
    ]
    for future in client.delete_topics(names, operation_timeout=30).values():
        future.result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-samples", type=int, default=200_000)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--gpus-per-host", type=int, default=8)
    parser.add_argument("--step-s", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-max", type=int, default=10000)
    parser.add_argument("--gpu-only", action="store_true", help="publish only the fleet's GpuSamples")
    parser.add_argument("--append", action="store_true", help="add the report to --out, not replace it")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"streams-{date.today()}.md")
    args = parser.parse_args()

    settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    ensure_topics(settings)
    t0 = time.perf_counter()
    counts = fill(settings, args.gpu_samples, args.hosts, args.gpus_per_host, args.step_s, args.gpu_only)
    total = sum(counts.values())
    print(f"published {total} records ({dict(counts)}) in {time.perf_counter() - t0:.1f}s")

    topics = [topic_name(settings, key) for key in counts]
    plain_s = plain(settings, topics, total)
    plain_rate = total / plain_s
    print(f"plain consumer: {total} records in {plain_s:.2f}s = {plain_rate:,.0f}/s")
    together_rate = total / plain(settings, topics, total, together=True)
    print(f"plain consumer, batch decode: {together_rate:,.0f}/s")

    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        app_id = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            measured = app(settings, app_id, total, args.workers, args.batch_max, Path(tmp))
        finally:
            drop_topics(settings, app_id)
        start_rate = measured["measured_events"] / measured["seconds"]
        sustained = "sustained_seconds" in measured
        app_rate = measured["sustained_events"] / measured["sustained_seconds"] if sustained else start_rate
        gpu_rate = app_rate * counts["gpu.samples"] / total
    measured_events, seconds = measured["measured_events"], measured["seconds"]
    print(f"stream app: {measured_events:.0f} records in {seconds:.2f}s = {start_rate:,.0f}/s")
    ratio = app_rate / plain_rate
    outputs = {k.split(":", 1)[1]: int(v) for k, v in measured.items() if k.startswith("aima_stream_outputs")}
    dead = sum(v for k, v in measured.items() if k.startswith("aima_stream_dead_letters"))
    late = sum(v for k, v in measured.items() if k.startswith("aima_stream_late_records"))
    handed = {k: v for k, v in measured.items() if k.startswith("aima_stream_handed_records")}
    columnar = sum(v for k, v in handed.items() if k.endswith(":columns"))
    command = (
        f".venv/bin/python bench/streams.py --gpu-samples {args.gpu_samples} --hosts {args.hosts} "
        f"--gpus-per-host {args.gpus_per_host} --step-s {args.step_s:g} --workers {args.workers} "
        f"--batch-max {args.batch_max}" + (" --gpu-only" if args.gpu_only else "")
    )
    records = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    produced = ", ".join(f"{k} {v:,}" for k, v in sorted(outputs.items())) or "none"
    plain_gpu = plain_rate * counts["gpu.samples"] / total
    chosen = default_processors(settings, WorkerSettings.load())
    processors = ", ".join(processor.name for processor in chosen)
    app_row = f"stream app, {args.workers} worker(s), every processor on ({processors})"
    sustained_row = (
        f"| {app_row}, once every worker holds partitions ({measured.get('sustained_events', 0):,.0f} "
        f"records in {measured.get('sustained_seconds', 0):.1f} s) | {app_rate:,.0f} | {gpu_rate:,.0f} |\n"
        if sustained
        else ""
    )
    report = f"""# Stream app throughput, {date.today()}

Machine: {machine()}; Kafka 4.1 (KRaft, one local broker on the same machine).
Command: `{command}`

Input: simulator fleet of {args.hosts} hosts x {args.gpus_per_host} GPUs, {args.step_s:g} s steps, \
{total:,} records: {records}.

| reader | records/s | GPU samples/s |
|---|---:|---:|
| plain consumer (confluent-kafka, read + decode one by one with `Codec.decode`) | {plain_rate:,.0f} | \
{plain_gpu:,.0f} |
| plain consumer (confluent-kafka, read + decode each consume's records together with `bus.frames`) | \
{together_rate:,.0f} | {together_rate * counts["gpu.samples"] / total:,.0f} |
| {app_row}{", from its first batch" if sustained else ""} | {start_rate:,.0f} | \
{start_rate * counts["gpu.samples"] / total:,.0f} |
{sustained_row}
App / plain: **{ratio:.0%}** (target at least 25 %); app / plain with batch decoding: \
{app_rate / together_rate:.0%}. GPU samples per second: **{gpu_rate:,.0f}** (target 50,000). \
{"Taken once every worker held partitions: the start-up rebalance is not counted." if sustained else ""}

The app's outputs in the run: {produced}; dead letters {dead:.0f}, late records {late:.0f}. Records \
handed to the processors as columns: {columnar:,.0f} of {sum(handed.values()):,.0f}.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        section = report.replace("# Stream app throughput", "## Stream app throughput")
        report = args.out.read_text() + "\n" + section
    args.out.write_text(report)
    print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
