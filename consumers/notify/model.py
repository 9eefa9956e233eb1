"""What the notifier passes around: one alert as read from the alerts topic, and one notification (a group
of alerts for one receiver's channel) as every channel renders it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["CHANNEL_ALIASES", "HINT_LABEL", "Alert", "Notification", "Origin", "channel_kind", "rfc3339"]

# Alertmanager sends this for a firing alert's endsAt; webhook receivers written for it expect it.
ZERO_TIME = "0001-01-01T00:00:00Z"

CHANNEL_ALIASES = {
    "msteams": "teams",
    "mail": "email",
    "smtp": "email",
    "text": "sms",
    # The web UI's feed comes from the database, not from the notifier; a rule may still name it.
    "web": "push",
    "webui": "push",
    "ui": "push",
}
"""Other names a rule may use in its ``channels`` for the same kind."""
HINT_LABEL = "channels"
"""The match label that carries a rule's channels (its routing hint) for route matchers and silences."""


def channel_kind(name: str) -> str:
    """The kind a channel name in a rule stands for (``msteams`` -> ``teams``)."""
    return CHANNEL_ALIASES.get(name, name)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an alert record came from, so its offset is committed only once it has been delivered."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Alert:
    """One AlertEvent. ``labels`` are the event's labels plus ``alertname`` (the rule) and ``severity``,
    as Alertmanager receivers expect them."""

    fingerprint: str
    rule: str
    status: str
    severity: str
    starts_at: datetime
    ends_at: datetime | None
    event_time: datetime
    value: float | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    channels: tuple[str, ...]
    source: str = "stream"

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Alert:
        """From a decoded AlertEvent (timestamps as aware datetimes or epoch milliseconds)."""
        labels = dict(event["labels"])
        labels.setdefault("alertname", event["rule"])
        labels.setdefault("severity", event["severity"])
        return cls(
            fingerprint=event["fingerprint"],
            rule=event["rule"],
            status=event["status"],
            severity=event["severity"],
            starts_at=_aware(event["starts_at"]),
            ends_at=_aware(event["ends_at"]) if event.get("ends_at") is not None else None,
            event_time=_aware(event["event_time"]),
            value=event.get("value"),
            labels=labels,
            annotations=dict(event["annotations"]),
            channels=tuple(event.get("channels") or ()),
            source=event.get("source", "stream"),
        )

    @property
    def hints(self) -> tuple[str, ...]:
        """The channel kinds the alert's rule names, sorted: a routing hint that routes may match
        (``Route.channels``, or the ``channels`` match label), never a filter on a receiver's channels."""
        return tuple(sorted({channel_kind(c) for c in self.channels}))

    @property
    def match_labels(self) -> dict[str, str]:
        """What matchers, silences and group_by see: the labels plus ``rule`` (same as ``alertname``) and,
        where the rule names channels, ``channels``: their kinds, sorted and comma-separated
        (``channels="webhook"``, ``channels=~"(.+,)?slack(,.+)?"``). The alert's own labels win."""
        derived = {"rule": self.rule}
        if self.channels:
            derived[HINT_LABEL] = ",".join(self.hints)
        return {**derived, **self.labels}

    @property
    def identity(self) -> tuple[str, datetime]:
        """One firing episode: the same fingerprint fires again with a new ``starts_at``."""
        return (self.fingerprint, self.starts_at)

    @property
    def firing(self) -> bool:
        return self.status == "firing"

    def supersedes(self, other: Alert) -> bool:
        """Whether this record is newer news about the alert than ``other`` (a replay or reordering
        must not turn a resolved alert back into a firing one)."""
        if self.starts_at != other.starts_at:
            return self.starts_at > other.starts_at
        return not (other.status == "resolved" and self.status == "firing")


@dataclass(frozen=True, slots=True)
class Notification:
    """A group's alerts for one channel of one receiver: what every channel renders."""

    receiver: str
    channel: str
    group_key: str
    group_labels: Mapping[str, str]
    alerts: Sequence[Alert]
    external_url: str = ""
    repeat: bool = False

    @property
    def status(self) -> str:
        return "firing" if any(a.firing for a in self.alerts) else "resolved"

    @property
    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.firing]

    @property
    def resolved(self) -> list[Alert]:
        return [a for a in self.alerts if not a.firing]

    @property
    def common_labels(self) -> dict[str, str]:
        return _common([a.labels for a in self.alerts])

    @property
    def common_annotations(self) -> dict[str, str]:
        return _common([a.annotations for a in self.alerts])

    @property
    def title(self) -> str:
        """``[FIRING:2] GpuHot (critical host=gpu-1)``, as Alertmanager's default templates put it."""
        common = self.common_labels
        name = self.group_labels.get("alertname") or common.get("alertname") or self.alerts[0].rule
        rest = " ".join(f"{k}={v}" for k, v in sorted(self.group_labels.items()) if k != "alertname")
        count = len(self.firing) if self.status == "firing" else len(self.resolved)
        return f"[{self.status.upper()}:{count}] {name}" + (f" ({rest})" if rest else "")


def rfc3339(moment: datetime | None) -> str:
    """UTC with millisecond precision and a ``Z``; the zero time for a missing end."""
    if moment is None:
        return ZERO_TIME
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _aware(value: datetime | int) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value / 1000, UTC)


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    common = dict(maps[0])
    for other in maps[1:]:
        common = {k: v for k, v in common.items() if other.get(k) == v}
    return common
