"""Encryption in transit and authentication on every hop (P2), through the real path: a broker whose only
client listener is SASL_SSL (SCRAM-SHA-512), PostgreSQL that accepts TCP only over TLS, the API over
HTTPS, all with certificates of a CA the test session makes (tests/tls_stack.py, tests/tls.py).

The pipeline's own processes, configured only by the AIMA_* variables the README names, carry records the
whole way: a collector (``aima-metrics collect system --once``) and the Publisher (confluent-kafka) ->
broker -> the stream worker (``python -m streams.main``: aiokafka under Faust) -> broker -> the sink
(``aima-metrics sink``) and the notifier (``aima-metrics notify``) -> PostgreSQL at verify-full -> the API
(``aima-metrics api`` over HTTPS). Then plaintext (and unauthenticated, and unverified) attempts against each
TLS-only listener are refused. The negotiated protocol and cipher of each hop are printed (``-s``) and kept
as the ``tls_handshakes`` property."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bus.kafka import client_config, ensure_topics
from bus.settings import REPO_ROOT, Settings
from consumers.migrate import migrate
from producers.publisher import Publisher
from tests.integration.ledger_parts import Proc, Receiver, wait_for
from tests.private_stack import free_port
from tests.tls import TestCA
from tests.tls_stack import TlsStack

pytestmark = pytest.mark.integration

WEBHOOK_KEY = "tls-webhook-key"
NOTIFY_CONFIG = """
delivery: {max_attempts: 100, initial_backoff: 1s, max_backoff: 5s, max_elapsed: 10m, timeout: 5s}
route:
  receiver: tls
  group_by: ["..."]
  group_wait: 0s
  group_interval: 5s
  repeat_interval: 24h
receivers:
  - name: tls
    webhook: {url_env: TLS_WEBHOOK_URL, hmac_key_env: AIMA_WEBHOOK_KEY}
"""


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    stack = TlsStack(tmp_path_factory.mktemp("tls"))
    try:
        yield stack.start()
    finally:
        stack.close()


def _handshake(port: int, ca: Path) -> tuple[str, str]:
    """(protocol, cipher) a verifying TLS client negotiates with the listener on ``port``."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return str(tls.version()), cipher[0]


def _kafka_errors(settings: Settings) -> list[KafkaError]:
    """The errors a client with ``settings`` meets asking the broker for metadata, which must fail."""
    errors: list[KafkaError] = []
    # log_level 0: the refusals come through error_cb; librdkafka would also print each one to stderr.
    client = AdminClient(
        client_config(settings, error_cb=errors.append, log_level=0, **{"reconnect.backoff.ms": 500})
    )
    with pytest.raises(KafkaException):
        client.list_topics(timeout=8)
    client.poll(1)  # serves the error callbacks still queued
    return errors


