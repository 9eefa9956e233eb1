"""The anomaly detector's settings (``AIMA_ANOMALY_*``), checked as a whole by :class:`AnomalyConfig`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from bus import catalogue
from bus.settings import AimaSettings, described
from streams.anomaly.processor import AnomalyConfig

__all__ = ["AnomalySettings"]


class AnomalySettings(AimaSettings):
    """The anomaly detector's baseline and thresholds (defaults:
    :class:`streams.anomaly.processor.AnomalyConfig`)."""

    model_config = SettingsConfigDict(env_prefix="AIMA_ANOMALY_")

    method: Literal["relations", "ewma_mad_zscore"] = Field(
        AnomalyConfig.method,
        description="relations: healthy-GPU relations per GPU (quiet on job start/stop); ewma_mad_zscore: "
        "every watched gauge against its own baseline",
    )
    alpha: float = Field(
        AnomalyConfig.alpha,
        description="ewma_mad_zscore: weight of a new sample in the baseline after the warm-up",
    )
    warmup: int = Field(
        AnomalyConfig.warmup,
        description="samples a series learns from before it can be flagged (relations: half of it for each "
        "busy/idle anchor and clock baseline)",
    )
    threshold: float = Field(AnomalyConfig.threshold, description="score from which a sample is an anomaly")
    alert_threshold: float | None = described(
        None,
        "score from which an anomaly also raises an alert",
        shown="6 (relations, after alert_after in a row), 10 (ewma_mad_zscore)",
    )
    resolve_after: int = Field(
        AnomalyConfig.resolve_after, description="normal samples in a row that resolve the alert"
    )
    alert_after: int = Field(
        AnomalyConfig.alert_after,
        description="relations: samples in a row from the alert threshold before an alert fires",
    )
    thermal_lag_s: float = Field(
        AnomalyConfig.thermal_lag_s, description="relations: time constant of temperature following power"
    )
    metrics: Annotated[tuple[str, ...] | None, NoDecode] = described(
        None,
        "ewma_mad_zscore: metrics to watch (comma-separated names)",
        shown="every gauge of the GPU, system and queue samples",
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _name_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(name.strip() for name in value.split(",") if name.strip())
        for name in value or ():
            try:
                catalogue.get(name)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AnomalySettings:
        try:
            self.config()  # AnomalyConfig checks the combination (threshold <= alert_threshold, ...)
        except ValueError as exc:
            variables = ", ".join(f"AIMA_ANOMALY_{name.upper()}" for name in sorted(self.model_fields_set))
            raise ValueError(f"{exc} (set: {variables or 'none'})") from None
        return self

    def config(self) -> AnomalyConfig:
        return AnomalyConfig(
            method=self.method,
            alert_after=self.alert_after,
            thermal_lag_s=self.thermal_lag_s,
            alpha=self.alpha,
            warmup=self.warmup,
            threshold=self.threshold,
            alert_threshold=self.alert_threshold,
            resolve_after=self.resolve_after,
            metrics=self.metrics,
        )
