"""What a processor that finds something publishes: an AlertEvent (avro/AlertEvent.avsc) on the alerts
topic, keyed by the alert's fingerprint. The alert processor, the anomaly detector and the cost processor's
budget alerts all raise alerts; the fingerprint is the notifier's identity of an alert (N2), so they build
it here, one way, and never from each other's room."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from datetime import datetime

from streams.runtime.buckets import from_ms
from streams.runtime.processor import Output

__all__ = ["ALERTS_TOPIC", "ALERT_RECORD", "alert_event", "fingerprint", "format_value"]

ALERT_RECORD = "aima.metrics.AlertEvent"
ALERTS_TOPIC = "alerts"


def fingerprint(rule: str, labels: Mapping[str, str]) -> str:
    """Stable id of an alert: sha256 over the rule name and the labels sorted by name (each part followed
    by a 0xff separator, which UTF-8 never contains, as Prometheus' label hashing does); 16 hex digits. The
    same in every process and whatever the labels' order."""
    digest = hashlib.sha256()
    for part in (rule, *(item for name in sorted(labels) for item in (name, labels[name]))):
        digest.update(part.encode("utf-8"))
        digest.update(b"\xff")
    return digest.hexdigest()[:16]


def format_value(value: float | None) -> str:
    """A value as people read it: ``90``, ``5.5``, ``96.12``; ``n/a`` for none."""
    if value is None:
        return "n/a"
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) >= 0.01 else f"{value:.3g}"


def _at(ms: int | None) -> datetime | None:
    """A tz-aware UTC datetime for epoch milliseconds (None stays None)."""
    return None if ms is None else from_ms(ms)


def alert_event(
    *,
    fingerprint: str,
    rule: str,
    status: str,
    severity: str,
    starts_at_ms: int,
    ends_at_ms: int | None,
    event_time_ms: int,
    value: float | None,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    channels: Iterable[str],
    source: str = "stream",
) -> Output:
    """An AlertEvent for the alerts topic, keyed by fingerprint."""
    return Output(
        ALERTS_TOPIC,
        fingerprint,
        ALERT_RECORD,
        {
            "fingerprint": fingerprint,
            "rule": rule,
            "status": status,
            "severity": severity,
            "starts_at": _at(starts_at_ms),
            "ends_at": _at(ends_at_ms),
            "event_time": _at(event_time_ms),
            "value": value,
            "labels": dict(labels),
            "annotations": dict(annotations),
            "channels": list(channels),
            "source": source,
        },
    )
