"""Alert latency to a signed webhook, for a ``for: 0`` critical rule (issue target: p99 at most 1 s).

Two paths, against the real local broker and PostgreSQL (topics under a fresh prefix, a migrated schema of
its own that is dropped afterwards):

- ``full`` (default): a GpuSample with ``time`` = now and 95 °C -> the stream app (a worker of
  streams/main.py running the alert processors, in a process of its own) fires the shipped rule
  GpuTemperatureHigh (``for: 0``, critical) -> AlertEvent on the alerts topic -> notifier -> webhook.
  Latency: the webhook's arrival minus the sample's timestamp.
- ``notifier``: AlertEvents produced directly with ``event_time`` = now -> notifier -> webhook. Latency: the
  webhook's arrival minus ``event_time``; the notifier's share alone.

The notifier runs in a thread with a route for critical alerts that sends at once (``group_wait: 0s``, one
group per alert); the receiver on 127.0.0.1 verifies every HMAC-SHA256 signature and counts duplicates.
Each alert is a distinct series (its own host). A short warm-up is not measured. Writes
``bench/results/notify_latency-<date>.md`` (or ``--out``).

    infra/kafka/kafka.sh status && infra/postgres/postgres.sh status
    .venv/bin/python bench/notify_latency.py                          # full path, 200 alerts at 20/s
    .venv/bin/python bench/notify_latency.py --path notifier --alerts 2000 --rate 200 --append
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry
from psycopg import sql

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bus.codec import Codec  # noqa: E402
from bus.kafka import ensure_topics, wait_for_broker  # noqa: E402
from bus.runtime import Service  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.topics import topic_name  # noqa: E402
from consumers.migrate import migrate  # noqa: E402
from consumers.notify.config import parse  # noqa: E402
from consumers.notify.notifier import run  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
KEY = uuid.uuid4().hex
# One worker of the stream app with only the alert processors (the shipped rules include GpuTemperatureHigh).
STREAM_WORKER = (
    "import sys; from bus.settings import Settings; from streams.main import run; "
    "from streams.alerts.processor import alert_processors_from_settings; "
    "from streams.alerts.settings import AlertSettings; "
    "sys.exit(run(Settings(), processors=alert_processors_from_settings(AlertSettings())))"
)


class Receiver:
    """Records when each correctly signed webhook arrives, by the alert's ``host`` label."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.bad_signatures = 0
        self.duplicates = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver behind a proxy would

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived = time.time()
                expected = "sha256=" + hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
                signed = hmac.compare_digest(self.headers.get("X-AIMA-Signature", ""), expected)
                with receiver.lock:
                    if not signed:
                        receiver.bad_signatures += 1
                    else:
                        for alert in json.loads(body)["alerts"]:
                            host = alert["labels"].get("host", "")
                            if host in receiver.arrivals:
                                receiver.duplicates += 1
                            else:
                                receiver.arrivals[host] = arrived
                self.send_response(200 if signed else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 drops SYNs under bursts: 1 s retransmits

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, hosts: list[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if all(h in self.arrivals for h in hosts):
                    return True
            time.sleep(0.05)
        return False


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def gpu_sample(host: str, now_ms: int) -> tuple[bytes, dict[str, Any]]:
    uuid_ = f"GPU-{host}"
    return f"{host}/{uuid_}".encode(), {
        "time": now_ms,
        "host": host,
        "gpu": 0,
        "gpu_uuid": uuid_,
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "source": "bench",
        "interval_group": "slow",
        "temperature_celsius": 95.0,
    }


def alert_event(host: str, now_ms: int) -> tuple[bytes, dict[str, Any]]:
    fingerprint = hashlib.sha256(host.encode()).hexdigest()[:16]
    return fingerprint.encode(), {
        "fingerprint": fingerprint,
        "rule": "GpuTemperatureHigh",
        "status": "firing",
        "severity": "critical",
        "starts_at": now_ms,
        "ends_at": None,
        "event_time": now_ms,
        "value": 95.0,
        "labels": {"host": host, "gpu": "0", "gpu_uuid": f"GPU-{host}"},
        "annotations": {"summary": f"GPU 0 on {host} at 95 °C"},
        "channels": ["webhook"],
        "source": "bench",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("full", "notifier"), default="full", help="what to measure")
    parser.add_argument("--alerts", type=int, default=200, help="measured alerts (default 200)")
    parser.add_argument("--rate", type=float, default=20.0, help="alerts per second (default 20)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="alerts sent first and not measured (default 5)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/...)")
    parser.add_argument(
        "--append", action="store_true", help="add to the results file instead of replacing it"
    )
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:8]
    settings = Settings(topic_prefix=f"bench{run_id}.")
    wait_for_broker(settings, timeout_s=30)
    ensure_topics(settings)
    dsn = settings.database_dsn()
    schema = f"bench_{run_id}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, schema=schema)

    receiver = Receiver()
    config = parse(
        {
            "route": {
                "receiver": "team",
                "routes": [
                    {
                        "matchers": ["severity=critical"],
                        "receiver": "oncall",
                        "group_by": ["..."],
                        "group_wait": "0s",
                        "group_interval": "1m",
                    }
                ],
            },
            "receivers": [
                {"name": "team"},
                {
                    "name": "oncall",
                    "webhook": {"url": receiver.url, "hmac_key_env": "BENCH_KEY", "timeout": "5s"},
                },
            ],
        },
        environ={"BENCH_KEY": KEY},
        source="bench",
    )
    service = Service("notify-bench", settings, registry=CollectorRegistry())
    notifier = threading.Thread(
        target=run,
        args=(settings,),
        kwargs={"service": service, "config": config, "schema": schema},
        daemon=True,
    )
    notifier.start()

    codec = Codec()
    if args.path == "full":
        topic, record, make = topic_name(settings, "gpu.samples"), "GpuSample", gpu_sample
    else:
        topic, record, make = topic_name(settings, "alerts"), "AlertEvent", alert_event
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,
        }
    )

    def send(host: str) -> float:
        now_ms = int(time.time() * 1000)
        key, value = make(host, now_ms)
        producer.produce(topic, key=key, value=codec.encode(record, value, topic=topic))
        producer.poll(0)
        return now_ms / 1000

    stream_worker: subprocess.Popen[bytes] | None = None
    workdir = tempfile.TemporaryDirectory(prefix="notify-bench-")
    sent: dict[str, float] = {}
    measured: list[str] = []
    try:
        if args.path == "full":
            stream_worker = _start_stream_worker(settings, run_id, Path(workdir.name))
        warmup = [f"warmup-{run_id}-{i}" for i in range(args.warmup)]
        for host in warmup:
            send(host)
        producer.flush(30)
        # The warm-up also waits for the stream worker (Faust) and the notifier's consumer to be running.
        if not receiver.wait(warmup, timeout_s=180):
            raise SystemExit(
                f"the warm-up alerts did not arrive; stream worker log: {workdir.name}/stream.log"
            )
        started = time.monotonic()
        for i in range(args.alerts):
            if (pause := started + i / args.rate - time.monotonic()) > 0:
                time.sleep(pause)
            host = f"bench-{run_id}-{i:05d}"
            sent[host] = send(host)
            measured.append(host)
        producer.flush(30)
        receiver.wait(measured, timeout_s=60)
        time.sleep(1.0)  # duplicates would arrive by now
    finally:
        if stream_worker is not None:
            stream_worker.terminate()
            stream_worker.wait(60)
        service.stopping.set()
        notifier.join(30)
        receiver.server.shutdown()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        workdir.cleanup()

    latencies = [receiver.arrivals[h] - sent[h] for h in measured if h in receiver.arrivals]
    missing = len(measured) - len(latencies)
    if not latencies:
        raise SystemExit("no alert arrived")
    figures = {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "mean": statistics.fmean(latencies),
    }
    report = _report(args, figures, len(latencies), missing, receiver)
    out = args.out or RESULTS / f"notify_latency-{dt.datetime.now(dt.UTC):%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = report
    if args.append and out.exists():
        text = out.read_text().rstrip("\n") + "\n\n" + report.replace("# ", "## ", 1)
    out.write_text(text)
    print(report)
    print(f"written to {out}")
    if missing or receiver.bad_signatures or receiver.duplicates:
        raise SystemExit(1)


