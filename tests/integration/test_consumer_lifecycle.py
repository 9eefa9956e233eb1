"""The sink and the notifier as the processes users run (`aima-metrics sink`, `aima-metrics notify`), on a
broker and PostgreSQL of this module's own (tests/private_stack.py), which the tests stop and start:

- a SIGTERM 0.5, 1, 2 and 5 s after the start, in the middle of a load, with the broker away and with the
  database away: each exits 0 by itself within the stop bound, and after a restart nothing is lost (rows
  stored == records sent; every alert delivered); a second SIGTERM ends a process at once;
- an outage of the broker and then of the database, AIMA_TEST_OUTAGE_S each (default 60 s), with both
  processes running: CPU under 5 % of a core and log growth under 1 MB during each; afterwards both resume
  by themselves, and what was sent during and after the outage is stored and delivered.

The measured figures are printed (pytest -s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bus.kafka import ensure_topics, wait_for_broker
from bus.settings import Settings
from consumers.migrate import migrate
from tests.integration.test_db_sink import gpu_sample, produce
from tests.integration.test_notifier import KEY, Receiver, alert_event
from tests.integration.test_notifier import produce as produce_alerts
from tests.private_stack import PrivateStack

pytestmark = pytest.mark.integration

BOUND_S = 15.0
OUTAGE_S = float(os.environ.get("AIMA_TEST_OUTAGE_S", "60"))
DEADLINE_S = 300.0
CPU_SHARE_MAX = 0.05
LOG_GROWTH_MAX = 1_000_000 * min(1.0, OUTAGE_S / 300)
"""The issue's bound is 1 MB over a 5-minute outage: a shorter outage gets its share of it."""
_TICK_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Stopped:
    process: str
    moment: str
    seconds: float
    code: int
    how: str
    log: str

    def row(self) -> str:
        return (
            f"| {self.process:<8} | {self.moment:<30} | {self.seconds:6.2f} | {self.code} | {self.how:<8} |"
        )


