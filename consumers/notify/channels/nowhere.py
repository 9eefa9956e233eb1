"""The channel of a notifier without a routing file: it tells nobody, so every attempt fails for good and
delivery dead-letters the notification with the reason, counts it and logs it like any other (N2, N4: an
alert is never settled untold)."""

from __future__ import annotations

from consumers.notify.channels.base import DeliveryError
from consumers.notify.config import NowhereConfig
from consumers.notify.model import Notification

__all__ = ["NO_RECEIVER", "NowhereChannel"]

NO_RECEIVER = "NoReceiver"
"""The dead letter's error type."""


class NowhereChannel:
    def __init__(self, config: NowhereConfig) -> None:
        self.config = config

    def send(self, notification: Notification, progress: set[str]) -> None:
        raise DeliveryError(self.config.reason, retryable=False, error_type=NO_RECEIVER)

    def close(self) -> None:
        pass
