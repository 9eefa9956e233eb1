"""The notifier against the real broker and PostgreSQL, delivering to real local receivers: an HTTP server
that records every request and can answer 500 or hang (webhook, Slack, Teams, SMS gateway, Apprise's JSON
endpoint), and aiosmtpd with STARTTLS and AUTH for email. (The live alert feed is the API's, tested in
test_api.py.)"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.runtime import Service
from bus.settings import Settings
from bus.silences import create_silence, delete_silence, list_silences
from bus.topics import topic_name
from consumers.notify.config import NotifyConfig, parse
from consumers.notify.notifier import run
from tests.integration.test_sink_produce_errors import set_max_message_bytes

pytestmark = pytest.mark.integration

KEY = "test-hmac-key"
SMTP_USER, SMTP_PASSWORD = "aima", "smtp-secret"
SMS_SID, SMS_TOKEN = "AC0123", "sms-token"
FAST_RETRY = {"max_attempts": 100, "initial_backoff": "200ms", "max_backoff": "2s", "max_elapsed": "2m"}


# -- a recording HTTP receiver -----------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int
    """What was answered; 0 for a request left hanging past the client's timeout."""

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Answers 200 (Teams: 202, SMS: 201) unless a path's behaviour says 500, 400 or 'hang'."""

    def __init__(self, hang_s: float = 3.0) -> None:
        self.requests: list[Request] = []
        self.behaviour: dict[str, Callable[[], int | str]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = receiver.behaviour.get(self.path, lambda: 200)()
                status = 0 if action == "hang" else int(action)
                if action == "hang":
                    time.sleep(hang_s)
                with receiver.lock:
                    receiver.requests.append(
                        Request(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.time(),
                            status,
                        )
                    )
                answer = status or 200
                if answer == 200 and self.path.startswith("/teams"):
                    answer = 202
                if answer == 200 and self.path.startswith("/sms"):
                    answer = 201
                try:
                    self.send_response(answer)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"sid": "SM1"}' if answer < 300 else b'{"error": "nope"}')
                except OSError:
                    pass  # the client gave up (timeout)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # the default backlog of 5 drops SYNs when channels post at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def seen(self, path: str, accepted_only: bool = True) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and (r.status in (200,) or not accepted_only)]

    def wait_for(
        self, path: str, count: int = 1, timeout_s: float = 30.0, accepted_only: bool = True
    ) -> list[Request]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(found := self.seen(path, accepted_only)) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(
            f"{path}: {len(self.seen(path, accepted_only))} requests, wanted {count}: {self.requests}"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


# -- an SMTP server with STARTTLS --------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    import ipaddress

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: bytes | None


class SmtpServer:
    def __init__(self, directory: Path) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.cert, key = _self_signed(directory)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, key)
        self.mails: list[Mail] = []
        server = self

        class Handler:
            async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
                login = session.auth_data.login if session.auth_data else None
                server.mails.append(
                    Mail(
                        envelope.mail_from,
                        list(envelope.rcpt_tos),
                        envelope.content,
                        session.ssl is not None,
                        login,
                    )
                )
                return "250 OK"

        def authenticator(smtp: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = data.login == SMTP_USER.encode() and data.password == SMTP_PASSWORD.encode()
            return AuthResult(success=ok, handled=False, auth_data=data)

        self.port = _free_port()
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            tls_context=context,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
        )
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the notifier in a thread, alerts in, config ------------------------------------------------------------


class RunningNotifier:
    def __init__(self, settings: Settings, config: NotifyConfig, schema: str, group_id: str) -> None:
        self.registry = CollectorRegistry()
        self.service = Service("notify-test", settings, registry=self.registry)
        self.error: BaseException | None = None

        def target() -> None:
            try:
                run(settings, service=self.service, config=config, schema=schema, group_id=group_id)
            except BaseException as exc:
                self.error = exc
                raise

        self.thread = threading.Thread(target=target, daemon=True, name=f"notifier-{group_id}")
        self.thread.start()

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.service.stopping.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the notifier did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def start(topics: Settings, db_schema: str, unique: str) -> Iterator[Callable[..., RunningNotifier]]:
    started: list[RunningNotifier] = []

    def starter(config: NotifyConfig, group_id: str | None = None) -> RunningNotifier:
        notifier = RunningNotifier(topics, config, db_schema, group_id or f"notify-{unique}")
        started.append(notifier)
        return notifier

    yield starter
    for notifier in started:
        if notifier.thread.is_alive():
            notifier.stop()