def _start_stream_worker(settings: Settings, run_id: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        AIMA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        AIMA_TOPIC_PREFIX=settings.topic_prefix,
        AIMA_STATE_DIR=str(workdir / "state"),
        AIMA_STREAMS_APP_ID=f"bench-streams-{run_id}",
        AIMA_STREAMS_LOG_LEVEL="warn",
        AIMA_METRICS_PORT="0",
    )
    with (workdir / "stream.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", STREAM_WORKER], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )


_WHAT: dict[str, Callable[[argparse.Namespace], str]] = {
    "full": lambda a: (
        f"{a.alerts} hot GpuSamples (95 °C, each its own GPU and host, `time` = now) sent at {a.rate:g}/s "
        "to the real local broker; a stream worker (streams/main.py with the alert processors, its own "
        "process) fires the shipped rule GpuTemperatureHigh (`for: 0`, critical) for each; the notifier "
        "(`group_wait: 0s`, one group per alert) sends a signed webhook to 127.0.0.1. Latency: the "
        "webhook's arrival at the receiver (its HMAC-SHA256 signature verified) minus the sample's "
        "timestamp (milliseconds)."
    ),
    "notifier": lambda a: (
        f"{a.alerts} critical AlertEvents (each its own series, `event_time` = now) produced at {a.rate:g}/s "
        "straight to the alerts topic of the real local broker; the notifier (`group_wait: 0s`, one group "
        "per alert) sends a signed webhook to 127.0.0.1. Latency: the webhook's arrival at the receiver (its "
        "HMAC-SHA256 signature verified) minus `event_time`: the notifier's share of the path alone."
    ),
}


