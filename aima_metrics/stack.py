"""The local stack: the real Kafka broker and PostgreSQL server (through the scripts in infra/), the
topics, the migrations, and the pipeline's own long-running processes as supervised children.

`up` orders the shutdown itself: its children run in sessions of their own (a Ctrl-C at the terminal reaches
`up` only) and stop when `up` tells them, or when `up` is gone (the kernel's parent-death signal); the
scripts that start the broker and PostgreSQL run in sessions of their own too, ended when a stop comes
while they still start."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil
import psycopg

from aima_metrics.lifecycle import STOP_SIGNALS, SUPERVISOR_ENV
from aima_metrics.settings import StackSettings
from api.config import ApiSettings
from bus.kafka import ensure_topics, wait_for_broker
from bus.settings import REPO_ROOT, Settings
from consumers.migrate import migrate
from consumers.settings import NotifySettings
from producers.settings import CollectorSettings

INFRA = REPO_ROOT / "infra"


class StackError(RuntimeError):
    """A service of the local stack failed to start or stop; the message says which and where to look."""


class Interrupted(Exception):
    """A stop was asked for while the stack was starting; what started so far is to be stopped."""


class StopRequest:
    """What signals tell `up`: the first asks it to stop everything it started; a later one to hurry
    (kill the pipeline processes instead of waiting for them)."""

    def __init__(self) -> None:
        self.why: str | None = None
        self.hurry = False

    @property
    def requested(self) -> bool:
        return self.why is not None

    def request(self, why: str) -> None:
        if self.why is None:
            self.why = why
        else:
            self.hurry = True


class Output:
    """What `up` says, written to its terminal (or pipe) and to a log file. A terminal or pipe that has
    gone away (EPIPE: the reader of the pipe was killed; EIO: the terminal was closed) is silently swapped
    for /dev/null: it must never keep `up` from stopping what it started."""

    _GONE = (errno.EPIPE, errno.EIO, errno.ENXIO, errno.EBADF)

    def __init__(self, log_path: Path | None = None) -> None:
        self._log: TextIO | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("a", buffering=1)

    def __call__(self, text: str = "", err: bool = False) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError, ValueError):
                self._log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        stream = sys.stderr if err else sys.stdout
        try:
            stream.write(text + "\n")
            stream.flush()
        except OSError as exc:
            if exc.errno not in self._GONE:
                raise
            _silence(stream)

    def close(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()


@dataclass(frozen=True)
class Process:
    """A long-running pipeline process that `up` starts: `aima-metrics <args>`."""

    name: str
    args: tuple[str, ...]
    metrics_port: int
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalStackSettings:
    """What the local stack's commands (`up`, `down`, `status`) read beyond :class:`Settings`: their own,
    and the ports and routing of the processes `up` starts, from those processes' own models."""

    stack: StackSettings
    api: ApiSettings
    collectors: CollectorSettings
    notify: NotifySettings

    @classmethod
    def load(cls) -> LocalStackSettings:
        return cls(StackSettings(), ApiSettings(), CollectorSettings(), NotifySettings())


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


def webhook_key(settings: Settings, local: LocalStackSettings) -> str:
    """The key the local notifier signs webhooks with: AIMA_WEBHOOK_KEY, else one generated once and kept
    (readable only by its owner) in the state folder."""
    if local.stack.webhook_key is not None:
        return local.stack.webhook_key.get_secret_value()
    path = settings.state_dir / "webhook" / "key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def processes(settings: Settings, local: LocalStackSettings, gpu: bool | None = None) -> tuple[Process, ...]:
    """The pipeline's long-running processes, each `aima-metrics <args>` with its own self-metrics port
    (``AIMA_PORT_BASE`` + n). Without a GPU the fleet simulator stands in for real GPU samples."""
    base = local.stack.port_base
    exporter = local.collectors.gpu_exporter_port
    gpu = nvml_present() if gpu is None else gpu
    api_port = local.api.port
    receiver_port = base + 9
    receiver_url = f"http://127.0.0.1:{receiver_port}/alerts"
    key = webhook_key(settings, local)
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
                "AIMA_NOTIFY_CONFIG": str(local.notify.config or INFRA / "notify" / "local.yaml"),
                "AIMA_LOCAL_WEBHOOK_URL": receiver_url,
                "AIMA_WEBHOOK_KEY": key,
            },
        ),
        Process(
            "api",
            ("api",),
            base + 4,
            address=f"web console http://127.0.0.1:{api_port}/ui/ (API docs at /docs)",
        ),
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
    if shutil.which("prometheus") is not None:
        listed.append(_prometheus(listed, local))
    return tuple(listed)


