"""What tracing (A6, bus/tracing.py) costs: throughput with tracing at 1 % sampling against tracing off, in
the same run, on the two stages a trace touches per record.

- publish: the collector's Publisher (validate, encode, produce to the real broker) of ``--gpu-samples``
  simulator GpuSamples, timed to the last acknowledgement; off into one prefix, at ``--ratio`` into another
  (so about 1 % of those records carry a ``traceparent`` header), the rounds alternating.
- stream app: ``python -m streams.main`` (every default processor, bench/streams.py's ``app``) over each
  prefix, off over the untraced records and with tracing on over the traced ones, the rounds alternating;
  timed from its first reported batch to its last, as bench/streams.py does.

Spans go to a real OTLP backend: ``--endpoint``, else the project's Jaeger (infra/jaeger/jaeger.sh, on its
default ports; started and stopped here). Target (issue): tracing at 1 % under 3 % slower than off.
Writes ``bench/results/tracing-<date>.md``.

    .venv/bin/python bench/tracing.py                    # 200,000 GPU samples, 2 rounds
    .venv/bin/python bench/tracing.py --gpu-samples 50000 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from bench.machine import machine  # noqa: E402
from bench.streams import START, app, drop_topics  # noqa: E402
from bus.kafka import ensure_topics  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.tracing import OFF, TracingSettings, open_tracing  # noqa: E402
from producers.publisher import Publisher  # noqa: E402
from producers.simulator import Fleet, generate  # noqa: E402

JAEGER = REPO / "infra" / "jaeger" / "jaeger.sh"


def samples(count: int) -> list[tuple[str, dict]]:
    fleet = Fleet(seed=7, hosts=50, gpus_per_host=8, start=START)
    out = []
    for topic_key, key, _, value in generate(fleet, START, START.replace(year=START.year + 1), 10.0):
        if topic_key == "gpu.samples":
            out.append((key, value))
            if len(out) >= count:
                break
    return out


class WorkerCpu(threading.Thread):
    """Samples the CPU time of the stream worker of ``app_id`` (found in /proc by its environment) and its
    event counter (on its metrics port) every 0.2 s: the CPU seconds it spent between its first batch and
    the last, per record, depend much less on the other load of a shared machine than its rate does."""

    def __init__(self, app_id: str, total: int) -> None:
        super().__init__(daemon=True)
        self.app_id, self.total = app_id, total
        self.samples: list[tuple[float, float]] = []  # (events, cpu seconds)
        self.done = threading.Event()

    def _find(self) -> tuple[int, int] | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"AIMA_STREAMS_APP_ID={self.app_id}".encode() in environ:
                port = next(v for v in environ if v.startswith(b"AIMA_METRICS_PORT=")).split(b"=")[1]
                return int(entry.name), int(port)
        return None

    def run(self) -> None:
        found = None
        while found is None and not self.done.is_set():
            found = self._find()
            time.sleep(0.2)
        if found is None:
            return
        pid, port = found
        tick = os.sysconf("SC_CLK_TCK")
        while not self.done.is_set():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / tick
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            events = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("aima_stream_events_total{")
            )
            self.samples.append((events, cpu))
            if events >= self.total:
                return
            time.sleep(0.2)

    def us_per_record(self) -> float:
        """CPU microseconds per record from the first sample with events to the first with all of them."""
        started = next(((e, c) for e, c in self.samples if e > 0), None)
        ended = next(((e, c) for e, c in self.samples if e >= self.total), None)
        if started is None or ended is None or ended[0] <= started[0]:
            return float("nan")
        return (ended[1] - started[1]) / (ended[0] - started[0]) * 1e6


def publish(settings: Settings, records: list[tuple[str, dict]], tracing) -> tuple[float, float]:
    """Seconds to publish every record and have the broker acknowledge it, and the CPU microseconds per
    record this process spent on it (librdkafka's threads included)."""
    publisher = Publisher(
        settings, source="bench", registry=CollectorRegistry(), tracing=tracing, buffer_records=2_000_000
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    for key, value in records:
        if not publisher.publish("gpu.samples", key, "GpuSample", value):
            raise RuntimeError("a record was refused")
    if publisher.flush(120) != 0:
        raise RuntimeError("the broker did not take every record")
    return time.perf_counter() - t0, (time.process_time() - cpu0) / len(records) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-samples", type=int, default=200_000)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--endpoint", help="OTLP/HTTP endpoint (default: start the project's Jaeger)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"tracing-{date.today()}.md")
    args = parser.parse_args()

    started_jaeger = False
    endpoint = args.endpoint
    if endpoint is None:
        subprocess.run([JAEGER, "start"], check=True)
        started_jaeger = True
        endpoint = "http://127.0.0.1:4318"
    env = {
        "AIMA_OTEL_ENDPOINT": endpoint,
        "AIMA_OTEL_SAMPLE_RATIO": str(args.ratio),
        "AIMA_OTEL_SERVICE_NAME": "aima-bench",
    }
    tracing = open_tracing("aima-bench", TracingSettings.from_environ(env))
    records = samples(args.gpu_samples)
    off_settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    on_settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    ensure_topics(off_settings)
    ensure_topics(on_settings)
    publish_rates: dict[str, list[float]] = {"off": [], "on": []}
    publish_cpu: dict[str, list[float]] = {"off": [], "on": []}
    app_rates: dict[str, list[float]] = {"off": [], "on": []}
    app_cpu: dict[str, list[float]] = {"off": [], "on": []}
    app_ids: list[str] = []
    try:
        # Each round publishes the records once more into each prefix, alternating which goes first.
        for round_ in range(args.rounds):
            order = [("off", off_settings, OFF), ("on", on_settings, tracing)]
            for mode, settings, chosen in order if round_ % 2 == 0 else order[::-1]:
                seconds, cpu_us = publish(settings, records, chosen)
                publish_rates[mode].append(len(records) / seconds)
                publish_cpu[mode].append(cpu_us)
                print(f"publish, tracing {mode}: {len(records) / seconds:,.0f}/s, {cpu_us:.1f} us CPU/record")
        tracing.flush(10)
        total = len(records) * args.rounds
        with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
            for round_ in range(args.rounds):
                order = [("off", off_settings), ("on", on_settings)]
                for mode, settings in order if round_ % 2 == 0 else order[::-1]:
                    app_id = f"bench-{uuid.uuid4().hex[:8]}"
                    app_ids.append(app_id)
                    saved = dict(os.environ)
                    if mode == "on":
                        os.environ.update(env, AIMA_OTEL_SERVICE_NAME="aima-bench-streams")
                    log_dir = Path(tmp) / app_id
                    log_dir.mkdir()
                    cpu = WorkerCpu(app_id, total)
                    cpu.start()
                    try:
                        measured = app(settings, app_id, total, 1, 10000, log_dir)
                    finally:
                        os.environ.clear()
                        os.environ.update(saved)
                        cpu.done.set()
                        cpu.join(5)
                    rate = measured["measured_events"] / measured["seconds"]
                    app_rates[mode].append(rate)
                    app_cpu[mode].append(cpu.us_per_record())
                    print(f"stream app, tracing {mode}: {rate:,.0f}/s, {app_cpu[mode][-1]:.1f} us CPU/record")
    finally:
        for settings in (off_settings, on_settings):
            for app_id in app_ids or ["-none-"]:
                try:
                    drop_topics(settings, app_id)
                except Exception as exc:  # a bench cleans up what it can
                    print(f"could not drop topics: {exc}")
        if started_jaeger:
            subprocess.run([JAEGER, "stop"], check=False)

    def line(name: str, rates: dict[str, list[float]], unit: str = "/s") -> str:
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        each = ", ".join(f"{a:,.1f}/{b:,.1f}" for a, b in zip(rates["off"], rates["on"], strict=True))
        return f"| {name} | {off:,.1f}{unit} | {on:,.1f}{unit} | {(on / off - 1) * 100:+.1f} % | {each} |"

    report = f"""# Tracing overhead, {date.today()}

Machine: {machine()}; Kafka 4.1 (KRaft, one local broker on the same machine); spans to Jaeger v1.75.0
(infra/jaeger/jaeger.sh) over OTLP/HTTP.
Command: `.venv/bin/python bench/tracing.py --gpu-samples {args.gpu_samples} --ratio {args.ratio:g} \
--rounds {args.rounds}`

{len(records):,} simulator GpuSamples per round and prefix, {args.rounds} round(s), off and on alternating.

| stage (median of the rounds) | tracing off | tracing at {args.ratio:.0%} | change | each round (off/on) |
|---|---:|---:|---:|---|
{line("collector Publisher: records/s (validate, encode, produce, acked)", publish_rates)}
{line("collector Publisher: CPU per record (this process, librdkafka included)", publish_cpu, " us")}
{line("stream app, 1 worker, every default processor: records/s", app_rates)}
{line("stream app: the worker's CPU per record, first batch to last", app_cpu, " us")}

Records per second are wall-clock rates on a machine shared with other sessions' builds and tests; the
CPU time per record is the figure that load disturbs least (for the rates, higher is better; for CPU,
lower).

Target: under 3 % slower with tracing at 1 %.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
