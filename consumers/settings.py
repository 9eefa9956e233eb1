"""The consumers' settings beyond :class:`bus.settings.Settings`: the sink's writers and retention
schedule, how long each table keeps its rows, and the notifier's routing file. Their `aima-metrics`
commands build them once at the start and pass them down."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from bus.durations import parse_duration
from bus.settings import AimaSettings, described
from bus.tiers import TIERS

__all__ = [
    "ARCHIVABLE",
    "FOREVER",
    "RAW_TABLES",
    "ArchiveSettings",
    "NotifySettings",
    "ReaderSettings",
    "RetentionSettings",
    "SinkSettings",
]

FOREVER = ("forever", "unlimited", "never")
"""Values of an AIMA_RETENTION_* variable that keep a table's rows for ever."""


class SinkSettings(AimaSettings):
    model_config = SettingsConfigDict(env_prefix="AIMA_SINK_")

    writers: int = Field(
        2,
        ge=1,
        description="database connections the sink writes batches on, side by side (`aima-metrics sink "
        "--writers` overrides it)",
    )
    retention_every_s: float = Field(
        3600.0,
        ge=0,
        description="seconds between the sink's retention runs (the periods: AIMA_RETENTION_*); 0: never "
        "(then only `aima-metrics db retention` applies it). With TimescaleDB the tables its own policies "
        "trim are left to them",
    )
    selective_storage: Path | None = described(
        None,
        "selective storage file (D6: per-metric deadband and heartbeat of raw GPU and system samples; "
        "format in bus/selective_storage.yaml); unset: that file, which ships with `enabled: false`",
        shown="bus/selective_storage.yaml (off)",
    )


