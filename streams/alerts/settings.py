"""The alert processor's settings: which rule files it evaluates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from bus.settings import AimaSettings, described

__all__ = ["AlertSettings"]


class AlertSettings(AimaSettings):
    """The alert rules the alert processor evaluates."""

    model_config = SettingsConfigDict(env_prefix="AIMA_ALERT_")

    rules: Annotated[tuple[Path, ...], NoDecode] = described(
        (), f"extra rule files (`{os.pathsep}`-separated)", shown="none"
    )
    default_rules: bool = Field(True, description="`false` leaves out the five shipped default rules")

    @field_validator("rules", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(Path(part) for part in value.split(os.pathsep) if part.strip())
        return value