def _prometheus(listed: Iterable[Process], local: LocalStackSettings) -> Process:
    """The local Prometheus (aima_metrics/prometheus_local.py): the GPU exporter as the seed's gpu_metrics
    job and every other process's self-metrics port. The GPU collector's own metrics come with its
    exporter's values, so its self-metrics port is not scraped a second time."""
    port = local.stack.prometheus_port
    scrape = [
        f"--scrape={process.name}=127.0.0.1:{process.metrics_port}"
        for process in listed
        if process.name != "gpu-collector"
    ]
    args = (
        "prometheus",
        "--port", str(port),
        "--gpu-exporter", f"127.0.0.1:{local.collectors.gpu_exporter_port}",
        "--retention", local.stack.prometheus_retention,
        *scrape,
    )  # fmt: skip
    return Process("prometheus", args, port, address=f"http://127.0.0.1:{port}")


def script_env(settings: Settings, local: LocalStackSettings) -> dict[str, str]:
    """The environment of the scripts and processes `up` starts: this one's (what the user set reaches
    them), with the values these models resolved (from aima.env too) written out."""
    env = dict(os.environ)
    if local.stack.cache_dir is not None:
        env["AIMA_CACHE_DIR"] = local.stack.cache_dir
    env.update(
        AIMA_KAFKA_HEAP=local.stack.kafka_heap,
        AIMA_KAFKA_START_TIMEOUT_S=str(local.stack.kafka_start_timeout_s),
        AIMA_PG_DB=local.stack.pg_db,
        AIMA_PG_USER=local.stack.pg_user,
        AIMA_STATE_DIR=str(settings.state_dir),
        AIMA_KAFKA_PORT=str(settings.kafka_port),
        AIMA_KAFKA_CONTROLLER_PORT=str(settings.kafka_controller_port),
        AIMA_PG_PORT=str(settings.pg_port),
    )
    return env


def run_script(
    settings: Settings, local: LocalStackSettings, script: str, verb: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INFRA / script), verb],
        env=script_env(settings, local),
        text=True,
        capture_output=True,
        check=False,
    )