def test_plaintext_unauthenticated_and_unverified_clients_are_refused(
    tls_stack: TlsStack, tmp_path: Path
) -> None:
    good = tls_stack.settings()
    # Kafka: a plaintext client gets no answer from the SASL_SSL listener (the broker drops the connection
    # when what arrives is not a TLS handshake).
    plaintext = _kafka_errors(good.model_copy(update={"kafka_security_protocol": "PLAINTEXT"}))
    assert {e.code() for e in plaintext} & {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}, plaintext
    # TLS without SASL: the broker expects a SASL handshake first and drops the connection.
    no_sasl = _kafka_errors(good.model_copy(update={"kafka_security_protocol": "SSL"}))
    assert {e.code() for e in no_sasl} & {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}, no_sasl
    wrong = _kafka_errors(good.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")}))
    assert KafkaError._AUTHENTICATION in {e.code() for e in wrong}, wrong
    stranger = TestCA.create(tmp_path / "stranger", "a CA nobody trusts")
    unverified = _kafka_errors(good.model_copy(update={"kafka_ssl_ca_location": stranger.ca_pem}))
    assert KafkaError._SSL in {e.code() for e in unverified}, unverified

    # PostgreSQL: plain TCP is refused by pg_hba, and verify-full refuses a server its CA did not sign.
    base = tls_stack.database_url.split("?", 1)[0]
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(f"{base}?sslmode=disable", connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(f"{base}?sslmode=verify-full&sslrootcert={stranger.ca_pem}", connect_timeout=10)
    with psycopg.connect(tls_stack.database_url, connect_timeout=10) as conn:
        assert conn.info.pgconn.ssl_in_use


def _api_get(port: int, path: str, ca: Path, token: str) -> httpx.Response:
    return httpx.get(
        f"https://127.0.0.1:{port}{path}",
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=30,
    )


def test_every_hop_speaks_tls_through_the_real_path(
    tls_stack: TlsStack, tmp_path: Path, record_property: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tls_stack.settings()
    ensure_topics(settings)
    with psycopg.connect(tls_stack.database_url, autocommit=True) as conn:
        migrate(conn)
    receiver = Receiver(WEBHOOK_KEY)
    notify = tmp_path / "notify.yaml"
    notify.write_text(NOTIFY_CONFIG)
    api_port = free_port()
    base = tls_stack.env(
        PYTHONPATH=str(REPO_ROOT),
        AIMA_METRICS_PORT="0",
        AIMA_STREAMS_APP_ID="tls-streams",
        AIMA_STREAMS_SESSION_TIMEOUT_S="10",
        AIMA_STREAMS_LOG_LEVEL="info",
        AIMA_NOTIFY_CONFIG=str(notify),
        AIMA_WEBHOOK_KEY=WEBHOOK_KEY,
        TLS_WEBHOOK_URL=receiver.url,
        AIMA_API_PORT=str(api_port),
        AIMA_API_TLS_CERT=str(tls_stack.api_cert.cert),
        AIMA_API_TLS_KEY=str(tls_stack.api_cert.key),
    )

    def proc(name: str, *args: str, **env: str) -> Proc:
        return Proc(name, list(args), dict(base, **env), tmp_path / f"{name}.log")

    # The notifier's pool names no application; the DSN does, so pg_stat_ssl below can tell it apart.
    notify_dsn = f"{tls_stack.database_url}&application_name=aima-notify"
    procs = [
        proc("stream", "streams.main", AIMA_STATE_DIR=str(tmp_path / "stream")),
        proc("sink", "aima_metrics", "sink"),
        proc("notify", "aima_metrics", "notify", AIMA_DATABASE_URL=notify_dsn),
        proc("api", "aima_metrics", "api"),
    ]
    try:
        for p in procs:
            p.start()
        made = subprocess.run(
            [sys.executable, "-m", "aima_metrics", "token", "create", "--role", "admin",
             "--scope", "metrics:read:*", "--name", "tls"],
            env=base, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        ca = tls_stack.ca.ca_pem
        wait_for(lambda: _api_get(api_port, "/healthz", ca, token).status_code == 200, 180, "the API", procs)
        stream = procs[0]
        wait_for(lambda: b"Ready" in stream.log.read_bytes(), 300, "the stream worker", procs)

        # Producers: the Publisher in this process, and a collector process configured by the environment.
        host = f"tls-{time.time_ns()}"
        moment = datetime.now(UTC).replace(microsecond=0)
        # librdkafka's security debug lines (through the Publisher's logger) show its side of the handshake.
        caplog.set_level(logging.DEBUG, logger="librdkafka.tls")
        debug = settings.model_copy(update={"kafka_debug": "security"})
        publisher = Publisher(debug, registry=CollectorRegistry(), source="tls")
        sample = {"time": moment, "host": host, "gpu": 0, "gpu_uuid": f"GPU-{host}", "gpu_model": "NVIDIA L4",
                  "source": "tls", "interval_group": "fast", "utilization_percent": 50.0,
                  "temperature_celsius": 97.0}  # fmt: skip
        assert publisher.publish("gpu.samples", f"{host}/GPU-{host}", "GpuSample", sample)
        assert publisher.flush(120) == 0 and publisher.failed == 0
        librdkafka = [r.getMessage() for r in caplog.records if r.name == "librdkafka.tls"]
        assert any("Broker SSL certificate verified" in line for line in librdkafka), librdkafka[-20:]
        assert any("SCRAM authentication successful" in line for line in librdkafka), librdkafka[-20:]
        collected = subprocess.run(
            [sys.executable, "-m", "aima_metrics", "collect", "system", "--once"],
            env=base, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert collected.returncode == 0, collected.stderr[-3000:]

        def query(text: str, *params: Any) -> list[tuple[Any, ...]]:
            with psycopg.connect(tls_stack.database_url, autocommit=True, connect_timeout=10) as conn:
                return conn.execute(text, params).fetchall()

        # The sink stored the producers' samples, and the worker's alert (raised by the 97 °C sample).
        wait_for(lambda: query("SELECT 1 FROM gpu_samples WHERE host = %s", host) != [], 300, "GPU", procs)
        wait_for(lambda: query("SELECT 1 FROM system_samples") != [], 300, "the collector's row", procs)
        wait_for(
            lambda: query("SELECT 1 FROM alert_history WHERE labels->>'host' = %s", host) != [],
            300, "the alert row", procs,
        )  # fmt: skip

        # The notifier read the alert and delivered it (and logged it in the database over TLS).
        def announced() -> bool:
            return any(
                c.status == 200 and c.valid and any(a["labels"].get("host") == host for a in c.alerts)
                for c in receiver.snapshot()
            )

        wait_for(announced, 300, "the alert's webhook", procs)

        # The API serves what the sink stored, over HTTPS.
        raw = _api_get(api_port, f"/metrics/raw/gpu_temperature_celsius?labels=host={host}", ca, token)
        assert raw.status_code == 200, raw.text
        assert [s["value"] for s in raw.json()["samples"]] == [97.0]

        # Every database session of the pipeline's processes is a TLS one.
        sessions = query(
            """SELECT a.application_name, s.ssl, s.version, s.cipher
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                WHERE a.usename = current_user AND a.pid <> pg_backend_pid()"""
        )
        by_app = {app: (on, version, cipher) for app, on, version, cipher in sessions}
        assert {"aima-sink", "aima-api", "aima-notify"} <= set(by_app), sessions
        assert all(on for _, on, _, _ in sessions), sessions

        # A plaintext request to the HTTPS port gets no answer, and nor does a client that does not
        # trust the stack's CA.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{api_port}/healthz", timeout=10)

        handshakes = {
            "kafka (librdkafka: the Publisher)": "certificate verified, SCRAM-SHA-512 authenticated",
            "kafka (Python's ssl, as aiokafka)": " ".join(_handshake(tls_stack.kafka_port, ca)),
            "api (HTTPS)": " ".join(_handshake(api_port, ca)),
            **{f"postgresql ({app})": f"{v} {c}" for app, (_, v, c) in sorted(by_app.items()) if app},
        }
        for hop, seen in handshakes.items():
            print(f"[tls] {hop}: {seen}", flush=True)
        record_property("tls_handshakes", json.dumps(handshakes))
        assert all(seen.startswith("TLSv1.") for hop, seen in handshakes.items() if "librdkafka" not in hop)
    finally:
        for p in procs:
            p.terminate()
        receiver.close()
