"""What tracing (A6, bus/tracing.py) costs: throughput with tracing at 1 % sampling against tracing off, in
the same run, on the two stages a trace touches per record.

- publish: the collector's Publisher (validate, encode, produce to the real broker) of ``--gpu-samples``
  simulator GpuSamples, timed to the last acknowledgement; off into one prefix, at ``--ratio`` into another
  (so about 1 % of those records carry a ``traceparent`` header), the two side by side in two processes.
- stream app: ``python -m streams.main`` (every default processor, bench/streams.py's ``app``) over each
  prefix, off over the untraced records and with tracing on over the traced ones, the two workers side by
  side in each round (so both meet the same load of the machine); timed from its first reported batch to
  its last, as bench/streams.py does.

Spans go to a real OTLP backend: ``--endpoint``, else the project's Jaeger (infra/jaeger/jaeger.sh, on its
default ports; started and stopped here). Target (issue): tracing at 1 % under 3 % slower than off.
Writes ``bench/results/tracing-<date>.md``.

    .venv/bin/python bench/tracing.py                    # 200,000 GPU samples, 2 rounds
    .venv/bin/python bench/tracing.py --gpu-samples 50000 --rounds 1
    .venv/bin/python bench/tracing.py --py-spy /path/to/py-spy     # also: where the worker's time goes

With ``--py-spy`` (a py-spy binary: ``pip install py-spy``, not a project dependency) each stream worker
is sampled without being paused, and the report gives the share of its samples in tracing code
(OpenTelemetry and bus/tracing.py, in any thread): the cost tracing adds to the worker, measured inside
one run and so much less disturbed by the machine's other load than a difference of two runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
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

    def __init__(self, app_id: str, total: int, profile: Profile | None = None) -> None:
        super().__init__(daemon=True)
        self.app_id, self.total, self.profile = app_id, total, profile
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
            if events > 0 and self.profile is not None and not self.profile.attached:
                self.profile.attach(pid)  # from the first batch on, as the CPU per record
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


TRACING_FRAMES = ("opentelemetry", "bus/tracing.py", "_traced_records", "_batch_span")
"""A sampled stack with one of these in a frame is tracing's: the SDK and exporter (their own thread
included), the project's wrapper, and the stream app's two tracing helpers."""


class Profile:
    """py-spy sampling one worker (``--nonblocking``: the worker is never paused), as collapsed stacks."""

    def __init__(self, py_spy: Path, out: Path) -> None:
        self.py_spy, self.out = py_spy, out
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def attached(self) -> bool:
        return self._proc is not None

    def attach(self, pid: int) -> None:
        self._proc = subprocess.Popen(
            [
                str(self.py_spy),
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def shares(self) -> tuple[float, int, dict[str, float]]:
        """(share of samples in tracing code, samples in all, share of each tracing frame's own samples:
        the innermost tracing frame of a stack)."""
        total = traced = 0
        own: dict[str, int] = {}
        if not self.out.exists():
            return float("nan"), 0, {}
        for line in self.out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            frames = stack.split(";")
            hits = [f for f in frames if any(marker in f for marker in TRACING_FRAMES)]
            if hits:
                traced += count
                top = _frame_name(hits[-1])
                own[top] = own.get(top, 0) + count
        if not total:
            return float("nan"), 0, {}
        top = dict(sorted(((k, v / total) for k, v in own.items()), key=lambda kv: -kv[1])[:8])
        return traced / total, total, top


def _frame_name(frame: str) -> str:
    """``func (.../package/module.py:12)`` -> ``func (package/module.py)``."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{function} ({'/'.join(Path(path).parts[-2:])})"


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


_FORK = multiprocessing.get_context("fork")


class PublishRun:
    """One Publisher in a forked process publishing ``records`` once ``go`` is set, tracing at the ratio
    of ``env`` when given (opened in the child: an exporter's thread does not survive a fork)."""

    def __init__(
        self, settings: Settings, records: list[tuple[str, dict]], env: dict[str, str] | None
    ) -> None:
        self.go = _FORK.Event()
        self.ready = _FORK.Event()
        self._results = _FORK.Queue()
        self._process = _FORK.Process(target=self._main, args=(settings, records, env), daemon=True)

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self) -> None:
        self._process.start()

    def _main(self, settings: Settings, records: list[tuple[str, dict]], env: dict[str, str] | None) -> None:
        tracing = open_tracing("aima-bench", TracingSettings.from_environ(env)) if env else OFF
        # Ready once tracing is open: the parent attaches its profiler after this, so the profile, like the
        # CPU per record, covers the publish and not the one-time import of the SDK.
        self.ready.set()
        self.go.wait()
        try:
            self._results.put(publish(settings, records, tracing))
        except Exception as exc:  # handed to the parent, which raises it
            self._results.put(exc)
        tracing.flush(10)

    def result(self) -> tuple[float, float]:
        """(seconds, CPU microseconds per record) of the child's publish."""
        got = self._results.get(timeout=900)
        self._process.join(30)
        if isinstance(got, Exception):
            raise RuntimeError(f"a publishing process failed: {got!r}")
        return got


