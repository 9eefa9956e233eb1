"""The command line's and the local stack's own settings (`aima-metrics up` and its children), beyond
:class:`bus.settings.Settings`; built by the command that needs them, when it starts."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from aima_metrics.lifecycle import SUPERVISOR_ENV
from bus.settings import AimaSettings, described

__all__ = ["LifecycleSettings", "StackSettings"]


class StackSettings(AimaSettings):
    """What `up` and the development webhook receiver read."""

    port_base: int = Field(
        9100, gt=0, lt=65526, description="`up` gives its processes the self-metrics ports base+1 … base+9"
    )
    # The scripts also run by hand (infra/kafka/kafka.sh start) and then fall back to the same defaults.
    kafka_heap: str = Field("512m", description="heap of the local broker (infra/kafka/kafka.sh)")
    kafka_start_timeout_s: int = Field(
        90, gt=0, description="how long infra/kafka/kafka.sh waits for the local broker to answer"
    )
    cache_dir: str | None = described(
        None, "where infra/kafka/kafka.sh keeps the Kafka jars it resolves", shown="<repo>/.aima/cache"
    )
    pg_db: str = Field("aima", description="database of the local PostgreSQL (infra/postgres/postgres.sh)")
    pg_user: str = Field("aima", description="user of the local PostgreSQL (infra/postgres/postgres.sh)")
    s3_port: int = Field(
        8333,
        gt=0,
        lt=55535,
        description="S3 port of the local SeaweedFS (infra/seaweedfs/seaweedfs.sh; the archive's store, D5); "
        "its master, volume and filer take the next three ports",
    )
    s3_access_key: str = Field("aima", description="access key of the local SeaweedFS's S3 identity")
    s3_secret_key: SecretStr | None = described(
        None,
        "secret key of the local SeaweedFS's S3 identity (the compose stack requires it)",
        shown="generated into .aima/seaweedfs/secret_key",
    )
    s3_start_timeout_s: int = Field(
        60, gt=0, description="how long infra/seaweedfs/seaweedfs.sh waits for the local S3 store to answer"
    )
    prometheus_port: int = Field(
        9090,
        gt=0,
        lt=65536,
        description="port of the local Prometheus `up` starts, scraping every process (not started when no "
        "`prometheus` is on PATH)",
    )
    prometheus_retention: str = Field(
        "1d",
        description="how long the local Prometheus keeps samples (the short-term store; the database keeps "
        "the rollups)",
    )
    webhook_key: SecretStr | None = described(
        None,
        "HMAC key of signed webhooks: the local notifier signs with it, `aima-metrics webhook-receiver` "
        "checks it",
        shown="generated into .aima/webhook/key",
    )
    # infra/jaeger/jaeger.sh: the trace backend of the tracing tests (A6); not started by `up`.
    jaeger_otlp_port: int = Field(
        4318, gt=0, lt=65536, description="OTLP/HTTP port of the local Jaeger (infra/jaeger/jaeger.sh)"
    )
    jaeger_query_port: int = Field(
        16686,
        gt=0,
        lt=65535,
        description="query API port of the local Jaeger; its gRPC query API takes the next port",
    )
    jaeger_run_dir: str | None = described(
        None,
        "where infra/jaeger/jaeger.sh keeps its config, log and pid file (a second instance needs its own)",
        shown="<repo>/.aima/jaeger",
    )
    jaeger_start_timeout_s: int = Field(
        60, gt=0, description="how long infra/jaeger/jaeger.sh waits for the local Jaeger's query API"
    )


class LifecycleSettings(AimaSettings):
    """Set by `up` in its children's environment, never by hand (aima_metrics/lifecycle.py)."""

    model_config = SettingsConfigDict(env_file=None)

    supervisor_pid: int | None = Field(
        None,
        validation_alias=SUPERVISOR_ENV,
        description="set by `up` in its children: the pid whose death ends them",
    )
