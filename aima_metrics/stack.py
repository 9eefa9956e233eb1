"""The local stack: the real Kafka broker and PostgreSQL server (through the scripts in infra/), the
topics, the migrations, and the pipeline's own long-running processes as supervised children."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg

from bus.kafka import ensure_topics, wait_for_broker
from bus.settings import REPO_ROOT, Settings
from consumers.migrate import migrate

INFRA = REPO_ROOT / "infra"


class StackError(RuntimeError):
    """A service of the local stack failed to start or stop; the message says which and where to look."""


@dataclass(frozen=True)
class Process:
    """A long-running pipeline process that `up` starts: `aima-metrics <args>`."""

    name: str
    args: tuple[str, ...]
    metrics_port: int
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)


def nvml_present() -> bool:
    """True when NVML answers with at least one GPU; decides between the GPU collector and the simulator."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def webhook_key(settings: Settings) -> str:
    """The key the local notifier signs webhooks with: AIMA_WEBHOOK_KEY, else one generated once and kept
    (readable only by its owner) in the state folder."""
    if key := os.environ.get("AIMA_WEBHOOK_KEY"):
        return key
    path = settings.state_dir / "webhook" / "key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def processes(settings: Settings, gpu: bool | None = None) -> tuple[Process, ...]:
    """The pipeline's long-running processes, each `aima-metrics <args>` with its own self-metrics port
    (``AIMA_PORT_BASE`` + n). Without a GPU the fleet simulator stands in for real GPU samples."""
    base = int(os.environ.get("AIMA_PORT_BASE", "9100"))
    exporter = int(os.environ.get("AIMA_GPU_EXPORTER_PORT", "9400"))
    gpu = nvml_present() if gpu is None else gpu
    api_port = int(os.environ.get("AIMA_API_PORT", "8000"))
    receiver_port = base + 9
    receiver_url = f"http://127.0.0.1:{receiver_port}/alerts"
    key = webhook_key(settings)
    listed = [
        Process("stream", ("stream",), base + 1),
        Process("sink", ("sink",), base + 2),
        Process(
            "webhook-receiver",
            ("webhook-receiver", "--port", str(receiver_port)),
            base + 8,
            address=f"{receiver_url} -> {settings.state_dir}/webhook/received.jsonl",
            env={"AIMA_WEBHOOK_KEY": key},
        ),
        Process(
            "notify",
            ("notify",),
            base + 3,
            env={
                "AIMA_NOTIFY_CONFIG": os.environ.get(
                    "AIMA_NOTIFY_CONFIG", str(INFRA / "notify" / "local.yaml")
                ),
                "AIMA_LOCAL_WEBHOOK_URL": receiver_url,
                "AIMA_WEBHOOK_KEY": key,
            },
        ),
        Process("api", ("api",), base + 4, address=f"http://127.0.0.1:{api_port}/docs"),
        Process("system-collector", ("collect", "system"), base + 5),
        Process(
            "gpu-collector",
            ("collect", "gpu"),
            base + 6,
            address=f"GPU values http://127.0.0.1:{exporter}/metrics",
            env={"AIMA_GPU_EXPORTER_PORT": str(exporter)},
        ),
    ]
    if not gpu:
        listed.append(Process("simulator", ("collect", "jobs-sim"), base + 7, address="simulated fleet"))
    return tuple(listed)


def script_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIMA_STATE_DIR=str(settings.state_dir),
        AIMA_KAFKA_PORT=str(settings.kafka_port),
        AIMA_KAFKA_CONTROLLER_PORT=str(settings.kafka_controller_port),
        AIMA_PG_PORT=str(settings.pg_port),
    )
    return env


def run_script(settings: Settings, script: str, verb: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INFRA / script), verb], env=script_env(settings), text=True, capture_output=True, check=False
    )


class Stack:
    def __init__(self, settings: Settings, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.say = say
        self.run_dir = settings.state_dir / "run"
        self.log_dir = settings.state_dir / "logs"

    # ---- external services -------------------------------------------------------------------
    def _service(self, script: str, verb: str, what: str) -> None:
        result = run_script(self.settings, script, verb)
        if result.returncode != 0:
            raise StackError(f"{what} {verb} failed:\n{result.stderr.strip()}")

    def start_services(self) -> str:
        """Kafka, PostgreSQL, topics, migrations; returns the database mode."""
        steps = 4
        self.say(f"[1/{steps}] Kafka broker on 127.0.0.1:{self.settings.kafka_port} (KRaft) ...")
        t0 = time.monotonic()
        self._service("kafka/kafka.sh", "start", "Kafka")
        wait_for_broker(self.settings, timeout_s=30)
        self.say(f"      up in {time.monotonic() - t0:.1f} s")
        self.say(f"[2/{steps}] PostgreSQL on 127.0.0.1:{self.settings.pg_port} ...")
        self._service("postgres/postgres.sh", "start", "PostgreSQL")
        self.say(f"[3/{steps}] topics ...")
        created = ensure_topics(self.settings)
        self.say(f"      created {len(created)}: {', '.join(created)}" if created else "      all present")
        self.say(f"[4/{steps}] database migrations ...")
        with psycopg.connect(self.settings.database_dsn()) as conn:
            report = migrate(conn)
        self.say(f"      mode {report.mode}; applied {len(report.applied)}, already {len(report.already)}")
        return report.mode

    def stop_services(self) -> None:
        self.say("stopping PostgreSQL ...")
        self._service("postgres/postgres.sh", "stop", "PostgreSQL")
        self.say("stopping Kafka ...")
        self._service("kafka/kafka.sh", "stop", "Kafka")

    def postgres_log(self) -> Path:
        datadir = self.settings.state_dir / "postgres" / "datadir"
        data = Path(datadir.read_text().strip()) if datadir.exists() else datadir.parent / "data"
        return data / "server.log"

    # ---- pipeline processes ------------------------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid_of(self, name: str) -> int | None:
        try:
            pid = int(self._pidfile(name).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start_process(self, process: Process) -> int:
        if (pid := self.pid_of(process.name)) is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = script_env(self.settings) | process.env | {"AIMA_METRICS_PORT": str(process.metrics_port)}
        with open(self.log_dir / f"{process.name}.log", "ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "aima_metrics", *process.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._pidfile(process.name).write_text(str(child.pid))
        return child.pid

    def stop_process(self, name: str, timeout_s: float = 30.0) -> None:
        pid = self.pid_of(name)
        if pid is None:
            self._pidfile(name).unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            self.say(f"{name} did not stop within {timeout_s:.0f} s; killing it")
            os.kill(pid, signal.SIGKILL)
        self._pidfile(name).unlink(missing_ok=True)

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> list[tuple[str, bool, str]]:
        rows = []
        for name, script in (("kafka", "kafka/kafka.sh"), ("postgres", "postgres/postgres.sh")):
            result = run_script(self.settings, script, "status")
            words = result.stdout.split()
            rows.append((name, result.returncode == 0, " ".join(words[1:])))
        for process in processes(self.settings, gpu=self.pid_of("simulator") is None):
            pid = self.pid_of(process.name)
            where = process.address or f"metrics http://127.0.0.1:{process.metrics_port}/metrics"
            rows.append((process.name, pid is not None, f"{where} pid={pid}" if pid else where))
        supervisor = self.pid_of("up")
        rows.append(("supervisor", supervisor is not None, f"pid={supervisor}" if supervisor else "-"))
        return rows


def _alive(pid: int) -> bool:
    """True while the process runs; an exited process that its parent has not reaped yet (a zombie)
    counts as gone."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