def _report(
    args: argparse.Namespace, figures: dict[str, float], count: int, missing: int, receiver: Receiver
) -> str:
    ms = {k: f"{v * 1000:.1f}" for k, v in figures.items()}
    verdict = "met" if figures["p99"] <= 1.0 and not missing else "NOT met"
    rows = "\n".join(f"| {k} | {v} |" for k, v in _machine().items())
    command = " ".join(["bench/notify_latency.py", *sys.argv[1:]])
    what = _WHAT[args.path](args)
    return (
        f"# Alert latency bench ({args.path} path), {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`{command}`: {what} {args.warmup} warm-up alerts first, not measured.\n\n"
        f"| machine | |\n|---|---|\n{rows}\n\n"
        "| latency | ms |\n|---|---|\n"
        + "".join(f"| {k} | {ms[k]} |\n" for k in ("p50", "p95", "p99", "max", "mean"))
        + f"\nDelivered {count} of {count + missing}; signature failures {receiver.bad_signatures}; "
        f"duplicates {receiver.duplicates}.\nTarget (issue): p99 at most 1 s: {verdict}.\n"
    )


def _machine() -> dict[str, str]:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    try:
        memory = f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB"
    except (ValueError, OSError):
        memory = "unknown"
    settings = Settings()
    try:
        with psycopg.connect(settings.database_dsn()) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            postgres = row[0] if row else "unknown"
    except (psycopg.Error, RuntimeError):
        postgres = "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": model,
        "memory": memory,
        "load average (1, 5, 15 min) at the end": load,
        "python": platform.python_version(),
        "os": platform.platform(),
        "kafka": f"local broker {settings.kafka_bootstrap} (KRaft, one node)",
        "postgresql": postgres,
    }


if __name__ == "__main__":
    main()
