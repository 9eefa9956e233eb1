"""Apprise channel (optional): one notification to any service an Apprise URL names (Discord, Telegram,
ntfy, Pushover, Matrix, ...). Needs the ``apprise`` package; without it the channel fails to build with a
clear message. Apprise reports only success or failure, so every failure is retried."""

from __future__ import annotations

import re
from typing import Any

from consumers.notify.channels.base import DeliveryError
from consumers.notify.channels.email import plain_text
from consumers.notify.config import AppriseConfig, ConfigError
from consumers.notify.model import Notification

__all__ = ["AppriseChannel"]


class AppriseChannel:
    def __init__(self, config: AppriseConfig) -> None:
        try:
            import apprise
        except ImportError:
            raise ConfigError(
                f"channel {config.id}: the apprise package is not installed (pip install apprise)"
            ) from None
        self.config = config
        self._apprise: Any = apprise
        assert config.urls is not None
        self._urls = [u for u in re.split(r"[\s,]+", config.urls.get()) if u]
        if not self._urls:
            raise ConfigError(f"channel {config.id}: no Apprise URL given")

    def send(self, notification: Notification, progress: set[str]) -> None:
        apprise = self._apprise
        for index, target in enumerate(self._urls):
            key = f"url{index}"
            if key in progress:
                continue
            client = apprise.Apprise()
            if not client.add(target):
                raise DeliveryError(
                    f"apprise URL #{index} is not valid", retryable=False, error_type="DeliveryRejected"
                )
            ok = client.notify(
                title=notification.title, body=plain_text(notification), body_format=apprise.NotifyFormat.TEXT
            )
            if not ok:
                raise DeliveryError(f"apprise URL #{index}: the service did not accept the notification")
            progress.add(key)

    def close(self) -> None:
        pass
