"""The probes every long-running process serves on its metrics port (bus/health.py): real HTTP requests to
a real server, checks against real sockets (one listening, one closed)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from bus.health import HealthServer, Unreachable, database_check, kafka_check, tcp_check


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ready_while_every_dependency_answers_and_not_once_one_does_not(listener: int) -> None:
    registry = CollectorRegistry()
    Counter("probe_test_things", "things", registry=registry).inc(3)
    stopping = threading.Event()
    checks = {"kafka": kafka_check(f"127.0.0.1:{listener}")}
    server = HealthServer(registry, checks, stopping, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/healthz") == (200, b'{"status": "ok"}')
        code, body = _get(f"{base}/readyz")
        assert code == 200 and json.loads(body) == {"status": "ready", "checks": {"kafka": "ok"}}
        code, body = _get(f"{base}/metrics")
        assert code == 200 and b"probe_test_things_total 3.0" in body

        closed = _closed_port()
        checks["database"] = database_check(f"postgresql://aima:secret@127.0.0.1:{closed}/aima")
        code, body = _get(f"{base}/readyz")
        answer = json.loads(body)
        assert code == 503 and answer["status"] == "unavailable"
        assert answer["checks"]["kafka"] == "ok"
        assert f"database unreachable at 127.0.0.1:{closed}" in answer["checks"]["database"]
        assert "secret" not in body.decode()  # the DSN's password never reaches the probe's answer
        assert _get(f"{base}/healthz")[0] == 200  # alive all the same: restarting would not help

        del checks["database"]
        stopping.set()
        code, body = _get(f"{base}/readyz")
        assert code == 503 and json.loads(body)["status"] == "stopping"
    finally:
        server.close()


def test_bootstrap_lists_and_dsns_give_the_addresses_checked(listener: int, tmp_path: Path) -> None:
    closed = _closed_port()
    # Any one bootstrap server answering is enough, as for a Kafka client.
    kafka_check(f"127.0.0.1:{closed},SASL_SSL://127.0.0.1:{listener}")()
    with pytest.raises(Unreachable) as caught:
        kafka_check(f"127.0.0.1:{closed}")()
    assert caught.value.addresses == [("127.0.0.1", closed)]
    database_check(f"host=127.0.0.1 port={listener} dbname=aima user=aima")()
    database_check(f"postgresql://aima@127.0.0.1:{closed},127.0.0.1:{listener}/aima")()
    with pytest.raises(Unreachable):
        tcp_check("x", [("127.0.0.1", closed)], timeout_s=1)()
    # A Unix-socket DSN: the socket file libpq would use.
    path = tmp_path / f".s.PGSQL.{listener}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen(1)
    try:
        database_check(f"host={tmp_path} port={listener} dbname=aima")()
    finally:
        unix.close()
    with pytest.raises(Unreachable):
        database_check(f"host={tmp_path} port={listener} dbname=aima")()