def config(
    receivers: list[dict[str, Any]], route: dict[str, Any] | None = None, **extra: Any
) -> NotifyConfig:
    env = {"HOOK_KEY": KEY, "SMTP_PASSWORD": SMTP_PASSWORD, "SMS_TOKEN": SMS_TOKEN}
    data = {
        "route": {
            "receiver": receivers[0]["name"],
            "group_by": ["..."],
            "group_wait": "0s",
            "group_interval": "1s",
            **(route or {}),
        },
        "receivers": receivers,
        "delivery": {**FAST_RETRY, "timeout": "2s"},
        "external_url": "http://aima.test",
        **extra,
    }
    return parse(data, environ=env, source="test")


def webhook(url: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "hmac_key_env": "HOOK_KEY", **extra}


def alert_event(host: str = "gpu-1", status: str = "firing", **overrides: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    event = {
        "fingerprint": uuid.uuid4().hex[:16],
        "rule": "GpuTemperatureHigh",
        "status": status,
        "severity": "critical",
        "starts_at": now,
        "ends_at": now if status == "resolved" else None,
        "event_time": now,
        "value": 91.0,
        "labels": {"host": host, "gpu": "0", "gpu_model": "H100"},
        "annotations": {"summary": f"GPU 0 on {host} is at 91 °C", "runbook_url": "https://runbooks/gpu-hot"},
        "channels": [],
        "source": "test",
    }
    event.update(overrides)
    return event


def produce(settings: Settings, *events: dict[str, Any]) -> None:
    codec = Codec()
    topic = topic_name(settings, "alerts")
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for event in events:
        producer.produce(topic, key=event["fingerprint"].encode(), value=codec.encode("AlertEvent", event))
    assert producer.flush(30) == 0


def committed_and_end(settings: Settings, group_id: str) -> tuple[int, int]:
    """Sum of committed offsets of the group and sum of end offsets, over the alerts topic."""
    topic = topic_name(settings, "alerts")
    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group_id})
    try:
        partitions = [
            TopicPartition(topic, p) for p in probe.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        committed = sum(max(tp.offset, 0) for tp in probe.committed(partitions, timeout=10))
        end = sum(probe.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions)
    finally:
        probe.close()
    return committed, end


def wait_committed(settings: Settings, group_id: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        committed, end = committed_and_end(settings, group_id)
        if committed == end:
            return
        time.sleep(0.2)
    raise AssertionError(f"offsets of {group_id} not committed: {committed_and_end(settings, group_id)}")


def verified(request: Request) -> dict[str, Any]:
    expected = "sha256=" + hmac.new(KEY.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["x-aima-signature"], expected)
    assert abs(int(request.headers["x-aima-timestamp"]) - time.time()) < 120
    return request.json()


def log_rows(db: psycopg.Connection, fingerprint: str) -> dict[str, tuple[str, int]]:
    rows = db.execute(
        "SELECT channel, outcome, attempts FROM notification_log WHERE fingerprint = %s", (fingerprint,)
    ).fetchall()
    return {channel: (outcome, attempts) for channel, outcome, attempts in rows}


# -- the tests ---------------------------------------------------------------------------------------------


def test_every_channel_delivers(
    start: Callable[..., RunningNotifier],
    topics: Settings,
    receiver: Receiver,
    tmp_path: Path,
    db: psycopg.Connection,
    unique: str,
) -> None:
    smtp = SmtpServer(tmp_path)
    channels: dict[str, Any] = {
        "webhook": webhook(receiver.url("/hook")),
        "slack": {"url": receiver.url("/slack/T000/B000/XXXX"), "channel": "#gpu"},
        "teams": {"url": receiver.url("/teams/workflow")},
        "email": {
            "to": ["ops@example.com", "gpu@example.com"],
            "from": "aima@example.com",
            "smarthost": f"127.0.0.1:{smtp.port}",
            "username": SMTP_USER,
            "password_env": "SMTP_PASSWORD",
            "ca_file": str(smtp.cert),
        },
        "sms": {
            "base_url": receiver.url("/sms"),
            "account_sid": SMS_SID,
            "auth_token_env": "SMS_TOKEN",
            "from": "+4930000",
            "to": ["+4917001", "+4917002"],
        },
    }
    apprise_installed = _importable("apprise")
    if apprise_installed:
        channels["apprise"] = {"urls": receiver.url("/apprise").replace("http://", "json://")}
    notifier = start(config([{"name": "ops", **channels}]))
    event = alert_event()
    try:
        produce(topics, event)
        (hook,) = receiver.wait_for("/hook")
        (slack,) = receiver.wait_for("/slack/T000/B000/XXXX")
        (teams,) = receiver.wait_for("/teams/workflow", accepted_only=False)
        sms = receiver.wait_for(f"/sms/2010-04-01/Accounts/{SMS_SID}/Messages.json", 2, accepted_only=False)
        deadline = time.monotonic() + 20
        while not smtp.mails and time.monotonic() < deadline:
            time.sleep(0.05)
        if apprise_installed:
            (apprise,) = receiver.wait_for("/apprise")
        wait_committed(topics, f"notify-{unique}")
    finally:
        notifier.stop()
        smtp.close()

    doc = verified(hook)
    assert doc["version"] == "4" and doc["status"] == "firing" and doc["receiver"] == "ops"
    assert doc["externalURL"] == "http://aima.test"
    (sent,) = doc["alerts"]
    assert sent["fingerprint"] == event["fingerprint"]
    assert sent["status"] == "firing"
    assert sent["labels"]["alertname"] == "GpuTemperatureHigh" and sent["labels"]["host"] == "gpu-1"
    assert sent["startsAt"] == event["starts_at"].isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert doc["groupKey"].startswith("root:{") and doc["groupLabels"]["host"] == "gpu-1"

    slack_doc = slack.json()
    assert slack_doc["channel"] == "#gpu" and slack_doc["text"].startswith("[FIRING:1] GpuTemperatureHigh")
    assert slack_doc["blocks"][0]["type"] == "header"
    assert event["fingerprint"] in json.dumps(slack_doc["blocks"])

    teams_doc = teams.json()
    assert teams_doc["type"] == "message"
    assert teams_doc["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert teams_doc["attachments"][0]["content"]["type"] == "AdaptiveCard"

    assert {parse_qs(r.body.decode())["To"][0] for r in sms} == {"+4917001", "+4917002"}
    form = {k: v[0] for k, v in parse_qs(sms[0].body.decode()).items()}
    assert form["From"] == "+4930000" and "GpuTemperatureHigh" in form["Body"] and "gpu-1" in form["Body"]
    assert (
        sms[0].headers["authorization"]
        == "Basic " + base64.b64encode(f"{SMS_SID}:{SMS_TOKEN}".encode()).decode()
    )

    (mail,) = smtp.mails
    assert mail.tls and mail.login == SMTP_USER.encode()
    assert mail.mail_from == "aima@example.com" and sorted(mail.rcpt_tos) == [
        "gpu@example.com",
        "ops@example.com",
    ]
    parsed = message_from_bytes(mail.content, policy=policy.default)
    assert parsed["Subject"].startswith("[FIRING:1] GpuTemperatureHigh")
    assert event["fingerprint"] in parsed.get_body(("plain",)).get_content()
    assert "<table" in parsed.get_body(("html",)).get_content()

    if apprise_installed:
        assert "GpuTemperatureHigh" in apprise.json()["title"]

    expected = {"webhook", "slack", "teams", "email", "sms"} | ({"apprise"} if apprise_installed else set())
    rows = log_rows(db, event["fingerprint"])
    assert set(rows) == expected and {outcome for outcome, _ in rows.values()} == {"delivered"}
    assert (
        notifier.metric(
            "aima_notifier_notifications_total", receiver="ops", channel="webhook", outcome="delivered"
        )
        == 1
    )
    assert notifier.metric("aima_notifier_delivery_latency_seconds_count", channel="webhook") == 1


def test_a_receiver_failing_for_30_seconds_gets_the_notification_afterwards_once(
    start: Callable[..., RunningNotifier],
    topics: Settings,
    receiver: Receiver,
    db: psycopg.Connection,
    unique: str,
) -> None:
    first_request: list[float] = []

    def failing_for_30s() -> int:
        first_request.append(time.monotonic()) if not first_request else None
        return 500 if time.monotonic() - first_request[0] < 30 else 200

    receiver.behaviour["/hook"] = failing_for_30s
    notifier = start(config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}]))
    event = alert_event()
    try:
        produce(topics, event)
        (delivered,) = receiver.wait_for("/hook", timeout_s=60)
        time.sleep(3)  # nothing more may come
        wait_committed(topics, f"notify-{unique}")
    finally:
        notifier.stop()
    assert len(receiver.seen("/hook")) == 1
    failed = [r for r in receiver.seen("/hook", accepted_only=False) if r.status == 500]
    assert len(failed) >= 5
    assert delivered.at - failed[0].at >= 29
    assert verified(delivered)["alerts"][0]["fingerprint"] == event["fingerprint"]
    outcome, attempts = log_rows(db, event["fingerprint"])["webhook"]
    assert outcome == "delivered" and attempts == len(failed) + 1
    assert notifier.metric("aima_notifier_retries_total", channel="webhook") == len(failed)


