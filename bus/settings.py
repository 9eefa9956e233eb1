"""One settings object for every process, read from environment variables (prefix ``AIMA_``) and an
optional env file; nothing is read at import time, callers build :class:`Settings` when they start."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AIMA_", env_file=("aima.env",), env_file_encoding="utf-8", extra="ignore"
    )

    state_dir: Path = Field(default=REPO_ROOT / ".aima", description="where local services keep state")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="defaults to the local broker on kafka_port")
    kafka_port: int = Field(9092, description="port of the local broker that `aima-metrics up` runs")
    kafka_controller_port: int = 9093
    pg_port: int = Field(55432, description="port of the local PostgreSQL that `aima-metrics up` runs")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: Path | None = None
    kafka_debug: str | None = Field(
        default=None,
        description="librdkafka debug contexts for every confluent-kafka client (e.g. cgrp,fetch), logged at "
        "debug level: for diagnosing a client that misbehaves, never for a normal run",
    )
    topic_prefix: str = "aima."
    topic_replication: int = 1
    schema_dir: Path | None = Field(
        default=None, description="folder of the .avsc schemas (and history/) to use instead of avro/"
    )
    schema_registry_url: str | None = Field(
        default=None, validation_alias="SCHEMA_REGISTRY_URL", description="Confluent wire format when set"
    )

    database_url: SecretStr | None = Field(
        default=None, description="libpq URL; local stack default read from <state_dir>/postgres/dsn"
    )

    metrics_port: int = Field(
        0, description="Prometheus self-metrics port of this process; 0 picks a free one"
    )
    stop_timeout_s: float = Field(
        30.0, gt=0, description="after SIGTERM or SIGINT a process exits within this bound, whatever it does"
    )
    max_clock_skew_s: float = Field(
        300.0,
        gt=0,
        description="records whose event time is further ahead of this process's clock are dead-lettered",
    )

    @model_validator(mode="after")
    def _local_broker_follows_port(self) -> Settings:
        if "kafka_bootstrap" not in self.model_fields_set:
            self.kafka_bootstrap = f"127.0.0.1:{self.kafka_port}"
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(value) <= allowed:
            raise ValueError(f"topic prefix {value!r} may only use letters, digits, '.', '_' and '-'")
        return value

    def database_dsn(self) -> str:
        """The PostgreSQL URL: AIMA_DATABASE_URL, else the one the local stack wrote."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        local = self.state_dir / "postgres" / "dsn"
        if local.exists():
            return local.read_text().strip()
        raise RuntimeError(
            f"no database configured: set AIMA_DATABASE_URL or start the local stack ({local} is missing)"
        )
