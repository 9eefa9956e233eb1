"""Kafka client factories (confluent-kafka and aiokafka) built from the one settings object, and the
topic administration every process shares."""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from bus.settings import Settings
from bus.topics import TOPICS, TopicSpec, topic_name

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """No broker answered a metadata request in time."""


class TopicsNotReady(RuntimeError):
    """Topics just created are not in the broker's metadata (with a leader for every partition) in time."""


def client_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for any confluent-kafka client, security included (P2)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username or ""
        if settings.kafka_sasl_password is not None:
            config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_ca_location:
        config["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    config.update(extra)
    if settings.kafka_debug:
        config.update({"debug": settings.kafka_debug, "log_level": 7})
        if isinstance(config.get("logger"), logging.Logger):
            config["logger"].setLevel(logging.DEBUG)  # the service's level would drop librdkafka's lines
    return config


def quiet_config(client: str) -> dict[str, Any]:
    """librdkafka settings for a long-running client that must stay quiet and cheap while the broker is
    away: reconnects back off exponentially (0.5 s doubling to 10 s), and its own log lines and errors go
    through Python logging (logger ``librdkafka.<client>``), where :class:`bus.logs.RepeatFilter`
    summarises them, instead of straight to stderr. Logs and errors are served by the client's
    poll/consume/flush calls."""
    logger = logging.getLogger(f"librdkafka.{client}")

    def on_error(error: Any) -> None:
        # Informational unless fatal: the client recovers by itself (a fatal one also fails its calls).
        logger.log(logging.ERROR if error.fatal() else logging.WARNING, "kafka client error: %s", error)

    return {
        "logger": logger,
        "log_level": 5,  # syslog notice and worse: librdkafka's info lines are chatter
        "error_cb": on_error,
        "reconnect.backoff.ms": 500,
        "reconnect.backoff.max.ms": 10_000,
    }


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """The same connection settings in aiokafka's (and so Faust's) vocabulary."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.endswith("SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_ca_location) if settings.kafka_ssl_ca_location else None
        )
        config["ssl_context"] = context
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return config


def admin(settings: Settings) -> AdminClient:
    # log_level 3: librdkafka's notices about purging its background queue on close are noise here.
    return AdminClient(client_config(settings, log_level=3))


def wait_for_broker(settings: Settings, timeout_s: float = 60.0) -> int:
    """Block until the cluster answers a metadata request; returns the number of brokers."""
    client = admin(settings)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            metadata = client.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            if metadata.brokers:
                return len(metadata.brokers)
        except KafkaException as exc:
            last = exc
        time.sleep(0.5)
    raise BrokerUnavailable(
        f"no Kafka broker answered at {settings.kafka_bootstrap} within {timeout_s}s: {last}"
    )


BROKER_PROBE_S = 2.0
"""How long one try of :func:`broker_metadata_unless_stopped` waits: short, so a stop is seen at once."""
BROKER_RETRY_S = (0.5, 10.0)
"""The first and the longest pause between two tries while the broker is away."""
BROKER_REPORT_S = 60.0


def broker_metadata_unless_stopped(settings: Settings, stopping: threading.Event) -> Any | None:
    """The cluster's metadata once a broker answers, however long that takes, or None when ``stopping`` is
    set first. While the broker is away the tries back off (:data:`BROKER_RETRY_S`) and one warning line a
    minute says so, with the count of tries."""
    client = admin(settings)
    delay_s, attempts, reported = BROKER_RETRY_S[0], 0, -math.inf
    while not stopping.is_set():
        try:
            metadata = client.list_topics(timeout=BROKER_PROBE_S)
            if not metadata.brokers:
                raise KafkaException("the cluster lists no brokers")
        except KafkaException as exc:
            attempts += 1
            if time.monotonic() - reported >= BROKER_REPORT_S:
                reported = time.monotonic()
                log.warning(
                    "waiting for the broker",
                    extra={"kafka": settings.kafka_bootstrap, "attempts": attempts, "error": str(exc)},
                )
            stopping.wait(delay_s)
            delay_s = min(delay_s * 2, BROKER_RETRY_S[1])
            continue
        if attempts:
            log.info("the broker answers", extra={"kafka": settings.kafka_bootstrap, "attempts": attempts})
        return metadata
    return None


@dataclass(frozen=True)
class TopicState:
    name: str
    spec: TopicSpec | None
    partitions: int | None
    retention_ms: int | None
    cleanup_policy: str | None

    @property
    def exists(self) -> bool:
        return self.partitions is not None


def ensure_topics(
    settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS, timeout_s: float = 30.0
) -> list[str]:
    """Create the catalogue's topics that are missing, with explicit partitions and retention.
    Existing topics are left alone, so running it twice does no harm. Returns the names created."""
    return create_topics(
        settings,
        [(spec.name(settings.topic_prefix), spec.partitions, spec.config()) for spec in specs],
        timeout_s=timeout_s,
    )


def create_topics(
    settings: Settings, topics: Sequence[tuple[str, int, Mapping[str, str]]], timeout_s: float = 30.0
) -> list[str]:
    """Create the missing ones of ``topics`` (name, partitions, config) and wait until the broker's metadata
    shows each with a leader for every partition: a topic's creation is acknowledged before the broker
    serves it, and a client asking meanwhile is told it does not exist (aiokafka logs that as an error).
    Existing topics are left alone. Returns the names created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    wanted = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=settings.topic_replication,
            config=dict(config),
        )
        for name, partitions, config in topics
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in client.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            # Another process may have created it between our listing and our request.
            if exc.args and getattr(exc.args[0], "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                continue
            raise
    wait_for_topics(settings, {topic.topic: topic.num_partitions for topic in wanted}, timeout_s=timeout_s)
    log.info("created topics", extra={"topics": created})
    return created


def wait_for_topics(settings: Settings, partitions: Mapping[str, int], timeout_s: float = 30.0) -> None:
    """Block until the broker's metadata lists every topic of ``partitions`` (name: partition count) with a
    leader for each partition; raises :class:`TopicsNotReady` after ``timeout_s``."""
    client = admin(settings)
    deadline = time.monotonic() + timeout_s
    missing = dict(partitions)
    while True:
        metadata = client.list_topics(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        for name in list(missing):
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None or len(topic.partitions) < missing[name]:
                continue
            if all(partition.leader >= 0 for partition in topic.partitions.values()):
                del missing[name]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TopicsNotReady(f"not in the broker's metadata after {timeout_s} s: {sorted(missing)}")
        time.sleep(0.2)


def wait_for_group_coordinator(settings: Settings, group: str, timeout_s: float = 60.0) -> None:
    """Block until the broker coordinates consumer group ``group``. On a new cluster the first group makes
    the broker create its offsets topic, and until that is loaded every member is told the coordinator is
    not available (aiokafka logs each answer as an error) and commits wait."""
    client = admin(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            client.describe_consumer_groups([group], request_timeout=max(1.0, min(10.0, left)))[
                group
            ].result()
            return
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(
                    f"no coordinator for consumer group {group!r} within {timeout_s} s: {exc}"
                ) from exc
        time.sleep(0.5)


def partition_count(settings: Settings, key: str, timeout_s: float = 15.0) -> int | None:
    """How many partitions the catalogue topic ``key`` has on the broker (None: it does not exist). A topic
    made before this deployment, or by hand, may have another count than the catalogue's."""
    name = topic_name(settings, key)
    # The whole cluster's metadata, not the topic's: asking for one topic by name may create it.
    topic = admin(settings).list_topics(timeout=timeout_s).topics.get(name)
    if topic is None or topic.error is not None:
        return None
    return len(topic.partitions)


def describe_topics(settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS) -> list[TopicState]:
    """The catalogue's topics as the broker sees them (partitions, retention, cleanup policy)."""
    client = admin(settings)
    metadata = client.list_topics(timeout=15)
    names = [spec.name(settings.topic_prefix) for spec in specs]
    present = [n for n in names if n in metadata.topics]
    configs: dict[str, dict[str, str]] = {}
    if present:
        futures = client.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in present])
        for resource, future in futures.items():
            entries = future.result(timeout=15)
            configs[resource.name] = {k: v.value for k, v in entries.items()}
    states = []
    for spec, name in zip(specs, names, strict=True):
        topic = metadata.topics.get(name)
        config = configs.get(name, {})
        states.append(
            TopicState(
                name=name,
                spec=spec,
                partitions=len(topic.partitions) if topic is not None else None,
                retention_ms=int(config["retention.ms"]) if "retention.ms" in config else None,
                cleanup_policy=config.get("cleanup.policy"),
            )
        )
    return states
