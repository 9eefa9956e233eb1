"""What each channel sends (Alertmanager webhook v4 and its signature, Slack blocks, Teams adaptive card,
email, Twilio-style SMS), how secrets are configured, and how delivery retries."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from consumers.notify.channels import build
from consumers.notify.channels.base import DeliveryError, post
from consumers.notify.channels.email import message
from consumers.notify.channels.slack import payload as slack_payload
from consumers.notify.channels.sms import form, text, url
from consumers.notify.channels.teams import payload as teams_payload
from consumers.notify.channels.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    encode,
    idempotency_key,
    payload,
    sign,
    verify,
)
from consumers.notify.config import ConfigError, EmailConfig, RetryPolicy, SmsConfig, WebhookConfig, parse
from consumers.notify.delivery import Outcome, backoff_s, retry
from consumers.notify.model import Alert, Notification

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KEY = "s3cret-key"


def alert(fingerprint: str, status: str = "firing", host: str = "gpu-1") -> Alert:
    return Alert.from_event(
        {
            "fingerprint": fingerprint,
            "rule": "GpuHot",
            "status": status,
            "severity": "critical",
            "starts_at": T0,
            "ends_at": T0 + timedelta(minutes=3) if status == "resolved" else None,
            "event_time": T0 + timedelta(seconds=1),
            "value": 91.5,
            "labels": {"host": host, "gpu": "0"},
            "annotations": {"summary": "GPU <hot> & loud", "runbook_url": "https://runbooks/gpu"},
            "channels": ["webhook"],
            "source": "stream",
        }
    )


def notification(*alerts: Alert) -> Notification:
    return Notification(
        receiver="ops",
        channel="webhook",
        group_key='root:{alertname="GpuHot"}',
        group_labels={"alertname": "GpuHot"},
        alerts=alerts or (alert("a"), alert("b", "resolved", host="gpu-2")),
        external_url="https://aima.example.com",
    )


def config_with(channel: dict, env: dict[str, str] | None = None, kind: str = "webhook"):
    cfg = parse({"route": {"receiver": "r"}, "receivers": [{"name": "r", kind: channel}]}, environ=env or {})
    return cfg.receivers["r"].channels[0]


# -- webhook -----------------------------------------------------------------------------------------------


def test_webhook_payload_is_alertmanager_v4() -> None:
    doc = payload(notification())
    assert set(doc) == {
        "version",
        "groupKey",
        "truncatedAlerts",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    }
    assert doc["version"] == "4"
    assert doc["status"] == "firing"  # any firing alert makes the group firing
    assert doc["receiver"] == "ops"
    assert doc["groupLabels"] == {"alertname": "GpuHot"}
    assert doc["commonLabels"] == {"alertname": "GpuHot", "severity": "critical", "gpu": "0"}
    assert doc["commonAnnotations"] == {"summary": "GPU <hot> & loud", "runbook_url": "https://runbooks/gpu"}
    assert doc["externalURL"] == "https://aima.example.com"
    firing, resolved = doc["alerts"]
    assert set(firing) == {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    }
    assert firing["labels"] == {"alertname": "GpuHot", "severity": "critical", "host": "gpu-1", "gpu": "0"}
    assert firing["startsAt"] == "2025-03-01T12:00:00.000Z"
    assert firing["endsAt"] == "0001-01-01T00:00:00Z"
    assert resolved["status"] == "resolved" and resolved["endsAt"] == "2025-03-01T12:03:00.000Z"
    assert firing["fingerprint"] == "a"


def test_webhook_truncates_to_max_alerts() -> None:
    doc = payload(notification(alert("a"), alert("b"), alert("c")), max_alerts=2)
    assert len(doc["alerts"]) == 2 and doc["truncatedAlerts"] == 1


def test_webhook_signature_verifies() -> None:
    body = encode(payload(notification()))
    header = sign(body, KEY)
    assert header.startswith("sha256=")
    expected = "sha256=" + hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(header, expected)
    assert verify(body, KEY, header)
    assert not verify(body + b" ", KEY, header)
    assert not verify(body, "other-key", header)
    assert not verify(body, KEY, None)


def test_webhook_channel_sends_signed_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    channel_config = config_with(
        {"url": "http://receiver/hook", "hmac_key_env": "KEY", "headers": {"X-Team": "a"}}, {"KEY": KEY}
    )
    assert isinstance(channel_config, WebhookConfig)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        build(channel_config, client).send(notification(), set())
    (request,) = seen
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-team"] == "a"
    assert int(request.headers[TIMESTAMP_HEADER]) > 1_700_000_000
    expected = hmac.new(KEY.encode(), request.content, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers[SIGNATURE_HEADER], f"sha256={expected}")
    assert json.loads(request.content)["version"] == "4"


def test_webhook_idempotency_key_names_the_states_told() -> None:
    a, b = alert("a"), alert("b", "resolved", host="gpu-2")
    key = idempotency_key(notification(a, b))
    assert key is not None and len(key) == 64
    assert idempotency_key(notification(b, a)) == key  # the order of the alerts does not matter
    assert idempotency_key(notification(a, alert("b"))) != key  # another status is another state
    assert idempotency_key(dataclasses.replace(notification(a, b), channel="webhook/1")) != key
    assert idempotency_key(dataclasses.replace(notification(a, b), repeat=True)) is None
    seen: list[httpx.Request] = []
    channel_config = config_with({"url": "http://receiver/hook", "hmac_key_env": "KEY"}, {"KEY": KEY})
    with httpx.Client(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200))) as c:
        channel = build(channel_config, c)
        channel.send(notification(a, b), set())
        channel.send(dataclasses.replace(notification(a, b), repeat=True), set())
    assert seen[0].headers[IDEMPOTENCY_HEADER] == key and IDEMPOTENCY_HEADER not in seen[1].headers


# -- Slack, Teams, email, SMS ------------------------------------------------------------------------------


def test_slack_blocks() -> None:
    doc = slack_payload(notification(), channel="#alerts")
    assert doc["text"] == "[FIRING:1] GpuHot"
    assert doc["channel"] == "#alerts"
    header, section, context, *_rest = doc["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "[FIRING:1] GpuHot", "emoji": True},
    }
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert "*GpuHot*" in section["text"]["text"]
    assert "GPU &lt;hot&gt; &amp; loud" in section["text"]["text"]  # mrkdwn escaping
    assert "`a`" in context["elements"][0]["text"]
    assert doc["blocks"][-1]["type"] == "actions"
    assert len(doc["blocks"]) <= 50


def test_slack_caps_blocks() -> None:
    doc = slack_payload(notification(*(alert(f"f{i}") for i in range(40))))
    assert len(doc["blocks"]) <= 50
    assert "20 more alerts" in json.dumps(doc)


def test_teams_workflows_adaptive_card() -> None:
    doc = teams_payload(notification())
    assert doc["type"] == "message"
    (attachment,) = doc["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    assert card["body"][0]["text"] == "[FIRING:1] GpuHot"
    facts = {f["title"]: f["value"] for f in card["body"][1]["items"][-1]["facts"]}
    assert facts["fingerprint"] == "a" and facts["host"] == "gpu-1" and facts["value"] == "91.5"
    assert card["actions"][0]["url"] == "https://aima.example.com"


def test_email_is_multipart_plain_and_html() -> None:
    cfg = EmailConfig(
        kind="email", id="email", to=("ops@example.com", "b@example.com"), sender="aima@example.com"
    )
    msg = message(notification(), cfg, now=T0.timestamp())
    assert msg["Subject"] == "[FIRING:1] GpuHot"
    assert msg["To"] == "ops@example.com, b@example.com"
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "fingerprint: a" in plain and "GPU <hot> & loud" in plain
    assert "GPU &lt;hot&gt; &amp; loud" in html  # escaped
    assert msg["X-AIMA-Fingerprints"] == "a,b"


def test_sms_is_twilio_form() -> None:
    cfg = SmsConfig(
        kind="sms", id="sms", account_sid="AC1", sender="+100", to=("+200",), base_url="http://gw"
    )
    assert url(cfg) == "http://gw/2010-04-01/Accounts/AC1/Messages.json"
    assert form(notification(), cfg, "+200") == {"To": "+200", "From": "+100", "Body": text(notification())}
    assert text(notification()).startswith("[FIRING:1] GpuHot\nFIRING GpuHot critical gpu-1 value=91.5")
    assert len(text(notification(*(alert(f"f{i}") for i in range(100))), max_chars=160)) == 160


# -- configuration of secrets ------------------------------------------------------------------------------


def test_secrets_come_from_env_or_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text(KEY + "\n")
    from_env = config_with({"url": "http://x", "hmac_key_env": "K"}, {"K": KEY})
    from_file = config_with({"url": "http://x", "hmac_key_file": str(secret_file)})
    assert from_env.hmac_key.get() == from_file.hmac_key.get() == KEY
    assert KEY not in repr(from_env)


@pytest.mark.parametrize(
    ("channel", "kind", "message_part"),
    [
        ({"url": "http://x", "hmac_key": "literal"}, "webhook", "secrets are not written into the file"),
        ({"url": "http://x"}, "webhook", "hmac_key is missing"),
        ({"url": "http://x", "hmac_key_env": "UNSET"}, "webhook", "UNSET is not set"),
        ({"url": "http://x", "hmac_key_file": "/nonexistent/key"}, "webhook", "cannot read /nonexistent/key"),
        ({"url_env": "A", "url": "http://x"}, "slack", "only one of"),
        ({"url": "ftp://x"}, "teams", "not an http(s) URL"),
        ({"to": ["a@b"], "from": "c@d", "username": "u", "password": "pw"}, "email", "password_env"),
        ({"to": ["a@b"], "from": "c@d", "tls": "maybe"}, "email", "'maybe' is not starttls"),
        ({"account_sid": "AC", "from": "+1", "to": ["+2"]}, "sms", "auth_token is missing"),
    ],
)
def test_secret_errors_are_clear(channel: dict, kind: str, message_part: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_with(channel, kind=kind)
    assert message_part in str(raised.value)


def test_unsigned_webhook_must_be_explicit() -> None:
    assert config_with({"url": "http://x", "unsigned": True}).hmac_key is None


# -- retries -----------------------------------------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff_s=1, max_backoff_s=10)
    assert [backoff_s(policy, n, rng=lambda: 1.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff_s(policy, 3, rng=lambda: 0.25) == 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []


class SleepyEvent(threading.Event):
    """A stop event whose wait advances the fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.slept.append(timeout or 0.0)
        self.clock.now += timeout or 0.0
        return self.is_set()