class Launched:
    """One `aima-metrics` process, its log (stdout and stderr) in a file of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:8]}.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aima_metrics", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.monotonic()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size

    def cpu_s(self) -> float:
        """User and system CPU seconds the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK_S

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while text not in self.log():
            assert self.process.poll() is None, f"{self.name} ended early:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name}: no {text!r}:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def stop(self, moment: str, second_after_s: float | None = None) -> Stopped:
        """SIGTERM (and another one ``second_after_s`` later, when given); the time until it exited."""
        signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        if second_after_s is not None:
            time.sleep(second_after_s)
            if self.process.poll() is None:
                signalled = time.monotonic()  # measured from the second one
                self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(BOUND_S + 60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        took = time.monotonic() - signalled
        log = self.log()
        if "still running when the stop bound passed" in log:
            how = "watchdog"
        elif "second stop request" in log:
            how = "second"
        elif "stop requested while loading" in log:
            how = "loading"
        else:
            how = "service" if '"msg": "stopped"' in log else "?"
        return Stopped(self.name, moment, took, code, how, log)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _print_table(title: str, stops: list[Stopped]) -> None:
    print(f"\n{title}\n| process  | moment                         | exit s | rc | how      |")
    print("|---|---|---|---|---|")
    for stop in stops:
        print(stop.row())


def _check(stops: list[Stopped], allowed: tuple[str, ...] = ("loading", "service")) -> None:
    for stop in stops:
        assert stop.code == 0, f"{stop.process} at {stop.moment}: exit {stop.code}\n{stop.log[-3000:]}"
        assert stop.seconds < BOUND_S, f"{stop.process} at {stop.moment}: {stop.seconds:.1f} s"
        assert stop.how in allowed, f"{stop.process} at {stop.moment}: {stop.how}\n{stop.log[-3000:]}"


# -- the module's own broker and database ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    own = PrivateStack(tmp_path_factory.mktemp("lifecycle") / "private")
    try:
        own.start()
        wait_for_broker(own.settings(), timeout_s=180)
        with psycopg.connect(own.database_url, autocommit=True) as conn:
            migrate(conn)
        yield own
    finally:
        own.close()


@dataclass
class Pipeline:
    """One test's view of the stack: its topic prefix, a webhook receiver, and how to start the two."""

    stack: PrivateStack
    settings: Settings
    receiver: Receiver
    log_dir: Path
    config_path: Path

    def env(self) -> dict[str, str]:
        env = self.stack.process_env(
            AIMA_TOPIC_PREFIX=self.settings.topic_prefix,
            AIMA_STOP_TIMEOUT_S=str(BOUND_S),
            AIMA_NOTIFY_CONFIG=str(self.config_path),
            HOOK_KEY=KEY,
        )
        env.pop("AIMA_METRICS_PORT", None)
        return env

    def sink(self) -> Launched:
        return Launched("sink", ["sink", "--batch-timeout-s", "0.2"], self.env(), self.log_dir)

    def notifier(self) -> Launched:
        return Launched("notify", ["notify"], self.env(), self.log_dir)

    def rows(self) -> int:
        with psycopg.connect(self.stack.database_url, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(
                "SELECT count(DISTINCT (host, gpu_uuid, time)) FROM gpu_samples WHERE source = %s",
                (self.settings.topic_prefix,),
            ).fetchone()[0]

    def delivered(self) -> set[str]:
        return {
            alert["fingerprint"]
            for request in self.receiver.seen("/hook")
            for alert in request.json()["alerts"]
        }


@pytest.fixture
def pipeline(stack: PrivateStack, tmp_path: Path) -> Iterator[Pipeline]:
    settings = stack.settings(topic_prefix=f"l{uuid.uuid4().hex[:8]}.")
    ensure_topics(settings)
    receiver = Receiver()
    config_path = tmp_path / "notify.yaml"
    config_path.write_text(
        json.dumps(
            {
                "route": {"receiver": "ops", "group_by": ["..."], "group_wait": "0s", "group_interval": "1s"},
                "receivers": [
                    {"name": "ops", "webhook": {"url": receiver.url("/hook"), "hmac_key_env": "HOOK_KEY"}}
                ],
                "delivery": {
                    "max_attempts": 1000,
                    "initial_backoff": "200ms",
                    "max_backoff": "2s",
                    "max_elapsed": "30m",
                    "timeout": "2s",
                },
            }
        )
    )
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    try:
        yield Pipeline(stack, settings, receiver, log_dir, config_path)
    finally:
        receiver.close()


class Sender:
    """Numbered GPU samples and alerts, each sent once; remembers what the broker acknowledged."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.samples = 0
        self.alerts: list[str] = []

    def gpu(self, count: int) -> None:
        values = []
        prefix = self.pipeline.settings.topic_prefix
        for _ in range(count):
            i = self.samples
            # Distinct (host, gpu_uuid, time) for every record, also across this module's tests: they share
            # one database and one NOW, and the sink stores a natural key once (a second test reusing the
            # first one's hosts would find its rows already there, under the first test's source).
            host = f"{prefix}h{i // 1000}"
            sample = gpu_sample(i % 1000, host=host) | {"source": prefix}
            values.append(("gpu.samples", f"{host}/GPU-{i % 2}", "GpuSample", sample))
            self.samples += 1
        produce(self.pipeline.settings, values)

    def alert(self, count: int) -> None:
        events = [alert_event(host=f"gpu-{len(self.alerts) + n}") for n in range(count)]
        produce_alerts(self.pipeline.settings, *events)
        self.alerts += [event["fingerprint"] for event in events]


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except psycopg.OperationalError:
            pass  # the database is coming back
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _all_stored_and_delivered(
    pipeline: Pipeline, sender: Sender, what: str, running: Sequence[Launched] = ()
) -> None:
    """Wait for every sample stored and every alert delivered; when that times out, the ``running``
    processes dump their threads' stacks into their logs (SIGUSR1), and the failure shows the logs."""
    try:
        wait_until(lambda: pipeline.rows() == sender.samples, f"{sender.samples} rows ({what})")
        wait_until(
            lambda: pipeline.delivered() >= set(sender.alerts), f"{len(sender.alerts)} alerts ({what})"
        )
    except AssertionError as timed_out:
        for process in running:
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        logs = "\n".join(f"--- {p.name}:\n{p.log()[-6000:]}" for p in running)
        raise AssertionError(f"{timed_out}\n{logs}") from None


# -- stop at any moment --------------------------------------------------------------------------------------


def test_sink_and_notifier_stop_in_time_at_any_moment_and_lose_nothing(pipeline: Pipeline) -> None:
    stack, sender, stops = pipeline.stack, Sender(pipeline), []
    sender.gpu(500)
    sender.alert(5)
    for moment_s in (0.5, 1.0, 2.0, 5.0):
        both = [pipeline.sink(), pipeline.notifier()]
        for process in both:
            time.sleep(max(0.0, process.started + moment_s - time.monotonic()))
            stops.append(process.stop(f"{moment_s:g} s after start"))

    # Under load: 20,000 samples and 100 alerts being sent while they work.
    sink, notifier = pipeline.sink(), pipeline.notifier()
    sink.wait_for("partitions assigned")
    before = len(pipeline.delivered())
    loader = threading.Thread(target=lambda: (sender.gpu(20_000), sender.alert(100)))
    loader.start()
    wait_until(lambda: pipeline.rows() > 1000, "the sink storing under load")
    stops.append(sink.stop("mid-load"))
    wait_until(lambda: len(pipeline.delivered()) > before, "the notifier delivering under load")
    stops.append(notifier.stop("mid-load"))
    loader.join()

    # The broker away (both were running with it).
    sink, notifier = pipeline.sink(), pipeline.notifier()
    sink.wait_for("partitions assigned")
    notifier.wait_for("partitions assigned")
    stack.stop_kafka()
    try:
        time.sleep(5.0)
        stops += [sink.stop("broker away"), notifier.stop("broker away")]
        # Started while the broker is away, stopped while it still is.
        sink, notifier = pipeline.sink(), pipeline.notifier()
        time.sleep(5.0)
        stops += [sink.stop("started with the broker away"), notifier.stop("started with the broker away")]
    finally:
        stack.start_kafka()
    wait_for_broker(pipeline.settings, timeout_s=180)

    # The database away, with records waiting to be stored.
    sink, notifier = pipeline.sink(), pipeline.notifier()
    sink.wait_for("partitions assigned")
    notifier.wait_for("partitions assigned")
    stack.stop_postgres()
    try:
        sender.gpu(200)
        sink.wait_for("database unavailable")
        stops += [sink.stop("database away"), notifier.stop("database away")]
        # A second SIGTERM ends it at once, whatever the first one's stop still waits for.
        sink = pipeline.sink()
        sink.wait_for("database unavailable")
        stops.append(sink.stop("second SIGTERM, database away", second_after_s=0.5))
    finally:
        stack.start_postgres()

    _print_table("sink and notifier: seconds from SIGTERM to exit", stops)
    _check([stop for stop in stops if not stop.moment.startswith("second")])
    _check([stop for stop in stops if stop.moment.startswith("second")], allowed=("second", "service"))
    assert max(stop.seconds for stop in stops if stop.moment.startswith("second")) < 2.0

    # Nothing lost: restarted, they store every record sent and deliver every alert.
    sink, notifier = pipeline.sink(), pipeline.notifier()
    try:
        _all_stored_and_delivered(pipeline, sender, "after the restarts")
    finally:
        _check([sink.stop("end"), notifier.stop("end")])


# -- outages ------------------------------------------------------------------------------------------------


@dataclass
class Outage:
    dependency: str
    process: str
    seconds: float
    cpu_s: float
    log_bytes: int

    def row(self) -> str:
        share = 100 * self.cpu_s / self.seconds
        return (
            f"| {self.dependency:<8} | {self.process:<8} | {self.seconds:6.0f} | {self.cpu_s:7.2f} | "
            f"{share:5.2f} % | {self.log_bytes:9d} |"
        )


def _outage(
    dependency: str,
    stop: Callable[[], None],
    start: Callable[[], None],
    during: Callable[[], Any],
    processes: list[Launched],
) -> list[Outage]:
    stop()
    t0 = time.monotonic()
    cpu0 = {p.name: p.cpu_s() for p in processes}
    log0 = {p.name: p.log_bytes() for p in processes}
    during()
    time.sleep(max(0.0, t0 + OUTAGE_S - time.monotonic()))
    seconds = time.monotonic() - t0
    found = [
        Outage(dependency, p.name, seconds, p.cpu_s() - cpu0[p.name], p.log_bytes() - log0[p.name])
        for p in processes
    ]
    start()
    for p in processes:
        assert p.process.poll() is None, f"{p.name} ended during the {dependency} outage:\n{p.log()[-3000:]}"
    return found


def test_outages_of_the_broker_and_the_database_are_ridden_out_quietly(pipeline: Pipeline) -> None:
    stack, sender = pipeline.stack, Sender(pipeline)
    sink, notifier = pipeline.sink(), pipeline.notifier()
    processes = [sink, notifier]
    figures: list[Outage] = []
    try:
        sender.gpu(300)
        sender.alert(3)
        _all_stored_and_delivered(pipeline, sender, "before the outages", processes)

        figures += _outage("broker", stack.stop_kafka, stack.start_kafka, lambda: None, processes)
        wait_for_broker(pipeline.settings, timeout_s=180)
        sender.gpu(300)
        sender.alert(3)
        _all_stored_and_delivered(pipeline, sender, "after the broker outage", processes)

        def send_during() -> None:  # stored once the database is back; delivered without it
            sender.gpu(300)
            sender.alert(3)

        figures += _outage("database", stack.stop_postgres, stack.start_postgres, send_during, processes)
        sender.gpu(300)
        sender.alert(3)
        _all_stored_and_delivered(pipeline, sender, "after the database outage", processes)
    finally:
        print(f"\noutages of {OUTAGE_S:g} s: CPU and log growth during each")
        print("| outage   | process  | s      | CPU s   | core  | log bytes |\n|---|---|---|---|---|---|")
        for figure in figures:
            print(figure.row())
        stops = [p.stop("end") for p in processes]
    _check(stops)
    for figure in figures:
        assert figure.cpu_s < CPU_SHARE_MAX * figure.seconds, figure.row()
        assert figure.log_bytes < LOG_GROWTH_MAX, figure.row()
