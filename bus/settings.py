"""The settings every process shares (:class:`Settings`) and the base of each component's own model
(:class:`AimaSettings`), read from environment variables (prefix ``AIMA_``) and an optional ``aima.env``
file. Nothing is read at import time: a process builds its models once where it starts (its CLI command or
``run()``) and passes them down. These models are the only code that reads ``AIMA_*`` variables
(tests/unit/test_settings_env.py checks it); the README's table is generated from them
(``python -m aima_metrics.settings_doc``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import (
    AliasChoices,
    AliasPath,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

__all__ = ["REPO_ROOT", "AimaSettings", "Settings", "SettingsError", "env_name"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# A mapping given to AimaSettings.from_environ stands in for os.environ (and the env file) while one
# model is built: tests describe an environment without changing the process's own.
_GIVEN_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("aima_given_environ", default=None)


class SettingsError(ValueError):
    """A variable with a value its model refuses; the message names the variable (not the field)."""


class _MappingEnvSource(EnvSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._given = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._given, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def env_name(model: type[BaseSettings], field: str) -> str:
    """The variable that sets ``field`` of ``model``: its alias where it has one, else prefix + name."""
    info = model.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices | AliasPath):  # pragma: no cover - not used by our models
        raise TypeError(f"{model.__name__}.{field}: only a plain string alias names one variable")
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def _explain(model: type[BaseSettings], exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        field = str(loc[0]) if loc else None
        if field is not None and field not in model.model_fields:
            # Addressed by its alias (validation_alias): find the field that has it.
            field = next((n for n, i in model.model_fields.items() if i.validation_alias == field), field)
        where = env_name(model, field) if field in model.model_fields else model.__name__
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] in ("float_parsing", "int_parsing", "int_from_float", "float_type", "int_type"):
            message = "not a number"
        got = error.get("input")
        parts.append(
            f"{where}: {message}" + (f": {got!r}" if loc and isinstance(got, str | int | float) else "")
        )
    return "; ".join(parts)


class AimaSettings(BaseSettings):
    """What every settings model shares: the ``AIMA_`` prefix, the ``aima.env`` file, errors that name the
    variable, and :meth:`from_environ`. A component's model sets its own prefix (``AIMA_API_``, ...)."""

    model_config = SettingsConfigDict(
        env_prefix="AIMA_",
        env_file=("aima.env",),
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    blank_is_unset: ClassVar[bool] = True
    """Component variables set to an empty or blank value keep their default, as their hand-written
    parsers did (``AIMA_STREAMS_WEB_PORT=`` in a compose file means off, not an error)."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # Raised at the process's start, so the message must say which variable to fix.
            raise SettingsError(_explain(type(self), exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = _GIVEN_ENVIRON.get()
        if given is None:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        return init_settings, _MappingEnvSource(settings_cls, given)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **values: Any) -> Self:
        """The model as ``environ`` (instead of the process's environment and env file) sets it."""
        with _given(environ):
            return cls(**values)

    @field_validator("*", mode="before")
    @classmethod
    def _blank_keeps_default(cls, value: Any) -> Any:
        if cls.blank_is_unset and isinstance(value, str) and not value.strip():
            raise PydanticUseDefault()
        return value


@contextmanager
def _given(environ: Mapping[str, str]) -> Iterator[None]:
    token = _GIVEN_ENVIRON.set(environ)
    try:
        yield
    finally:
        _GIVEN_ENVIRON.reset(token)


def described(default: Any, description: str, *, shown: str | None = None, **kwargs: Any) -> Any:
    """A Field with its README line; ``shown`` is the default as the README writes it, where the value
    itself says less (a path inside this checkout, a default computed from another setting)."""
    extra = {"shown_default": shown} if shown is not None else None
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def shown_default(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    return str(extra["shown_default"]) if isinstance(extra, dict) and "shown_default" in extra else None


class Settings(AimaSettings):
    """The settings of every process: broker, topics, schemas, database, self-metrics and the stop."""

    # An empty AIMA_TOPIC_PREFIX means no prefix, and so on: these keep pydantic's plain reading.
    blank_is_unset: ClassVar[bool] = False

    state_dir: Path = described(
        REPO_ROOT / ".aima", "where the local services keep data, logs and pid files", shown="<repo>/.aima"
    )

    kafka_bootstrap: str = described(
        "127.0.0.1:9092", "Kafka bootstrap servers", shown="127.0.0.1:$AIMA_KAFKA_PORT"
    )
    kafka_port: int = Field(9092, description="port of the local broker that `aima-metrics up` runs")
    kafka_controller_port: int = Field(9093, description="controller port of the local broker")
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: str | None = Field(None, description="SASL mechanism (PLAIN, SCRAM-SHA-512, ...)")
    kafka_sasl_username: str | None = Field(None, description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password")
    kafka_ssl_ca_location: Path | None = Field(None, description="CA bundle that verifies the brokers (TLS)")
    kafka_debug: str | None = Field(
        default=None,
        description="librdkafka debug contexts for every confluent-kafka client (e.g. `cgrp,fetch`), logged "
        "at debug level: for diagnosing a client that misbehaves, never for a normal run",
    )
    topic_prefix: str = Field(
        "aima.",
        description="prefix of every topic name; under another prefix the sink and the notifier consume as "
        "`<prefix>sink` and `<prefix>notify` (under `aima.`: `aima-sink`, `aima-notify`)",
    )
    topic_replication: int = Field(1, description="replication factor of the topics this project creates")
    schema_dir: Path | None = described(
        None,
        "folder of the `.avsc` schemas and their `history/` that a process writes and reads with",
        shown="avro/ (packaged as bus/avro)",
    )
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias="SCHEMA_REGISTRY_URL",
        description="when set, records use the Confluent wire format with this Schema Registry",
    )

    database_url: SecretStr | None = described(
        None,
        "libpq URL of PostgreSQL/TimescaleDB (`sslmode=` for TLS)",
        shown="the local stack's DSN (<state_dir>/postgres/dsn)",
    )
    pg_port: int = Field(55432, description="port of the local PostgreSQL that `aima-metrics up` runs")

    metrics_port: int = described(
        0,
        "Prometheus self-metrics port of a long-running process (`up` gives each its own); 0 picks a "
        "free one",
        shown="per process",
    )
    stop_timeout_s: float = Field(
        30.0,
        gt=0,
        description="after SIGTERM or SIGINT a process exits within this bound, whatever it is doing (a "
        "second signal: at once)",
    )
    max_clock_skew_s: float = Field(
        300.0,
        gt=0,
        description="records whose event time is further ahead of the checking process's clock are "
        "dead-lettered (`FutureEventTime`) by the publisher, the stream app and the sink, and never move a "
        "watermark",
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