def test_retry_until_success() -> None:
    clock = FakeClock()
    calls = iter([DeliveryError("500"), DeliveryError("timeout", retry_after_s=7.0), None])

    def attempt() -> None:
        if (error := next(calls)) is not None:
            raise error

    result = retry(
        attempt,
        RetryPolicy(initial_backoff_s=1, max_backoff_s=4),
        stop=SleepyEvent(clock),
        clock=lambda: clock.now,
        rng=lambda: 1.0,
    )
    assert result.outcome is Outcome.DELIVERED and result.attempts == 3
    assert clock.slept == [1.0, 7.0]  # Retry-After wins over a shorter backoff


def test_retry_gives_up_after_max_attempts_and_at_once_when_permanent() -> None:
    clock = FakeClock()

    def failing() -> None:
        raise DeliveryError("HTTP 503")

    result = retry(
        failing,
        RetryPolicy(max_attempts=4, initial_backoff_s=1),
        stop=SleepyEvent(clock),
        clock=lambda: clock.now,
        rng=lambda: 0.5,
    )
    assert result.outcome is Outcome.GAVE_UP and result.attempts == 4
    assert "HTTP 503" in result.reason and "4 attempts" in result.reason

    def rejected() -> None:
        raise DeliveryError("HTTP 400", retryable=False, error_type="DeliveryRejected")

    result = retry(rejected, RetryPolicy(), stop=SleepyEvent(clock), clock=lambda: clock.now)
    assert (result.outcome, result.attempts, result.error_type) == (Outcome.GAVE_UP, 1, "DeliveryRejected")


