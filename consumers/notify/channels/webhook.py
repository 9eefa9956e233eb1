"""Webhook channel: Alertmanager's webhook payload (version 4), signed with HMAC-SHA256 (N3).

Headers: ``X-AIMA-Signature: sha256=<hex HMAC-SHA256 of the raw body under the shared key>`` and
``X-AIMA-Timestamp`` (Unix seconds when sent). A receiver recomputes the HMAC over the bytes it received
and compares with :func:`hmac.compare_digest` (see :func:`verify`).

``X-AIMA-Idempotency-Key`` (:func:`idempotency_key`) names what a notification tells: its receiver, channel
and each alert's ``fingerprint``, ``status`` and ``startsAt``. The notifier tells each once, but a notifier
killed between the receiver's 2xx and its notification log write sends it again after the restart, with
the same key (so does a retry after a timeout whose request did arrive): a receiver that keeps the keys it
accepted drops those repeats. Repeats after ``repeat_interval`` are meant to arrive again and carry none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from consumers.notify.channels.base import post
from consumers.notify.config import WebhookConfig
from consumers.notify.model import Alert, Notification, rfc3339

__all__ = [
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookChannel",
    "encode",
    "idempotency_key",
    "payload",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-AIMA-Signature"
TIMESTAMP_HEADER = "X-AIMA-Timestamp"
IDEMPOTENCY_HEADER = "X-AIMA-Idempotency-Key"


def payload(notification: Notification, max_alerts: int = 0) -> dict[str, Any]:
    """The Alertmanager webhook v4 JSON document."""
    alerts = list(notification.alerts)
    shown = alerts[:max_alerts] if max_alerts > 0 else alerts
    return {
        "version": "4",
        "groupKey": notification.group_key,
        "truncatedAlerts": len(alerts) - len(shown),
        "status": notification.status,
        "receiver": notification.receiver,
        "groupLabels": dict(notification.group_labels),
        "commonLabels": notification.common_labels,
        "commonAnnotations": notification.common_annotations,
        "externalURL": notification.external_url,
        "alerts": [_alert(a) for a in shown],
    }


def _alert(alert: Alert) -> dict[str, Any]:
    ends_at = alert.ends_at if alert.ends_at is not None or alert.firing else alert.event_time
    return {
        "status": alert.status,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "startsAt": rfc3339(alert.starts_at),
        "endsAt": rfc3339(ends_at),
        "generatorURL": alert.annotations.get("generator_url", ""),
        "fingerprint": alert.fingerprint,
    }


def idempotency_key(notification: Notification) -> str | None:
    """Hex SHA-256 over the receiver, the channel and the sorted (fingerprint, status, startsAt) of every
    alert; None for a repeat."""
    if notification.repeat:
        return None
    states = sorted(f"{a.fingerprint}\x1f{a.status}\x1f{rfc3339(a.starts_at)}" for a in notification.alerts)
    text = "\x1e".join([notification.receiver, notification.channel, *states])
    return hashlib.sha256(text.encode()).hexdigest()


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def sign(body: bytes, key: str | bytes) -> str:
    """The signature header's value for ``body``: ``sha256=<hex digest>``."""
    secret = key.encode() if isinstance(key, str) else key
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(body: bytes, key: str | bytes, header: str | None) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return header is not None and hmac.compare_digest(sign(body, key), header)


class WebhookChannel:
    def __init__(self, config: WebhookConfig, client: httpx.Client, wall_clock=time.time) -> None:
        self.config = config
        self._client = client
        self._wall_clock = wall_clock

    def send(self, notification: Notification, progress: set[str]) -> None:
        body = encode(payload(notification, self.config.max_alerts))
        headers = {**self.config.headers, "Content-Type": "application/json"}
        if self.config.hmac_key is not None:
            headers[SIGNATURE_HEADER] = sign(body, self.config.hmac_key.get())
        headers[TIMESTAMP_HEADER] = str(int(self._wall_clock()))
        if (key := idempotency_key(notification)) is not None:
            headers[IDEMPOTENCY_HEADER] = key
        assert self.config.url is not None
        post(
            self._client,
            self.config.url.get(),
            timeout_s=self.config.timeout_s,
            what="webhook",
            content=body,
            headers=headers,
        )

    def close(self) -> None:
        pass
