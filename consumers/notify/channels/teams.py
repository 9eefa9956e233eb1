"""Microsoft Teams channel: a Workflows (Power Automate) webhook that posts an Adaptive Card, the
successor of the retired Office 365 connectors."""

from __future__ import annotations

import json
from typing import Any

import httpx

from consumers.notify.channels.base import post
from consumers.notify.config import TeamsConfig
from consumers.notify.model import Alert, Notification, rfc3339

__all__ = ["TeamsChannel", "payload"]

MAX_ALERTS = 20
_COLOR = {"critical": "Attention", "warning": "Warning", "info": "Accent"}


def payload(notification: Notification) -> dict[str, Any]:
    """``{"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
    "content": <Adaptive Card 1.4>}]}``."""
    shown = list(notification.alerts)[:MAX_ALERTS]
    firing = notification.status == "firing"
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": notification.title,
            "size": "Large",
            "weight": "Bolder",
            "wrap": True,
            "color": "Attention" if firing else "Good",
        }
    ]
    body.extend(_container(alert) for alert in shown)
    if len(notification.alerts) > len(shown):
        body.append(
            {
                "type": "TextBlock",
                "text": f"... and {len(notification.alerts) - len(shown)} more",
                "wrap": True,
            }
        )
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
        "msteams": {"width": "Full"},
    }
    if notification.external_url:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open", "url": notification.external_url}]
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
        ],
    }


def _container(alert: Alert) -> dict[str, Any]:
    facts = [{"title": "status", "value": alert.status}, {"title": "severity", "value": alert.severity}]
    if alert.value is not None:
        facts.append({"title": "value", "value": f"{alert.value:g}"})
    facts.extend(
        {"title": k, "value": v}
        for k, v in sorted(alert.labels.items())
        if k not in ("alertname", "severity")
    )
    facts.append({"title": "started", "value": rfc3339(alert.starts_at)})
    if alert.ends_at is not None:
        facts.append({"title": "ended", "value": rfc3339(alert.ends_at)})
    facts.append({"title": "fingerprint", "value": alert.fingerprint})
    items: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": alert.rule,
            "weight": "Bolder",
            "wrap": True,
            "color": _COLOR.get(alert.severity, "Default") if alert.firing else "Good",
        }
    ]
    summary = alert.annotations.get("summary") or alert.annotations.get("description")
    if summary:
        items.append({"type": "TextBlock", "text": summary, "wrap": True})
    items.append({"type": "FactSet", "facts": facts})
    return {"type": "Container", "separator": True, "items": items}


class TeamsChannel:
    def __init__(self, config: TeamsConfig, client: httpx.Client) -> None:
        self.config = config
        self._client = client

    def send(self, notification: Notification, progress: set[str]) -> None:
        assert self.config.url is not None
        post(
            self._client,
            self.config.url.get(),
            timeout_s=self.config.timeout_s,
            what="teams",
            content=json.dumps(payload(notification)).encode(),
            headers={"Content-Type": "application/json"},
        )

    def close(self) -> None:
        pass