def _silence(stream: TextIO) -> None:
    """Point a gone terminal's or pipe's file descriptor at /dev/null, so later writes (and the flush at
    exit) succeed instead of failing again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class Stack:
    def __init__(
        self,
        settings: Settings,
        say: Callable[[str], None] = print,
        stop: StopRequest | None = None,
        local: LocalStackSettings | None = None,
    ) -> None:
        """``local``: the stack's other settings; the commands build them when they start (built from the
        environment here when not given)."""
        self.settings = settings
        self.local = local or LocalStackSettings.load()
        self.say = say
        self.stop = stop or StopRequest()
        self.run_dir = settings.state_dir / "run"
        self.log_dir = settings.state_dir / "logs"

    # ---- external services -------------------------------------------------------------------
    def check_stop(self) -> None:
        """Raises :class:`Interrupted` once a stop was asked for."""
        if self.stop.requested:
            raise Interrupted(self.stop.why)

    def _script(self, script: str, verb: str) -> subprocess.Popen[str]:
        # A session of its own: the terminal's Ctrl-C does not reach the script or what it starts; `up`
        # decides (and, for a start, ends the whole session when a stop comes first).
        return subprocess.Popen(
            [str(INFRA / script), verb],
            env=script_env(self.settings, self.local),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def _finish(self, child: subprocess.Popen[str], interruptible: bool) -> tuple[int, str]:
        """Wait for a script; an interruptible one (a start) is ended, with all it started, on a stop."""
        while True:
            try:
                _out, err = child.communicate(timeout=0.2)
                return child.returncode, err
            except subprocess.TimeoutExpired:
                if interruptible and self.stop.requested:
                    _end_session(child)
                    raise Interrupted(self.stop.why) from None

    def _service(self, script: str, verb: str, what: str) -> None:
        code, err = self._finish(self._script(script, verb), interruptible=verb == "start")
        if code != 0:
            raise StackError(f"{what} {verb} failed:\n{err.strip()}")

    def _wait_for_broker(self, timeout_s: float) -> None:
        from bus.kafka import BrokerUnavailable

        deadline = time.monotonic() + timeout_s
        while True:
            self.check_stop()
            try:
                wait_for_broker(self.settings, timeout_s=min(2.0, max(0.5, deadline - time.monotonic())))
                return
            except BrokerUnavailable:
                if time.monotonic() >= deadline:
                    raise

    def start_services(self) -> str:
        """Kafka, PostgreSQL, topics, migrations; returns the database mode. Raises :class:`Interrupted`
        when a stop is asked for meanwhile."""
        steps = 4
        self.say(f"[1/{steps}] Kafka broker on 127.0.0.1:{self.settings.kafka_port} (KRaft) ...")
        t0 = time.monotonic()
        self._service("kafka/kafka.sh", "start", "Kafka")
        self._wait_for_broker(timeout_s=30)
        self.say(f"      up in {time.monotonic() - t0:.1f} s")
        self.check_stop()
        self.say(f"[2/{steps}] PostgreSQL on 127.0.0.1:{self.settings.pg_port} ...")
        self._service("postgres/postgres.sh", "start", "PostgreSQL")
        self.check_stop()
        self.say(f"[3/{steps}] topics ...")
        created = ensure_topics(self.settings)
        self.say(f"      created {len(created)}: {', '.join(created)}" if created else "      all present")
        self.check_stop()
        self.say(f"[4/{steps}] database migrations ...")
        with psycopg.connect(self.settings.database_dsn(), connect_timeout=10) as conn:
            report = migrate(conn)
        self.say(f"      mode {report.mode}; applied {len(report.applied)}, already {len(report.already)}")
        return report.mode

    def stop_services(self) -> None:
        """PostgreSQL and Kafka, side by side (each script bounds its own wait)."""
        self.say("stopping PostgreSQL and Kafka ...")
        children = {
            what: self._script(script, "stop")
            for what, script in (("PostgreSQL", "postgres/postgres.sh"), ("Kafka", "kafka/kafka.sh"))
        }
        failed = []
        for what, child in children.items():
            code, err = self._finish(child, interruptible=False)
            if code != 0:
                failed.append(f"{what} stop failed:\n{err.strip()}")
        if failed:
            raise StackError("\n".join(failed))

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
        env = (
            script_env(self.settings, self.local)
            | process.env
            | {"AIMA_METRICS_PORT": str(process.metrics_port)}
        )
        env[SUPERVISOR_ENV] = str(os.getpid())
        # The child starts with the stop signals blocked (the mask survives exec): a stop sent while its
        # interpreter still starts stays pending until its handlers are in place and it unblocks them
        # (aima_metrics.lifecycle), instead of killing it before it can stop cleanly.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            with open(self.log_dir / f"{process.name}.log", "ab") as out:
                child = subprocess.Popen(
                    [sys.executable, "-m", "aima_metrics", *process.args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._pidfile(process.name).write_text(str(child.pid))
        return child.pid

    def stop_process(self, name: str, timeout_s: float = 30.0) -> None:
        self.stop_processes([name], timeout_s)

    def stop_processes(self, names: Iterable[str], timeout_s: float | None = None) -> None:
        """SIGTERM to each at once; SIGKILL to those still there after ``timeout_s`` (default: the stop
        bound and a little more, as the processes end themselves at the bound) or once a second stop
        request says to hurry."""
        if timeout_s is None:
            timeout_s = self.settings.stop_timeout_s + 2.0
        pids: dict[str, int] = {}
        for name in names:
            if (pid := self.pid_of(name)) is None:
                self._pidfile(name).unlink(missing_ok=True)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            pids[name] = pid
        deadline = time.monotonic() + timeout_s
        while pids and time.monotonic() < deadline and not self.stop.hurry:
            for name, pid in list(pids.items()):
                if not _alive(pid):
                    self._pidfile(name).unlink(missing_ok=True)
                    del pids[name]
            time.sleep(0.1)
        for name, pid in pids.items():
            if _alive(pid):
                why = "asked to hurry" if self.stop.hurry else f"did not stop within {timeout_s:.0f} s"
                self.say(f"{name} {why}; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _alive(pid):
                    time.sleep(0.05)
            self._pidfile(name).unlink(missing_ok=True)

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> list[tuple[str, bool, str]]:
        rows = []
        for name, script in (("kafka", "kafka/kafka.sh"), ("postgres", "postgres/postgres.sh")):
            result = run_script(self.settings, self.local, script, "status")
            words = result.stdout.split()
            rows.append((name, result.returncode == 0, " ".join(words[1:])))
        for process in processes(self.settings, self.local, gpu=self.pid_of("simulator") is None):
            pid = self.pid_of(process.name)
            where = process.address or f"metrics http://127.0.0.1:{process.metrics_port}/metrics"
            rows.append((process.name, pid is not None, f"{where} pid={pid}" if pid else where))
        supervisor = self.pid_of("up")
        rows.append(("supervisor", supervisor is not None, f"pid={supervisor}" if supervisor else "-"))
        return rows


def _end_session(child: subprocess.Popen[str]) -> None:
    """SIGTERM to a starting script's whole session (it leads it: the script, its probes, the server it
    launched), and SIGKILL to the script if it is still there after 10 s. A server it launched is then
    stopped by its own script's ``stop`` (by pidfile), which waits for a clean shutdown."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


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
