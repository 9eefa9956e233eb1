"""SMS channel: an HTTP SMS gateway with Twilio's Messages API (the de-facto standard form, which several
gateways accept): ``POST {base}/2010-04-01/Accounts/{sid}/Messages.json`` with the form fields ``To``,
``From`` and ``Body`` and HTTP basic auth (account SID, auth token). One request per recipient; a retry
serves only the recipients not yet served."""

from __future__ import annotations

import httpx

from consumers.notify.channels.base import post
from consumers.notify.config import SmsConfig
from consumers.notify.model import Notification

__all__ = ["SmsChannel", "form", "text", "url"]


def text(notification: Notification, max_chars: int = 1600) -> str:
    lines = [notification.title]
    for alert in notification.alerts:
        summary = alert.annotations.get("summary", "")
        value = f" value={alert.value:g}" if alert.value is not None else ""
        host = f" {alert.labels['host']}" if "host" in alert.labels else ""
        lines.append(f"{alert.status.upper()} {alert.rule} {alert.severity}{host}{value} {summary}".rstrip())
    body = "\n".join(lines)
    return body if len(body) <= max_chars else body[: max_chars - 3] + "..."


def url(config: SmsConfig) -> str:
    return f"{config.base_url}/2010-04-01/Accounts/{config.account_sid}/Messages.json"


def form(notification: Notification, config: SmsConfig, to: str) -> dict[str, str]:
    return {"To": to, "From": config.sender, "Body": text(notification, config.max_chars)}


class SmsChannel:
    def __init__(self, config: SmsConfig, client: httpx.Client) -> None:
        self.config = config
        self._client = client

    def send(self, notification: Notification, progress: set[str]) -> None:
        assert self.config.auth_token is not None
        auth = (self.config.account_sid, self.config.auth_token.get())
        for to in self.config.to:
            if to in progress:
                continue
            post(
                self._client,
                url(self.config),
                timeout_s=self.config.timeout_s,
                what="sms gateway",
                data=form(notification, self.config, to),
                auth=auth,
            )
            progress.add(to)

    def close(self) -> None:
        pass
