"""The notification channels, one module each, and :func:`build` that makes one from its configuration."""

from __future__ import annotations

import httpx

from consumers.notify.channels.base import Channel, DeliveryError
from consumers.notify.config import (
    AppriseConfig,
    ChannelConfig,
    EmailConfig,
    NowhereConfig,
    SlackConfig,
    SmsConfig,
    TeamsConfig,
    WebhookConfig,
)

__all__ = ["Channel", "DeliveryError", "build"]


def build(config: ChannelConfig, client: httpx.Client) -> Channel:
    """The channel for ``config``; HTTP channels share ``client`` (its connection pool)."""
    if isinstance(config, WebhookConfig):
        from consumers.notify.channels.webhook import WebhookChannel

        return WebhookChannel(config, client)
    if isinstance(config, SlackConfig):
        from consumers.notify.channels.slack import SlackChannel

        return SlackChannel(config, client)
    if isinstance(config, TeamsConfig):
        from consumers.notify.channels.teams import TeamsChannel

        return TeamsChannel(config, client)
    if isinstance(config, EmailConfig):
        from consumers.notify.channels.email import EmailChannel

        return EmailChannel(config)
    if isinstance(config, SmsConfig):
        from consumers.notify.channels.sms import SmsChannel

        return SmsChannel(config, client)
    if isinstance(config, AppriseConfig):
        from consumers.notify.channels.apprise import AppriseChannel

        return AppriseChannel(config)
    if isinstance(config, NowhereConfig):
        from consumers.notify.channels.nowhere import NowhereChannel

        return NowhereChannel(config)
    raise TypeError(f"no channel for {type(config).__name__}")