class StreamRun(threading.Thread):
    """One stream worker (every default processor) over ``settings``' topics until it has read ``total``
    records, with its CPU sampled (and profiled with ``py_spy`` when given)."""

    def __init__(
        self, mode: str, settings: Settings, total: int, tmp: Path, py_spy: Path | None, env: dict[str, str]
    ) -> None:
        super().__init__(daemon=True)
        self.mode, self.settings, self.total = mode, settings, total
        self.app_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.log_dir = tmp / self.app_id
        self.env = dict(env, AIMA_OTEL_SERVICE_NAME="aima-bench-streams") if env else {}
        kept = Path(tempfile.gettempdir()) / f"bench-tracing-{self.app_id}-{mode}.py-spy.txt"
        self.profile = Profile(py_spy, kept) if py_spy else None
        self.cpu = WorkerCpu(self.app_id, total, self.profile)
        self.rate = float("nan")
        self.error: BaseException | None = None

    def run(self) -> None:
        self.log_dir.mkdir()
        self.cpu.start()
        try:
            measured = app(self.settings, self.app_id, self.total, 1, 10000, self.log_dir, self.env)
            self.rate = measured["measured_events"] / measured["seconds"]
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
        finally:
            self.cpu.done.set()
            self.cpu.join(5)
            if self.profile is not None:
                self.profile.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-samples", type=int, default=200_000)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--publish-pairs", type=int, default=3, help="publish pairs (on/off and off/off) per round"
    )
    parser.add_argument("--endpoint", help="OTLP/HTTP endpoint (default: start the project's Jaeger)")
    parser.add_argument("--py-spy", type=Path, help="a py-spy binary: profile each stream worker with it")
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
    records = samples(args.gpu_samples)
    off_settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    on_settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    control_settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    for settings in (off_settings, on_settings, control_settings):
        ensure_topics(settings)
    paired: dict[str, list[float]] = {"on": [], "control": []}
    publish_rates: dict[str, list[float]] = {"off": [], "on": []}
    publish_cpu: dict[str, list[float]] = {"off": [], "on": []}
    app_rates: dict[str, list[float]] = {"off": [], "on": []}
    app_cpu: dict[str, list[float]] = {"off": [], "on": []}
    app_ids: list[str] = []
    profiled: dict[str, list[tuple[float, int, dict[str, float]]]] = {"off": [], "on": []}
    publish_profiled: dict[str, list[tuple[float, int, dict[str, float]]]] = {"off": [], "on": []}
    try:
        # Each round publishes the records once more into each prefix, off and on side by side in two
        # processes (forked, so both hold the same records), for the reason the stream workers do.
        # A control pair besides: off against off, the same way. On this machine two identical processes
        # side by side differ by several percent from pair to pair, so the on/off figure means something
        # only beside the spread of off/off measured in the same run.
        for round_ in range(args.rounds * args.publish_pairs):
            for pair in ("on", "control"):
                second = env if pair == "on" else None
                children = {
                    "off": PublishRun(off_settings, records, None),
                    pair: PublishRun(on_settings if pair == "on" else control_settings, records, second),
                }
                # Which of the two starts first alternates by round.
                order = list(children.items())[:: -1 if round_ % 2 else 1]
                profiles = {}
                for _, child in order:
                    child.start()
                for mode, child in order:
                    child.ready.wait(120)
                    if args.py_spy and pair == "on" and round_ < args.rounds:
                        kept = (
                            Path(tempfile.gettempdir()) / f"bench-tracing-publish-{round_}-{mode}.py-spy.txt"
                        )
                        profiles[mode] = Profile(args.py_spy, kept)
                        profiles[mode].attach(child.pid)
                for _, child in order:
                    child.go.set()
                cpu: dict[str, float] = {}
                for mode, child in children.items():
                    seconds, cpu[mode] = child.result()
                    if mode in profiles:
                        profiles[mode].stop()
                        publish_profiled[mode].append(profiles[mode].shares())
                    if pair == "on":
                        publish_rates[mode].append(len(records) / seconds)
                        publish_cpu[mode].append(cpu[mode])
                paired[pair].append(cpu[pair] / cpu["off"] - 1)
                print(
                    f"publish pair {round_} {pair}: off {cpu['off']:.1f} us, "
                    f"{pair} {cpu[pair]:.1f} us CPU/record"
                )
        total = len(records) * args.rounds
        with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
            for _ in range(args.rounds):
                # Off and on side by side, one worker each: both see the same load of the machine at the
                # same moment, which runs one after the other do not (their CPU per record drifted by
                # ±20 % between rounds on a shared machine).
                runs = {
                    mode: StreamRun(
                        mode, settings, total, Path(tmp), args.py_spy, env if mode == "on" else {}
                    )
                    for mode, settings in (("off", off_settings), ("on", on_settings))
                }
                app_ids.extend(run.app_id for run in runs.values())
                for run in runs.values():
                    run.start()
                for run in runs.values():
                    run.join()
                for mode, run in runs.items():
                    if run.error is not None:
                        raise run.error
                    app_rates[mode].append(run.rate)
                    app_cpu[mode].append(run.cpu.us_per_record())
                    if run.profile is not None:
                        profiled[mode].append(run.profile.shares())
                        print(f"py-spy stacks of the worker, tracing {mode}: {run.profile.out}")
                    print(
                        f"stream app, tracing {mode}: {run.rate:,.0f}/s, "
                        f"{app_cpu[mode][-1]:.1f} us CPU/record"
                    )
    finally:
        for settings in (off_settings, on_settings, control_settings):
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

    def spread(name: str, changes: list[float]) -> str:
        mean = statistics.mean(changes)
        error = statistics.stdev(changes) / len(changes) ** 0.5 if len(changes) > 1 else float("nan")
        each = ", ".join(f"{c * 100:+.1f}" for c in changes)
        return f"| {name} | {len(changes)} | {mean * 100:+.1f} % | {error * 100:.1f} % | {each} |"

    report = f"""# Tracing overhead, {date.today()}

Machine: {machine()}; Kafka 4.1 (KRaft, one local broker on the same machine); spans over OTLP/HTTP
to {"Jaeger (infra/jaeger/jaeger.sh)" if started_jaeger else endpoint}.
Command: `.venv/bin/python bench/tracing.py --gpu-samples {args.gpu_samples} --ratio {args.ratio:g} \
--rounds {args.rounds} --publish-pairs {args.publish_pairs}`

{len(records):,} simulator GpuSamples per process: {args.rounds * args.publish_pairs} publish pairs off
and on side by side in two Publisher processes (each with its off/off control pair; py-spy on the first
{args.rounds}), then {args.rounds} round(s) of two stream workers side by side.

| stage (median of the rounds) | tracing off | tracing at {args.ratio:.0%} | change | each round (off/on) |
|---|---:|---:|---:|---|
{line("collector Publisher: records/s (validate, encode, produce, acked)", publish_rates)}
{line("collector Publisher: CPU per record (this process, librdkafka included)", publish_cpu, " us")}
{line("stream app, 1 worker, every default processor: records/s", app_rates)}
{line("stream app: the worker's CPU per record, first batch to last", app_cpu, " us")}

The Publisher's CPU per record, in pairs of processes side by side (order alternating), tracing on
against off and, as the control, off against off:

| pair | pairs | mean change | standard error | each pair (%) |
|---|---:|---:|---:|---|
{spread(f"on at {args.ratio:.0%} / off", paired["on"])}
{spread("off / off (control)", paired["control"])}

Records per second are wall-clock rates on a machine shared with other sessions' builds and tests; the
CPU time per record is the figure that load disturbs least (for the rates, higher is better; for CPU,
lower).

Target: under 3 % slower with tracing at 1 %.
{profile_report(profiled, "the stream worker's", "every thread")}\
{profile_report(publish_profiled, "the Publisher's", "its Python threads, not librdkafka's")}"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def profile_report(
    profiled: dict[str, list[tuple[float, int, dict[str, float]]]], whose: str, threads: str
) -> str:
    if not profiled["on"]:
        return ""
    rows = []
    for mode in ("off", "on"):
        for round_, (share, samples_, top) in enumerate(profiled[mode], 1):
            frames = "; ".join(f"{name} {part:.2%}" for name, part in top.items()) or "-"
            rows.append(f"| {mode} | {round_} | {samples_:,} | {share:.2%} | {frames} |")
    table = "\n".join(rows)
    return f"""
## Where {whose} time goes (py-spy, `--nonblocking`, 250 samples/s, {threads})

Share of the samples with a tracing frame in the stack (OpenTelemetry, bus/tracing.py, the stream app's
`_traced_records` and `_batch_span`); the innermost such frame of each stack names the part.

| tracing | round | samples | in tracing code | largest parts |
|---|---:|---:|---:|---|
{table}
"""


if __name__ == "__main__":
    main()