def test_a_hanging_receiver_times_out_and_is_retried(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver
) -> None:
    calls = iter(["hang", 200, 200])
    receiver.behaviour["/hook"] = lambda: next(calls)
    notifier = start(config([{"name": "ops", "webhook": webhook(receiver.url("/hook"), timeout="1s")}]))
    event = alert_event()
    try:
        produce(topics, event)
        (delivered,) = receiver.wait_for("/hook", timeout_s=30)
        receiver.wait_for("/hook", 2, accepted_only=False, timeout_s=10)  # the hung one, once it gives up
        time.sleep(1)
    finally:
        notifier.stop()
    hung = [r for r in receiver.seen("/hook", accepted_only=False) if r.status == 0]
    assert len(hung) == 1 and len(receiver.seen("/hook")) == 1
    # Both carry the same alert: a receiver that saw the hung one recognises the duplicate.
    assert verified(hung[0])["alerts"][0]["fingerprint"] == verified(delivered)["alerts"][0]["fingerprint"]
    assert notifier.metric("aima_notifier_retries_total", channel="webhook") == 1


def test_after_the_last_retry_the_notification_is_dead_lettered(
    start: Callable[..., RunningNotifier],
    topics: Settings,
    receiver: Receiver,
    db: psycopg.Connection,
    unique: str,
) -> None:
    receiver.behaviour["/down"] = lambda: 500
    receiver.behaviour["/bad"] = lambda: 400
    retry = {"max_attempts": 3, "initial_backoff": "100ms", "max_backoff": "200ms"}
    notifier = start(
        config(
            [
                {
                    "name": "ops",
                    "webhook": [webhook(receiver.url("/down"), retry=retry), webhook(receiver.url("/bad"))],
                }
            ]
        )
    )
    event = alert_event()
    try:
        produce(topics, event)
        dead = _read_dead_letters(topics, 2)
        wait_committed(topics, f"notify-{unique}")
    finally:
        notifier.stop()
    assert len(receiver.seen("/down", accepted_only=False)) == 3
    assert len(receiver.seen("/bad", accepted_only=False)) == 1  # a 4xx is not retried
    by_channel = {json.loads(d["value"])["channel"]: d for d in dead}
    down, bad = by_channel["webhook/0"], by_channel["webhook/1"]
    assert down["stage"] == "notifier" and down["source"] == "notifier"
    assert down["origin_topic"] == topic_name(topics, "alerts") and down["origin_offset"] is not None
    assert (
        "HTTP 500" in down["reason"]
        and "3 attempts" in down["reason"]
        and down["error_type"] == "DeliveryFailed"
    )
    assert "HTTP 400" in bad["reason"] and bad["error_type"] == "DeliveryRejected"
    value = json.loads(down["value"])
    assert value["alerts"][0]["fingerprint"] == event["fingerprint"] and value["receiver"] == "ops"
    rows = log_rows(db, event["fingerprint"])
    assert rows == {"webhook/0": ("dead_lettered", 3), "webhook/1": ("dead_lettered", 1)}
    assert (
        notifier.metric("aima_notifier_dead_letters_total", channel="webhook", error_type="DeliveryFailed")
        == 1
    )


