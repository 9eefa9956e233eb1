"""The stream app's own settings (:class:`StreamsSettings`, ``AIMA_STREAMS_*``): its group, batches,
commits, web server, logging and rollup timing. Each processor family has its settings in its own room
(``streams/<family>/settings.py``); streams/settings.py composes them for the worker."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from bus.settings import AimaSettings, described

__all__ = ["LogLevel", "StreamsSettings"]

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