class RetentionSettings(AimaSettings):
    """How long each table keeps its rows (D2, K2): durations such as 24h, 7d, 1y (a year is 365 days), or
    ``forever``. consumers/retention.py's POLICIES says which table and column each one governs; the sink's
    scheduled run and `aima-metrics db retention` both read this model."""

    model_config = SettingsConfigDict(env_prefix="AIMA_RETENTION_")

    raw: timedelta | None = described(
        timedelta(hours=24),
        "raw samples (gpu_samples, system_samples, system_disk_samples, system_network_samples, job_timings, "
        "job_events, queue_samples, pod_status; by time); plain PostgreSQL drops whole daily partitions, so "
        "a row lives up to one day longer. With TimescaleDB its retention policy, set at migration, rules",
        shown="24h",
    )
    hour: timedelta | None = described(
        timedelta(days=7), "hourly rollups (rollups of tier hour; by bucket_end)", shown="7d"
    )
    day: timedelta | None = described(
        timedelta(days=30), "daily rollups (rollups of tier day; by bucket_end)", shown="30d"
    )
    month: timedelta | None = described(
        timedelta(days=365), "monthly rollups (rollups of tier month; by bucket_end)", shown="1y"
    )
    year: timedelta | None = described(
        None, "yearly rollups (rollups of tier year; by bucket_end)", shown="forever"
    )
    costs: timedelta | None = described(
        timedelta(days=365),
        "GPU hours and job costs (costs of kind gpu_hours and job_cost; by period_end), and where jobs ran "
        "and the GPUs they held (job_placements; by time)",
        shown="1y",
    )
    energy: timedelta | None = described(
        timedelta(days=90),
        "each GPU's energy and its cost per hour (gpu_energy; by period_end: after that, a project's share "
        "of the hour falls back to the GPU-hour average); the figures per GPU model and per project are "
        "costs, kept as those",
        shown="90d",
    )
    budgets: timedelta | None = described(
        timedelta(days=730),
        "budget figures (costs of kind budget, the budgets view; by period_end, so a running period stays)",
        shown="2y",
    )
    alert_history: timedelta | None = described(
        timedelta(days=90),
        "alert state changes (alert_history; by event_time); the firing row of an episode not yet resolved "
        "stays, so current alerts are never lost",
        shown="90d",
    )
    anomalies: timedelta | None = described(timedelta(days=30), "anomalies (by time)", shown="30d")
    dead_letters: timedelta | None = described(
        timedelta(days=30), "dead letters of every stage (dead_letters; by time)", shown="30d"
    )
    notification_log: timedelta | None = described(
        timedelta(days=90),
        "what the notifier delivered where (notification_log; by updated_at); rows of an episode still "
        "firing in alert_history stay, so its resolution is still told once",
        shown="90d",
    )
    audit_log: timedelta | None = described(
        timedelta(days=365),
        "API access audit (audit_log; by time; A3 asks for at least a year)",
        shown="1y",
    )
    silences: timedelta | None = described(
        timedelta(days=90),
        "silences that ended this long ago (silences; by ends_at: a pending or active one never goes). "
        "api_tokens are never expired (revoke them instead)",
        shown="90d",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in FOREVER:
            return None
        if value is None or isinstance(value, timedelta) or (isinstance(value, str) and not value.strip()):
            return value  # a blank value keeps the default (AimaSettings)
        keep = parse_duration(value)  # its InvalidDuration is a ValueError: pydantic names the variable
        if keep <= timedelta(0):
            raise ValueError(f"must be longer than 0 or one of {', '.join(FOREVER)}")
        return keep


RAW_TABLES = (
    "gpu_samples",
    "gpu_process_samples",
    "system_samples",
    "system_disk_samples",
    "system_network_samples",
    "job_timings",
    "job_events",
    "queue_samples",
    "pod_status",
)
"""The raw tables (daily partitions in plain PostgreSQL, hypertables with TimescaleDB): what the raw
retention period governs and the archive holds first."""

ARCHIVABLE = (*RAW_TABLES, *(f"rollups:{tier}" for tier in TIERS))
"""What the archive can hold (D5): the raw tables and each rollup tier (``rollups`` alone: every tier)."""


class ArchiveSettings(AimaSettings):
    """The long-term archive (D5, consumers/archive/): before retention drops raw rows or rollups, they go
    to an S3-compatible bucket as Parquet. Off unless AIMA_ARCHIVE_BUCKET is set."""

    model_config = SettingsConfigDict(env_prefix="AIMA_ARCHIVE_")

    bucket: str | None = described(
        None,
        "S3 bucket of the archive; set, retention drops nothing it has not archived first; unset: no archive",
        shown="unset (off)",
    )
    endpoint_url: str | None = described(
        None,
        "S3 endpoint of a non-AWS store (SeaweedFS, MinIO: http://127.0.0.1:8333); unset: AWS",
        shown="unset (AWS)",
    )
    region: str = Field("us-east-1", description="S3 region the requests are signed for")
    access_key_id: SecretStr | None = described(
        None, "S3 access key; unset: the AWS SDK's own chain (AWS_* variables, instance roles)", shown="unset"
    )
    secret_access_key: SecretStr | None = described(
        None, "S3 secret key (with the access key)", shown="unset"
    )
    prefix: str | None = described(
        None,
        "key prefix inside the bucket (several deployments or schemas sharing one bucket)",
        shown="none: keys start with the table",
    )
    tables: str = described(
        ",".join(ARCHIVABLE),
        "what is archived before it is dropped, comma-separated: raw table names, rollups:<tier> or "
        "rollups (every tier); what is not listed is dropped without archive",
        shown="every raw table and rollup tier",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="seconds an S3 request may take to connect or answer before the run gives up"
    )

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("tables")
    @classmethod
    def _known(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [n for n in names if n not in ARCHIVABLE and n != "rollups"]
        if unknown:
            raise ValueError(f"cannot archive {', '.join(unknown)}; known: rollups, {', '.join(ARCHIVABLE)}")
        return ",".join(names)

    @property
    def enabled(self) -> bool:
        return self.bucket is not None

    def archived(self, table: str, tier: str = "") -> bool:
        """Whether the rows of ``table`` (of rollup ``tier``) are archived before they are dropped."""
        if not self.enabled:
            return False
        names = set(self.tables.split(","))
        return table in names or (bool(tier) and f"{table}:{tier}" in names)


class ReaderSettings(AimaSettings):
    """The password `aima-metrics db grant-reader` gives a dashboard login (consumers/readers.py)."""

    model_config = SettingsConfigDict(env_prefix="AIMA_DB_READER_")

    password: SecretStr | None = described(
        None,
        "password of the login `aima-metrics db grant-reader` creates or updates (Grafana's datasource "
        "uses the same variable); unset: the command asks for it",
        shown="unset (asked)",
    )


class NotifySettings(AimaSettings):
    model_config = SettingsConfigDict(env_prefix="AIMA_NOTIFY_")

    config: Path | None = described(
        None,
        "notification routing and channels (format: consumers/notify/config.py); secrets by variable or file "
        "name only; unset: no receiver, every alert is dead-lettered (error type NoReceiver)",
        shown="infra/notify/local.yaml under `up`",
    )