def test_an_undecodable_record_is_dead_lettered_and_the_next_alert_delivered(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver, unique: str
) -> None:
    notifier = start(config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}]))
    event = alert_event()
    producer = Producer({"bootstrap.servers": topics.kafka_bootstrap})
    producer.produce(
        topic_name(topics, "alerts"), key=event["fingerprint"].encode(), value=b"not avro at all"
    )
    producer.flush(10)
    produce(topics, event)  # same key, same partition, after the poison record
    try:
        (dead,) = _read_dead_letters(topics, 1)
        (delivered,) = receiver.wait_for("/hook")
        wait_committed(topics, f"notify-{unique}")
    finally:
        notifier.stop()
    assert (
        dead["stage"] == "notifier"
        and dead["error_type"] == "NotAvro"
        and dead["value"] == b"not avro at all"
    )
    assert dead["key"] == event["fingerprint"].encode()
    assert verified(delivered)["alerts"][0]["fingerprint"] == event["fingerprint"]
    assert notifier.metric("aima_notifier_dead_letters_total", channel="decode", error_type="NotAvro") == 1


def test_a_dead_letter_the_broker_refuses_holds_the_offsets_until_it_is_taken(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver, unique: str
) -> None:
    """The dead-letter topic refuses every letter (max.message.bytes 100, too small even for one without
    its value): the poison record is not acknowledged, so nothing from it on is committed or delivered.
    Then it takes 1500 bytes, less than the poison value: the letter goes without its value (the reason
    says so), and the alert behind it is delivered."""
    letters = topic_name(topics, "deadletter")
    set_max_message_bytes(topics, letters, 100)
    group = f"notify-{unique}"
    notifier = start(config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}]), group)
    event = alert_event()
    producer = Producer({"bootstrap.servers": topics.kafka_bootstrap})
    poison = b"not avro at all " * 200
    producer.produce(topic_name(topics, "alerts"), key=event["fingerprint"].encode(), value=poison)
    producer.flush(10)
    produce(topics, event)  # same key, same partition, after the poison record
    try:
        time.sleep(6.0)  # several refused sends and commit intervals
        committed, end = committed_and_end(topics, group)
        assert committed < end and receiver.seen("/hook") == []
        set_max_message_bytes(topics, letters, 1500)
        (dead,) = _read_dead_letters(topics, 1, timeout_s=60)
        (delivered,) = receiver.wait_for("/hook", timeout_s=60)
        wait_committed(topics, group, timeout_s=60)
    finally:
        notifier.stop()
    assert dead["error_type"] == "NotAvro" and dead["value"] is None
    assert f"original value ({len(poison)} bytes) is left out" in dead["reason"]
    assert verified(delivered)["alerts"][0]["fingerprint"] == event["fingerprint"]


