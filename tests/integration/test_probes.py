"""The probes Kubernetes uses (infra/k8s): a real `aima-metrics sink` process against the session's broker
and a PostgreSQL of the test's own, whose outage turns /readyz to 503 (naming the database) while /healthz
stays 200, and back to 200 once it is up again; a collector whose broker is unreachable is alive but not
ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from consumers.migrate import migrate
from tests.private_stack import PrivateStack, free_port

pytestmark = pytest.mark.integration

DEADLINE_S = 120.0


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_for(url: str, code: int, process: subprocess.Popen[bytes], log: Path) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    last: object = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ended early:\n{log.read_text()[-3000:]}"
        try:
            got, body = _get(url)
            if got == code:
                return body
            last = (got, body)
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{url}: no {code} within {DEADLINE_S}s (last: {last})\n{log.read_text()[-3000:]}")


def _launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aima_metrics", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_sink_readiness_follows_its_database(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    stack = PrivateStack(tmp_path / "private", kafka=False).start()
    process = None
    try:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            migrate(conn)
        port = free_port()
        env = stack.process_env(
            AIMA_TOPIC_PREFIX=f"t{unique}.", AIMA_METRICS_PORT=str(port), AIMA_STOP_TIMEOUT_S="15"
        )
        env["AIMA_KAFKA_BOOTSTRAP"] = kafka_bootstrap  # the session's broker: only the database goes away
        log = tmp_path / "sink.log"
        process = _launch(["sink", "--batch-timeout-s", "0.2"], env, log)
        base = f"http://127.0.0.1:{port}"
        body = _wait_for(f"{base}/readyz", 200, process, log)
        assert body == {"status": "ready", "checks": {"kafka": "ok", "database": "ok"}}
        assert _get(f"{base}/healthz")[0] == 200

        stack.stop_postgres()
        body = _wait_for(f"{base}/readyz", 503, process, log)
        assert body["checks"]["kafka"] == "ok"
        assert body["checks"]["database"].startswith("database unreachable at 127.0.0.1:")
        assert _get(f"{base}/healthz")[0] == 200  # alive: the sink retries, a restart would not help

        stack.start_postgres()
        _wait_for(f"{base}/readyz", 200, process, log)
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
            assert b"aima_service_up" in answer.read()
    finally:
        if process is not None:
            _stop(process)
        stack.close()


def test_a_collector_without_its_broker_is_alive_but_not_ready(tmp_path: Path) -> None:
    port, broker = free_port(), free_port()
    env = dict(
        os.environ,
        AIMA_KAFKA_BOOTSTRAP=f"127.0.0.1:{broker}",
        AIMA_METRICS_PORT=str(port),
        AIMA_STATE_DIR=str(tmp_path / "state"),
        AIMA_STOP_TIMEOUT_S="10",
    )
    log = tmp_path / "collect.log"
    process = _launch(["collect", "system"], env, log)
    try:
        body = _wait_for(f"http://127.0.0.1:{port}/readyz", 503, process, log)
        assert body["status"] == "unavailable"
        assert body["checks"]["kafka"].startswith(f"kafka unreachable at 127.0.0.1:{broker}")
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        _stop(process)