def test_retry_respects_max_elapsed_and_stop() -> None:
    clock = FakeClock()

    def failing() -> None:
        raise DeliveryError("HTTP 503")

    policy = RetryPolicy(max_attempts=100, initial_backoff_s=10, max_backoff_s=10, max_elapsed_s=35)
    result = retry(failing, policy, stop=SleepyEvent(clock), clock=lambda: clock.now, rng=lambda: 1.0)
    assert result.outcome is Outcome.GAVE_UP and result.attempts == 4 and "max_elapsed" in result.reason
    stop = SleepyEvent(clock)
    stop.set()
    assert retry(failing, policy, stop=stop, clock=lambda: clock.now).outcome is Outcome.ABORTED


@pytest.mark.parametrize(
    ("status", "retryable", "error_type"),
    [(500, True, "DeliveryFailed"), (429, True, "DeliveryFailed"), (404, False, "DeliveryRejected")],
)
def test_http_status_classification(status: int, retryable: bool, error_type: str) -> None:
    transport = httpx.MockTransport(
        lambda r: httpx.Response(status, text="nope", headers={"Retry-After": "3"})
    )
    with httpx.Client(transport=transport) as client, pytest.raises(DeliveryError) as raised:
        post(client, "https://hooks.slack.com/services/SECRET", timeout_s=1, what="slack")
    error = raised.value
    assert (error.retryable, error.error_type, error.retry_after_s) == (retryable, error_type, 3.0)
    assert "SECRET" not in error.reason and f"HTTP {status}: nope" in error.reason