def test_a_silence_suppresses_matching_alerts(
    start: Callable[..., RunningNotifier],
    topics: Settings,
    receiver: Receiver,
    db: psycopg.Connection,
    unique: str,
) -> None:
    silence = create_silence(
        db,
        ["host=~gpu-silent-.*", "severity=critical"],
        created_by="test",
        comment="maintenance",
        duration=dt.timedelta(hours=1),
    )
    assert [s.id for s in list_silences(db, state="active")] == [silence.id]
    notifier = start(config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}]))
    muted, loud = alert_event(host="gpu-silent-1"), alert_event(host="gpu-7")
    try:
        produce(topics, muted, loud)
        receiver.wait_for("/hook")
        time.sleep(1.5)
        assert [verified(r)["alerts"][0]["labels"]["host"] for r in receiver.seen("/hook")] == ["gpu-7"]
        wait_committed(topics, f"notify-{unique}")
        assert notifier.metric("aima_notifier_silenced_alerts_total") >= 1

        assert delete_silence(db, silence.id)
        assert list_silences(db, state="active") == [] and len(list_silences(db, state="expired")) == 1
        # Unmuted: the alert still firing is told at its group's next tick, as is a new one.
        again = alert_event(host="gpu-silent-2")
        produce(topics, again)
        _, *later = receiver.wait_for("/hook", 3)
        assert {verified(r)["alerts"][0]["fingerprint"] for r in later} == {
            muted["fingerprint"],
            again["fingerprint"],
        }
    finally:
        notifier.stop()


