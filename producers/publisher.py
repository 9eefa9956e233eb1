"""Publishes contract records to Kafka: validated, Avro-encoded, keyed per source, idempotent.

Never blocks its caller: records wait in librdkafka's bounded queue while the broker is away, and when
that is full they are dropped and counted, so a job that publishes keeps running. Invalid records (the
rules of bus/validation.py, label lengths included, and event times further ahead of this host's clock than
AIMA_MAX_CLOCK_SKEW_S) are not sent to their topic; they go to the dead-letter topic with the reason."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import REGISTRY, CollectorRegistry

from bus import self_metrics
from bus.codec import Codec
from bus.errors import CodecError
from bus.kafka import client_config, quiet_config
from bus.settings import Settings
from bus.topics import topic_name
from bus.tracing import Tracing, open_tracing
from bus.validation import EventTimeGuard, InvalidRecord, Validator

log = logging.getLogger(__name__)

LAST_FLUSH_RESERVE = 0.5
"""Of the stop bound, what a stopping process keeps after its publisher's last flush: with the broker away
a flush would otherwise wait to the bound's end, leaving the exit no margin."""


class _Stoppable(Protocol):
    def time_left_s(self) -> float: ...


def last_flush_s(service: _Stoppable | None, settings: Settings, default_s: float = 30.0) -> float:
    """How long a stopping process's last flush may wait: until ``LAST_FLUSH_RESERVE`` of the stop bound
    is left (a deadline, so flushes one after the other share it); ``default_s`` without a service. What
    is still unacknowledged then was never on a topic: it is counted as pending, and lost."""
    if service is None:
        return default_s
    return max(0.0, service.time_left_s() - settings.stop_timeout_s * LAST_FLUSH_RESERVE)


class PublisherMetrics:
    """Names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = self_metrics.counter("aima_producer_records_total", registry)
        self.latency = self_metrics.histogram(
            "aima_producer_send_latency_seconds",
            registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


class Publisher:
    def __init__(
        self,
        settings: Settings,
        *,
        codec: Codec | None = None,
        registry: CollectorRegistry = REGISTRY,
        source: str = "producer",
        buffer_records: int = 100_000,
        delivery_timeout_s: float = 300.0,
        tracing: Tracing | None = None,
        **producer_config: Any,
    ) -> None:
        """``buffer_records`` bounds what waits while the broker is away; ``delivery_timeout_s`` is how
        long a record may wait before it counts as failed. ``tracing``: bus/tracing.py; by default the
        process's, from ``AIMA_OTEL_*`` (off unless an endpoint is set)."""
        self.settings = settings
        self.codec = codec or Codec.from_settings(settings)
        self.metrics = PublisherMetrics(registry)
        self.source = source
        self.tracing = tracing if tracing is not None else open_tracing(f"aima-{source}")
        config = client_config(
            settings,
            **{
                "acks": "all",
                "enable.idempotence": True,
                "compression.type": "zstd",
                "linger.ms": 20,
                "batch.num.messages": 10_000,
                "queue.buffering.max.messages": buffer_records,
                "message.timeout.ms": int(delivery_timeout_s * 1000),
                "client.id": f"aima-{source}",
                **quiet_config(source),
            },
        )
        config.update(producer_config)
        self._producer = Producer(config)
        self._deadletter = topic_name(settings, "deadletter")
        self._validator = Validator()
        self._event_times = EventTimeGuard(settings.max_clock_skew_s)
        self.delivered = 0
        self.failed = 0
        self.invalid = 0
        self.dropped = 0

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        """Queue one record for the catalogue topic ``topic_key``; False when it was invalid (and
        dead-lettered) or dropped because the buffer is full."""
        topic = topic_name(self.settings, topic_key)
        try:
            self._validator.check(record_name, value)
            self._event_times.check(record_name, value)
            data = self.codec.encode(record_name, value, topic)
        except (InvalidRecord, CodecError) as exc:
            self._reject(topic, key, value, exc)
            return False
        if self.tracing.on and self.tracing.sample():
            return self._produce_traced(topic_key, topic, key, data)
        return self._produce(topic, key.encode(), data)

    def _produce_traced(self, topic_key: str, topic: str, key: str, data: bytes) -> bool:
        """A sampled record carries its ``publish`` span's context; the span ends at the broker's ack."""
        span = self.tracing.publish_span(f"publish {topic_key}", {"messaging.destination.name": topic})
        if span is None:
            return self._produce(topic, key.encode(), data)

        def delivered(error: KafkaError | None, message: Message) -> None:
            self._on_delivery(error, message)
            self.tracing.end(span, None if error is None else str(error))

        sent = self._produce(topic, key.encode(), data, self.tracing.headers(span), delivered)
        if not sent:
            self.tracing.end(span, "dropped: the buffer is full")
        return sent

    def _produce(
        self, topic: str, key: bytes, data: bytes, headers: Any = None, on_delivery: Any = None
    ) -> bool:
        try:
            if headers:
                self._producer.produce(topic, value=data, key=key, headers=headers, on_delivery=on_delivery)
            else:
                self._producer.produce(topic, value=data, key=key, on_delivery=self._on_delivery)
        except BufferError:
            self.dropped += 1
            self.metrics.records.labels(topic, "dropped").inc()
            self._producer.poll(0)
            return False
        self.metrics.records.labels(topic, "queued").inc()
        self._producer.poll(0)
        return True

    def _reject(self, topic: str, key: str, value: dict[str, Any], exc: Exception) -> None:
        self.invalid += 1
        self.metrics.records.labels(topic, "invalid").inc()
        reason = getattr(exc, "reason", str(exc))
        log.warning("invalid record not sent", extra={"topic": topic, "key": key, "reason": reason})
        letter = {
            "time": datetime.now(UTC),
            "stage": "producer",
            "origin_topic": topic,
            "origin_partition": None,
            "origin_offset": None,
            "key": key.encode(),
            "value": json.dumps(value, default=str).encode(),
            "reason": reason,
            "error_type": type(exc).__name__,
            "source": self.source,
        }
        self._produce(
            self._deadletter, key.encode(), self.codec.encode("DeadLetter", letter, self._deadletter)
        )

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failed += 1
            self.metrics.records.labels(message.topic(), "failed").inc()
            log.error("delivery failed", extra={"topic": message.topic(), "error": str(error)})
            return
        self.delivered += 1
        self.metrics.records.labels(message.topic(), "delivered").inc()
        latency = message.latency()
        if latency is not None:
            self.metrics.latency.observe(latency)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery reports; call it regularly (publish does, with no wait)."""
        return self._producer.poll(timeout_s)

    def pending(self) -> int:
        return len(self._producer)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for everything queued to be acknowledged; returns what is still pending."""
        deadline = time.monotonic() + timeout_s
        # The schemas first: readers need them to read the records queued behind.
        unpublished = self.codec.flush_schemas(timeout_s)
        if unpublished:
            log.warning("schemas not yet on the schemas topic after flush", extra={"pending": unpublished})
        remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        while remaining and time.monotonic() < deadline:
            remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining:
            log.warning("records still pending after flush", extra={"pending": remaining})
        return remaining
