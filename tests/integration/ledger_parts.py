"""Parts of the ledger test (test_ledger.py): the pipeline's processes as subprocesses that can be killed
and restarted, a webhook endpoint that can be told to fail, and the offline answers (raw natural keys,
rollup counts per metric, the alerts that must fire and resolve) computed from the records sent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bus.catalogue import METRICS
from bus.codec import Codec
from bus.settings import REPO_ROOT
from bus.topics import BY_KEY
from consumers.notify.channels.webhook import SIGNATURE_HEADER, verify
from consumers.tables import BY_RECORD, Origin

NS = "aima.metrics"
Record = tuple[str, str, str, dict[str, Any]]
"""(topic key, message key, record name, value): Publisher.publish's arguments."""

# -- processes -----------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One pipeline process (``python -m <module> <args>``), its log appended to across restarts."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", *self.args],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self, timeout_s: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None when it had to be killed, seconds it took)."""
        if self.popen is None or self.popen.poll() is not None:
            return (None if self.popen is None else self.popen.returncode), 0.0
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=30)
            code = None
        return code, time.monotonic() - started

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    procs: Iterable[Proc] = (),
    explain: Callable[[], str] | None = None,
) -> float:
    """Poll ``condition`` until true; fail naming ``what`` (and showing the logs of the processes that
    should be running) after ``timeout_s``. Returns the seconds it took."""
    started = time.monotonic()
    watched = list(procs)
    while True:
        for proc in watched:
            assert proc.alive(), f"{proc.name} died while waiting for {what}:\n{proc.tail()}"
        try:
            if condition():
                return time.monotonic() - started
        except Exception as exc:  # a dependency in the middle of an outage: ask again
            last = exc
        else:
            last = None
        if time.monotonic() - started > timeout_s:
            detail = explain() if explain else ""
            logs = "\n".join(f"--- {p.name}:\n{p.tail(1500)}" for p in watched)
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what} ({last!r}) {detail}\n{logs}"
            )
        time.sleep(1.0)


# -- the webhook endpoint ------------------------------------------------------------------------------


@dataclass
class Call:
    at: float
    status: int
    valid: bool
    alerts: list[dict[str, Any]]


class Receiver:
    """A real HTTP server for the notifier's signed webhooks that answers 500 while ``failing`` is set,
    401 to a bad signature and 200 otherwise; every call is kept."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.failing = threading.Event()
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10.0

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                valid = verify(body, receiver.key, self.headers.get(SIGNATURE_HEADER))
                status = 500 if receiver.failing.is_set() else (200 if valid else 401)
                try:
                    alerts = json.loads(body).get("alerts", [])
                except ValueError:
                    alerts = []
                with receiver._lock:
                    receiver.calls.append(Call(time.monotonic(), status, valid, alerts))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def delivered(self) -> dict[tuple[str, str, str], int]:
        """(fingerprint, status, startsAt) -> how many times it was accepted (answered 200)."""
        counts: dict[tuple[str, str, str], int] = {}
        for call in self.snapshot():
            if call.status == 200:
                for alert in call.alerts:
                    key = (alert["fingerprint"], alert["status"], alert["startsAt"])
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- offline answers -----------------------------------------------------------------------------------


def expected_raw_keys(records: Sequence[Record]) -> dict[str, set[tuple[Any, ...]]]:
    """Per raw table, the natural keys of the rows the records become (consumers/tables.py), from each
    record as a reader decodes it (every field present, times in milliseconds)."""
    keys: dict[str, set[tuple[Any, ...]]] = {}
    dummy = Origin("t", 0, 0, 0)
    codec = Codec()
    for _, _, name, value in records:
        decoded = codec.decode(codec.encode(name, value))[1]
        for table in BY_RECORD[f"{NS}.{name}"]:
            where = [table.column_names.index(column) for column in table.key]
            for row in table.rows(decoded, dummy):
                keys.setdefault(table.name, set()).add(tuple(row[i] for i in where))
    return keys


def record_count(records: Sequence[Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, name, _ in records:
        counts[name] = counts.get(name, 0) + 1
    return counts


def expected_metric_counts(records: Sequence[Record]) -> dict[str, int]:
    """Per catalogue metric carried by the records (summaries aside): how many values it has, which is
    what the rollup counts of every tier must sum to."""
    counts: dict[str, int] = {}
    names = {f"{NS}.{name}" for _, _, name, _ in records}
    # Per-process metrics are kept raw only, never rolled up (bus/catalogue.py).
    metrics = [m for m in METRICS if m.record in names and m.type != "summary" and not m.per_process]
    for _, _, name, value in records:
        for metric in metrics:
            if metric.record != f"{NS}.{name}" or not metric.selects(value):
                continue
            array, _, item_field = metric.field.rpartition("[].")
            if array:
                found = sum(1 for item in value.get(array) or () if item.get(item_field) is not None)
            else:
                found = int(value.get(metric.field) is not None)
            counts[metric.name] = counts.get(metric.name, 0) + found
    return {name: n for name, n in counts.items() if n}


@dataclass(frozen=True)
class Episode:
    """One expected alert: fires at ``starts_at`` (the first sample above the threshold) and resolves."""

    host: str
    gpu_uuid: str
    starts_at: datetime
    resolved_at: datetime


def temperature_episodes(records: Sequence[Record], threshold: float = 85.0) -> list[Episode]:
    """GpuTemperatureHigh (gt 85, for 0, keep_firing_for 0): per GPU, in event-time order, firing at the
    first sample above the threshold, resolved at the first one at or below it afterwards."""
    series: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
    for _, _, name, value in records:
        if name == "GpuSample" and value.get("temperature_celsius") is not None:
            key = (value["host"], value["gpu_uuid"])
            series.setdefault(key, []).append((value["time"], value["temperature_celsius"]))
    episodes = []
    for (host, uuid), samples in series.items():
        since: datetime | None = None
        for moment, celsius in sorted(samples):
            if celsius > threshold and since is None:
                since = moment
            elif celsius <= threshold and since is not None:
                episodes.append(Episode(host, uuid, since, moment))
                since = None
        assert since is None, f"{host}/{uuid} still hot at the end: the input must let every alert resolve"
    return episodes


def key_for_partition(prefix: str, partition: int, partitions: int, suffix: Callable[[str], str]) -> str:
    """A message key that librdkafka's default partitioner (crc32 of the key) puts on ``partition``."""
    for n in range(100_000):
        key = suffix(f"{prefix}-{n}")
        if zlib.crc32(key.encode()) % partitions == partition:
            return key
    raise AssertionError("no key found")


def partitions_of(topic_key: str) -> int:
    return BY_KEY[topic_key].partitions


@dataclass
class Bad:
    """A deliberately bad record: where it went, and who must dead-letter it."""

    what: str
    topic: str
    partition: int | None = None
    offset: int | None = None
    stages: tuple[str, ...] = ("stream", "sink")
    hosts: list[str] = field(default_factory=list)

    @property
    def origin(self) -> tuple[str, int | None, int | None]:
        return (self.topic, self.partition, self.offset)
