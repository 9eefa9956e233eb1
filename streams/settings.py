"""The stream worker's settings, beyond the shared :class:`bus.settings.Settings`: the app itself
(:class:`StreamsSettings`) and each processor family's (costs, alerts, anomalies). ``streams.main.run``
builds them once when the worker starts and hands each processor family its own."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from bus import catalogue
from bus.settings import AimaSettings, described
from streams.anomaly import AnomalyConfig
from streams.costs import DEFAULT_PRICES_FILE

__all__ = ["AlertSettings", "AnomalySettings", "CostSettings", "StreamsSettings", "WorkerSettings"]

LogLevel = Literal["crit", "error", "warn", "info", "debug"]


class StreamsSettings(AimaSettings):
    """The Faust app of one worker: its group, batches, commits, web server, logging and rollup timing."""

    model_config = SettingsConfigDict(env_prefix="AIMA_STREAMS_")

    app_id: str = Field(
        "aima-streams",
        description="consumer group and prefix of the app's internal topics; workers with the same id share "
        "the work",
    )
    batch_max: int = Field(10000, ge=1, description="most records one fetch hands to the processors")
    commit_interval_s: float = Field(2.8, ge=0, description="how often acknowledged offsets are committed")
    session_timeout_s: float = Field(
        30.0, ge=0, description="how long the group waits for a silent (killed, hung) worker"
    )
    web_port: int | None = described(
        None, "port of Faust's own web server (/stats, /router, ...)", shown="off"
    )
    log_level: LogLevel = Field("info", description="crit, error, warn, info or debug")
    lateness_s: float = Field(
        600.0, ge=0, description="rollups: allowed lateness behind the partition's event-time watermark"
    )
    emit_interval_s: float = Field(
        60.0, ge=0, description="rollups: event time between two non-final upserts of one bucket"
    )
    gc_threshold: Annotated[tuple[int, int, int], NoDecode] = described(
        (50_000, 20, 100),
        # Why not Python's (700, 10, 10): the worker allocates a few objects per sample and keeps large
        # state; young-generation passes took about a third of the rollup processor's time in the bench.
        "the worker's `gc.set_threshold` (Python's default is `700,10,10`; cycles are rare here, so passes "
        "can be rarer)",
        shown="50000,20,100",
    )
    store: str | None = described(
        None,
        "Faust table store URL (`rocksdb://`, `memory://`)",
        shown="rocksdb:// when rocksdict is installed, else memory://",
    )
    transient_retry_max_s: float = Field(
        30.0, gt=0, description="longest pause between retries of a record that failed for a transient reason"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("gc_threshold", mode="before")
    @classmethod
    def _three_counts(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            counts = tuple(int(part) for part in value.split(","))
        except ValueError:
            counts = ()
        if len(counts) != 3 or min(counts) < 1:
            raise ValueError("must be three positive integers a,b,c")
        return counts

    @property
    def lateness(self) -> timedelta:
        return timedelta(seconds=self.lateness_s)

    @property
    def emit_interval(self) -> timedelta:
        return timedelta(seconds=self.emit_interval_s)


class CostSettings(AimaSettings):
    """The cost processors: price catalogue, budgets and how long their figures stay open."""

    prices_file: Path = described(
        DEFAULT_PRICES_FILE,
        "price catalogue, EUR per GPU-hour (re-read when it changes)",
        shown="streams/prices.yaml",
    )
    budgets_file: Path | None = Field(
        None, description="project budgets (re-read when it changes); unset: no budgets"
    )
    cost_config_check_s: float = Field(
        30.0, gt=0, description="how often the two files are checked for changes"
    )
    device_max_gap_s: float = Field(
        60.0, gt=0, description="longest gap between two samples of a GPU that still counts as present"
    )
    cost_retention_s: float = Field(
        48 * 3600.0,
        gt=0,
        description="how far behind its partition's event-time watermark (as it stood at each record) a "
        "job's hours stay open",
    )
    device_hours_retention_s: float = Field(
        48 * 3600.0,
        gt=0,
        description="how far behind the watermark a GPU's coverage stays open; only a GPU sample that far "
        "behind on its own partition is dead-lettered (`LateSample`, the reason names the processor and the "
        "variable)",
    )
    idle_hours_retention_s: float = Field(
        45 * 24 * 3600.0, gt=0, description="how far behind the watermark an idle hour stays open"
    )
    idle_device_stale_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="a GPU that far behind the newest stops holding back the idle-hours clock (the "
        "slowest GPU)",
    )


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


class AnomalySettings(AimaSettings):
    """The anomaly detector's baseline and thresholds (defaults: :class:`streams.anomaly.AnomalyConfig`)."""

    model_config = SettingsConfigDict(env_prefix="AIMA_ANOMALY_")

    alpha: float = Field(
        AnomalyConfig.alpha, description="weight of a new sample in the baseline after the warm-up"
    )
    warmup: int = Field(
        AnomalyConfig.warmup, description="samples a series learns from before it can be flagged"
    )
    threshold: float = Field(AnomalyConfig.threshold, description="score from which a sample is an anomaly")
    alert_threshold: float = Field(
        AnomalyConfig.alert_threshold, description="score from which an anomaly also raises an alert"
    )
    resolve_after: int = Field(
        AnomalyConfig.resolve_after, description="normal samples in a row that resolve the alert"
    )
    metrics: Annotated[tuple[str, ...] | None, NoDecode] = described(
        None,
        "metrics to watch (comma-separated names)",
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
            alpha=self.alpha,
            warmup=self.warmup,
            threshold=self.threshold,
            alert_threshold=self.alert_threshold,
            resolve_after=self.resolve_after,
            metrics=self.metrics,
        )


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one stream worker reads beyond :class:`bus.settings.Settings`, built once at its start."""

    app: StreamsSettings
    costs: CostSettings
    alerts: AlertSettings
    anomaly: AnomalySettings

    @classmethod
    def load(cls) -> WorkerSettings:
        """From the process's environment and env file; a bad value raises SettingsError naming it."""
        return cls(StreamsSettings(), CostSettings(), AlertSettings(), AnomalySettings())

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSettings:
        return cls(
            StreamsSettings.from_environ(environ),
            CostSettings.from_environ(environ),
            AlertSettings.from_environ(environ),
            AnomalySettings.from_environ(environ),
        )
