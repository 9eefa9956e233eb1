"""`aima-metrics up` stops everything it started however it is ended (issue 18): Ctrl-C with its output
piped into a reader that Ctrl-C killed first (SIGINT to the whole foreground group, writes hitting a
broken pipe), SIGTERM while it is still starting, SIGHUP once its terminal is gone. Afterwards no process
it started runs (by pid, and by the ports they listened on).

One test, three runs of `up` on one state folder (the second and third start faster), on ports of their
own; the stop bound is 10 s, so a hung child would show as a kill in the log."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from aima_metrics.stack import INFRA
from tests.private_stack import free_port, free_port_block

pytestmark = pytest.mark.integration

STOP_TIMEOUT_S = 10.0
START_DEADLINE_S = 300.0
UP = [sys.executable, "-m", "aima_metrics", "up"]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def state() -> Iterator[tuple[Path, dict[str, str]]]:
    # The PostgreSQL server runs as the 'postgres' user, which must reach the state folder.
    folder = Path(tempfile.mkdtemp(prefix="aima-up-stop-"))
    folder.chmod(0o755)
    base = free_port_block()
    env = dict(
        os.environ,
        AIMA_STATE_DIR=str(folder),
        AIMA_CACHE_DIR=str(INFRA.parent / ".aima" / "cache"),
        AIMA_KAFKA_PORT=str(free_port()),
        AIMA_KAFKA_CONTROLLER_PORT=str(free_port()),
        AIMA_KAFKA_HEAP="384m",
        AIMA_KAFKA_START_TIMEOUT_S="180",
        AIMA_PG_PORT=str(free_port()),
        AIMA_PORT_BASE=str(base),
        AIMA_API_PORT=str(free_port()),
        AIMA_GPU_EXPORTER_PORT=str(free_port()),
        AIMA_PROMETHEUS_PORT=str(free_port()),
        AIMA_STOP_TIMEOUT_S=str(STOP_TIMEOUT_S),
        AIMA_SIM_RATE_HZ="5",
    )
    for name in ("AIMA_KAFKA_BOOTSTRAP", "AIMA_DATABASE_URL", "AIMA_TOPIC_PREFIX", "AIMA_METRICS_PORT"):
        env.pop(name, None)
    try:
        yield folder, env
    finally:
        for script in ("kafka/kafka.sh", "postgres/postgres.sh"):
            subprocess.run([INFRA / script, "stop"], env=env, capture_output=True, check=False)
        datadir = folder / "postgres" / "datadir"
        if datadir.exists():
            outside = Path(datadir.read_text().strip())
            if outside.is_dir() and not outside.is_relative_to(folder):
                shutil.rmtree(outside, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def _ports(env: dict[str, str]) -> dict[str, int]:
    base = int(env["AIMA_PORT_BASE"])
    ports = {f"metrics {base + i}": base + i for i in range(1, 10)}
    for name in (
        "AIMA_KAFKA_PORT",
        "AIMA_KAFKA_CONTROLLER_PORT",
        "AIMA_PG_PORT",
        "AIMA_API_PORT",
        "AIMA_PROMETHEUS_PORT",
    ):
        ports[name] = int(env[name])
    return ports


def _wait_for(path: Path, text: str, up: subprocess.Popen[bytes], since: int = 0) -> None:
    """Until ``text`` is in the file after offset ``since`` (a later run's own lines)."""
    deadline = time.monotonic() + START_DEADLINE_S
    while text not in (written := _read(path)[since:]):
        assert up.poll() is None, f"up ended early:\n{written}"
        assert time.monotonic() < deadline, f"no {text!r} within {START_DEADLINE_S} s:\n{written}"
        time.sleep(0.25)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _started(folder: Path) -> dict[str, int]:
    """The pids of what `up` started: its children (pidfiles), the broker, the PostgreSQL server."""
    pids = {}
    for pidfile in (folder / "run").glob("*.pid"):
        if pidfile.stem != "up":
            pids[pidfile.stem] = int(pidfile.read_text())
    kafka = folder / "kafka" / "kafka.pid"
    if kafka.exists():
        pids["kafka"] = int(kafka.read_text())
    datadir = folder / "postgres" / "datadir"
    if datadir.exists():
        postmaster = Path(datadir.read_text().strip()) / "postmaster.pid"
        if postmaster.exists():
            pids["postgres"] = int(postmaster.read_text().split()[0])
    return pids


def _leftovers(folder: Path, pids: dict[str, int], env: dict[str, str]) -> list[str]:
    """What still runs: a pid from ``pids``, any process started with this state folder in its
    environment or command line, or a listener on one of the stack's ports."""
    left = [f"{name} pid {pid}" for name, pid in pids.items() if _running(pid)]
    marker = str(folder)
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            environ = process.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if process.pid != os.getpid() and (marker in cmdline or environ.get("AIMA_STATE_DIR") == marker):
            left.append(f"pid {process.pid}: {cmdline}")
    left += [f"{name} still listening" for name, port in _ports(env).items() if _listening(port)]
    return left


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stopped_by(folder: Path, name: str) -> list[str]:
    """The signals a child's log says it was asked to stop by."""
    signals = []
    for line in (folder / "logs" / f"{name}.log").read_text().splitlines():
        if line.startswith("{") and '"stop requested' in line:
            signals.append(json.loads(line).get("signal"))
    return signals


def _ended(up: subprocess.Popen[bytes], signalled: float, folder: Path, since: int = 0) -> float:
    # Children stop within the bound, then PostgreSQL and Kafka: generous, as the machine is shared.
    code = up.wait(timeout=STOP_TIMEOUT_S + 120)
    took = time.monotonic() - signalled
    log = _read(folder / "logs" / "up.log")[since:]
    assert code == 0, log
    assert "stopped." in log
    assert "killing it" not in log, log  # every child stopped by itself, within the bound
    return took


def test_up_stops_everything_it_started_however_it_is_ended(
    state: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    folder, env = state
    up_log = folder / "logs" / "up.log"
    took: dict[str, float] = {}

    # 1. `aima-metrics up 2>&1 | tee up.log`, then Ctrl-C: the terminal's SIGINT reaches the whole
    #    foreground group, tee dies of it first, and every later write of up's meets a broken pipe.
    mark = 0
    teed = tmp_path / "tee.log"
    tee = subprocess.Popen(
        ["tee", str(teed)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, process_group=0
    )
    assert tee.stdin is not None
    up = subprocess.Popen(UP, env=env, stdout=tee.stdin, stderr=subprocess.STDOUT, process_group=tee.pid)
    tee.stdin.close()
    try:
        _wait_for(up_log, "ready.", up)
        assert "ready." in teed.read_text()
        pids = _started(folder)
        assert {"stream", "sink", "api", "simulator", "kafka", "postgres"} <= set(pids), pids
        # Ctrl-C once the children are at work (run 3 signals right at "ready.", while they still load).
        for name in ("sink", "notify", "api", "simulator", "system-collector", "webhook-receiver"):
            _wait_for(folder / "logs" / f"{name}.log", '"msg": "started"', up)
        tee.kill()
        tee.wait()
        signalled = time.monotonic()
        os.killpg(tee.pid, signal.SIGINT)
        took["SIGINT, output pipe broken"] = _ended(up, signalled, folder, mark)
    finally:
        if up.poll() is None:
            up.kill()
    assert "SIGINT received: stopping" in up_log.read_text()
    assert not _leftovers(folder, pids, env), _leftovers(folder, pids, env)
    # The terminal's SIGINT did not reach the children: each was stopped by up, with SIGTERM.
    for name in ("sink", "api", "simulator", "webhook-receiver", "system-collector", "gpu-collector"):
        log = (folder / "logs" / f"{name}.log").read_text()
        assert _stopped_by(folder, name)[-1:] == ["SIGTERM"], f"{name}:\n{log[-3000:]}"
    assert "SIGINT" not in (folder / "logs" / "stream.log").read_text()

    # 2. SIGTERM while up is still starting (its children being started).
    mark = len(_read(up_log))
    up = subprocess.Popen(
        UP, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _wait_for(up_log, "starting api", up, since=mark)
        pids = _started(folder)
        signalled = time.monotonic()
        up.send_signal(signal.SIGTERM)
        took["SIGTERM while starting"] = _ended(up, signalled, folder, mark)
    finally:
        if up.poll() is None:
            up.kill()
    assert "SIGTERM received: stopping" in _read(up_log)[mark:]
    pids |= {k: v for k, v in _started(folder).items() if k not in pids}
    assert not _leftovers(folder, pids, env), _leftovers(folder, pids, env)

    # 3. The terminal closes: its end of the pty goes away (writes fail with EIO), then SIGHUP.
    mark = len(_read(up_log))
    master, slave = pty.openpty()
    up = subprocess.Popen(
        UP, env=env, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, start_new_session=True
    )
    os.close(slave)
    os.set_blocking(master, False)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while "ready." not in _read(up_log)[mark:]:
            assert up.poll() is None and time.monotonic() < deadline, _read(up_log)[mark:]
            try:  # keep reading, as a terminal does, so that up never blocks on a full pty
                os.read(master, 65536)
            except OSError:
                time.sleep(0.25)
        pids = _started(folder)
        os.close(master)
        signalled = time.monotonic()
        up.send_signal(signal.SIGHUP)
        took["SIGHUP, terminal gone"] = _ended(up, signalled, folder, mark)
    finally:
        if up.poll() is None:
            up.kill()
    assert "SIGHUP received: stopping" in _read(up_log)[mark:]
    assert not _leftovers(folder, pids, env), _leftovers(folder, pids, env)

    print("up stop times (s):", {how: round(s, 1) for how, s in took.items()})
