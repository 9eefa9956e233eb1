"""Slack channel: an incoming webhook, the message in Block Kit blocks (with a plain ``text`` fallback for
notifications and clients that do not show blocks)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from consumers.notify.channels.base import labels_text, post
from consumers.notify.config import SlackConfig
from consumers.notify.model import Alert, Notification, rfc3339

__all__ = ["SlackChannel", "payload"]

# Slack allows 50 blocks per message and 3000 characters per text; two blocks per alert.
MAX_ALERTS = 20
_MAX_TEXT = 2900
_ICON = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_blue_circle:"}


def payload(
    notification: Notification, channel: str | None = None, username: str | None = None
) -> dict[str, Any]:
    shown = list(notification.alerts)[:MAX_ALERTS]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": notification.title[:150], "emoji": True}}
    ]
    for alert in shown:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _section(alert)[:_MAX_TEXT]}})
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"fingerprint `{alert.fingerprint}` · {alert.status} · started "
                        f"{rfc3339(alert.starts_at)}",
                    }
                ],
            }
        )
    if len(notification.alerts) > len(shown):
        more = len(notification.alerts) - len(shown)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"... and {more} more alerts"}})
    if notification.external_url:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open"},
                        "url": notification.external_url,
                    }
                ],
            }
        )
    message: dict[str, Any] = {"text": notification.title, "blocks": blocks}
    if channel:
        message["channel"] = channel
    if username:
        message["username"] = username
    return message


def _section(alert: Alert) -> str:
    icon = _ICON.get(alert.severity, "") if alert.firing else ":white_check_mark:"
    lines = [f"{icon} *{_escape(alert.rule)}* ({alert.severity}, {alert.status})"]
    summary = alert.annotations.get("summary") or alert.annotations.get("description")
    if summary:
        lines.append(_escape(summary))
    if alert.value is not None:
        lines.append(f"value: {alert.value:g}")
    labels = labels_text(alert.labels, skip=("alertname", "severity"))
    if labels:
        lines.append(f"`{_escape(labels)}`")
    if runbook := alert.annotations.get("runbook_url") or alert.annotations.get("runbook"):
        lines.append(f"<{runbook}|runbook>")
    return "\n".join(lines)


def _escape(text: str) -> str:
    """Slack's mrkdwn reserves &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackChannel:
    def __init__(self, config: SlackConfig, client: httpx.Client) -> None:
        self.config = config
        self._client = client

    def send(self, notification: Notification, progress: set[str]) -> None:
        body = json.dumps(payload(notification, self.config.channel, self.config.username)).encode()
        assert self.config.url is not None
        post(
            self._client,
            self.config.url.get(),
            timeout_s=self.config.timeout_s,
            what="slack",
            content=body,
            headers={"Content-Type": "application/json"},
        )

    def close(self) -> None:
        pass