def test_offsets_are_committed_only_after_delivery_across_a_restart(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver, unique: str
) -> None:
    up = threading.Event()
    receiver.behaviour["/hook"] = lambda: 200 if up.is_set() else 500
    group = f"notify-{unique}"
    cfg = config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}])
    first = start(cfg, group)
    event = alert_event()
    produce(topics, event)
    receiver.wait_for("/hook", 3, accepted_only=False, timeout_s=30)
    time.sleep(1.0)  # several commit intervals pass
    committed, end = committed_and_end(topics, group)
    assert committed < end, "the offset was committed before the notification was delivered"
    first.stop()  # stops while the receiver still fails
    assert committed_and_end(topics, group)[0] < end
    assert receiver.seen("/hook") == []

    up.set()
    second = start(cfg, group)
    try:
        (delivered,) = receiver.wait_for("/hook", timeout_s=30)
        wait_committed(topics, group)
        time.sleep(1)
    finally:
        second.stop()
    assert len(receiver.seen("/hook")) == 1
    assert verified(delivered)["alerts"][0]["fingerprint"] == event["fingerprint"]


def test_a_replayed_alert_is_recognised_and_not_sent_twice(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver, unique: str
) -> None:
    cfg = config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}])
    first = start(cfg, f"first-{unique}")
    event = alert_event()
    produce(topics, event)
    receiver.wait_for("/hook")
    wait_committed(topics, f"first-{unique}")
    first.stop()
    # A consumer that has not committed (as after a crash right after delivery) reads the record again.
    replay = start(cfg, f"replay-{unique}")
    try:
        wait_committed(topics, f"replay-{unique}")
    finally:
        replay.stop()
    assert len(receiver.seen("/hook")) == 1
    assert (
        replay.metric(
            "aima_notifier_notifications_total", receiver="ops", channel="webhook", outcome="duplicate"
        )
        == 1
    )


def test_resolved_follows_firing_and_groups_wait(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver
) -> None:
    cfg = config(
        [{"name": "ops", "webhook": webhook(receiver.url("/hook"))}],
        route={"group_by": ["alertname"], "group_wait": "2s", "group_interval": "2s"},
    )
    notifier = start(cfg)
    a, b = alert_event(host="gpu-1"), alert_event(host="gpu-2")
    try:
        t0 = time.time()
        produce(topics, a, b)
        (grouped,) = receiver.wait_for("/hook", timeout_s=20)
        resolved = dict(
            a, status="resolved", ends_at=dt.datetime.now(dt.UTC), event_time=dt.datetime.now(dt.UTC)
        )
        produce(topics, resolved)
        (_, second) = receiver.wait_for("/hook", 2, timeout_s=20)
    finally:
        notifier.stop()
    doc = verified(grouped)
    assert grouped.at - t0 >= 1.5  # group_wait
    assert {x["fingerprint"] for x in doc["alerts"]} == {a["fingerprint"], b["fingerprint"]}
    assert doc["groupLabels"] == {"alertname": "GpuTemperatureHigh"}
    statuses = {x["fingerprint"]: x["status"] for x in verified(second)["alerts"]}
    assert statuses == {a["fingerprint"]: "resolved", b["fingerprint"]: "firing"}


def _read_dead_letters(settings: Settings, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    codec = Codec()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"dl-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic_name(settings, "deadletter")])
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            name, value = codec.decode(message.value())
            assert name == "aima.metrics.DeadLetter"
            found.append(value)
    finally:
        consumer.close()
    assert len(found) == count, found
    return found


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
