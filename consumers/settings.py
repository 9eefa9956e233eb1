"""The consumers' settings beyond :class:`bus.settings.Settings`: the sink's writers and the notifier's
routing file. Their `aima-metrics` commands build them once at the start and pass them down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bus.settings import AimaSettings, described

__all__ = ["NotifySettings", "SinkSettings"]


class SinkSettings(AimaSettings):
    model_config = SettingsConfigDict(env_prefix="AIMA_SINK_")

    writers: int = Field(
        2,
        ge=1,
        description="database connections the sink writes batches on, side by side (`aima-metrics sink "
        "--writers` overrides it)",
    )


class NotifySettings(AimaSettings):
    model_config = SettingsConfigDict(env_prefix="AIMA_NOTIFY_")

    config: Path | None = described(
        None,
        "notification routing and channels (format: consumers/notify/config.py); secrets by variable or file "
        "name only; unset: no channels, alerts are only counted",
        shown="infra/notify/local.yaml under `up`",
    )
