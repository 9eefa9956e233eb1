"""Delivering one notification to one channel, at least once.

Attempts repeat with exponential backoff and full jitter (:func:`backoff_s`) while the failure is
retryable, up to the channel's ``max_attempts`` and ``max_elapsed``. Then the notification goes to the
dead-letter topic with the reason (stage ``notifier``); only once that record is acknowledged by the broker
does the delivery count as settled. A dead letter the broker refuses is never dropped: one too large for
the topic is sent again without its value (the reason says so), any other failure is retried with bounded
exponential backoff (:data:`LETTER_RETRY_S`) until the broker takes it or the notifier stops (then the
offsets stay uncommitted and the record is read again). The notification log in the database records each
alert's outcome per receiver channel, so a notification replayed after a crash is recognised and not sent
again.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from psycopg_pool import ConnectionPool

from bus.codec import Codec
from consumers.notify.channels.base import Channel, DeliveryError
from consumers.notify.config import RetryPolicy
from consumers.notify.model import Notification, Origin, rfc3339

__all__ = [
    "DeadLetters",
    "Deliverer",
    "NotificationLog",
    "NotifierMetrics",
    "Outcome",
    "Result",
    "backoff_s",
    "retry",
]

log = logging.getLogger(__name__)
STAGE = "notifier"
LETTER_RETRY_S = (1.0, 30.0)
"""The first and the longest pause before a dead letter that failed is sent again."""


def letter_retry_s(failures: int) -> float:
    """The pause before sending a dead letter again after ``failures`` failed sends."""
    return min(LETTER_RETRY_S[0] * 2 ** max(0, failures - 1), LETTER_RETRY_S[1])


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"
    """Every alert of it was settled on this channel before (a replay after a crash): not sent again."""
    ABORTED = "aborted"
    """The notifier is stopping: neither delivered nor dead-lettered, so its offsets stay uncommitted."""
    GAVE_UP = "gave_up"
    """Only from :func:`retry`: the last attempt failed; the caller dead-letters it."""


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    attempts: int = 0
    reason: str = ""
    error_type: str = ""
    elapsed_s: float = 0.0


class NotifierMetrics:
    """The notifier's own Prometheus metrics, registered on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "aima_notifier_alerts_received",
            "Alert records read from the alerts topic",
            ["status"],
            registry=registry,
        )
        self.notifications = Counter(
            "aima_notifier_notifications",
            "Notifications settled, by receiver, channel and outcome (delivered, dead_lettered, duplicate, "
            "unrouted)",
            ["receiver", "channel", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "aima_notifier_delivery_latency_seconds",
            "From the newest alert's event_time to the channel accepting the notification",
            ["channel"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=registry,
        )
        self.retries = Counter(
            "aima_notifier_retries",
            "Delivery attempts that failed and were retried",
            ["channel"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "aima_notifier_dead_letters",
            "Records sent to the dead-letter topic (channel 'decode' for undecodable alert records)",
            ["channel", "error_type"],
            registry=registry,
        )
        self.silenced = Counter(
            "aima_notifier_silenced_alerts",
            "Alerts left out of a notification because a silence matched them",
            registry=registry,
        )
        self.pending = Gauge(
            "aima_notifier_pending_records",
            "Alert records read but not yet settled (offsets held)",
            registry=registry,
        )
        self.groups = Gauge("aima_notifier_groups", "Aggregation groups held in memory", registry=registry)


def backoff_s(policy: RetryPolicy, failures: int, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform(0, min(max_backoff, initial * 2**(failures-1))) before the next attempt."""
    ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** max(0, failures - 1))
    return ceiling * rng()


def retry(
    attempt: Callable[[], None],
    policy: RetryPolicy,
    *,
    stop: threading.Event,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
    on_retry: Callable[[int, DeliveryError, float], None] | None = None,
) -> Result:
    """Call ``attempt`` until it returns, fails for good, or the policy is spent. Sleeps on ``stop``, so a
    stopping notifier abandons the wait at once (:attr:`Outcome.ABORTED`)."""
    started = clock()
    attempts = 0
    while True:
        if stop.is_set():
            return Result(Outcome.ABORTED, attempts, "the notifier stopped", elapsed_s=clock() - started)
        attempts += 1
        try:
            attempt()
            return Result(Outcome.DELIVERED, attempts, elapsed_s=clock() - started)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # a channel's bug must not lose the notification: retry, then dead-letter
            log.exception("channel raised an unexpected error")
            error = DeliveryError(f"{type(exc).__name__}: {exc}", error_type="ChannelError")
        elapsed = clock() - started
        if not error.retryable:
            return Result(Outcome.GAVE_UP, attempts, error.reason, error.error_type, elapsed)
        if attempts >= policy.max_attempts:
            reason = f"{error.reason} (gave up after {attempts} attempts in {elapsed:.1f} s)"
            return Result(Outcome.GAVE_UP, attempts, reason, error.error_type, elapsed)
        delay = max(backoff_s(policy, attempts, rng), error.retry_after_s or 0.0)
        if elapsed + delay > policy.max_elapsed_s:
            reason = (
                f"{error.reason} (gave up after {attempts} attempts: max_elapsed {policy.max_elapsed_s:g} s)"
            )
            return Result(Outcome.GAVE_UP, attempts, reason, error.error_type, elapsed)
        if on_retry is not None:
            on_retry(attempts, error, delay)
        if stop.wait(delay):
            return Result(Outcome.ABORTED, attempts, "the notifier stopped", elapsed_s=clock() - started)


class NotificationLog:
    """The ``notification_log`` table: one row per (fingerprint, status, starts_at, channel, receiver).
    Database trouble never blocks a delivery: a failed lookup means "not sent yet" (at least once)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def settled(self, notification: Notification) -> set[tuple[str, str, datetime]]:
        keys = [(a.fingerprint, a.status, a.starts_at) for a in notification.alerts]
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(
                    """SELECT l.fingerprint, l.status, l.starts_at
                         FROM notification_log l
                         JOIN unnest(%s::text[], %s::text[], %s::timestamptz[])
                              AS k(fingerprint, status, starts_at)
                           ON (l.fingerprint, l.status, l.starts_at) = (k.fingerprint, k.status, k.starts_at)
                        WHERE l.channel = %s AND l.receiver = %s""",
                    (
                        [k[0] for k in keys],
                        [k[1] for k in keys],
                        [k[2] for k in keys],
                        notification.channel,
                        notification.receiver,
                    ),
                ).fetchall()
        except psycopg.Error as exc:
            log.warning("notification log lookup failed; sending anyway: %s", exc)
            return set()
        return {(f, s, t) for f, s, t in rows}

    def record(self, notification: Notification, result: Result, at: datetime) -> None:
        delivered_at = at if result.outcome is Outcome.DELIVERED else None
        rows = [
            (
                a.fingerprint,
                a.status,
                a.starts_at,
                notification.channel,
                notification.receiver,
                notification.group_key,
                delivered_at,
                result.attempts,
                result.outcome.value,
                result.reason or None,
                at,
            )
            for a in notification.alerts
        ]
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO notification_log (fingerprint, status, starts_at, channel, receiver,
                           group_key, delivered_at, attempts, outcome, reason, updated_at)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (fingerprint, status, starts_at, channel, receiver) DO UPDATE SET
                           group_key = EXCLUDED.group_key,
                           delivered_at = COALESCE(EXCLUDED.delivered_at, notification_log.delivered_at),
                           attempts = notification_log.attempts + EXCLUDED.attempts,
                           outcome = EXCLUDED.outcome,
                           reason = EXCLUDED.reason,
                           updated_at = EXCLUDED.updated_at""",
                    rows,
                )
        except psycopg.Error as exc:
            log.warning("cannot write the notification log: %s", exc)


class DeadLetters:
    """Publishes DeadLetter records and waits for the broker's acknowledgement (or for ``stop``)."""

    def __init__(
        self,
        producer: Producer,
        codec: Codec,
        topic: str,
        timeout_s: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self._producer = producer
        self._codec = codec
        self.topic = topic
        self._timeout_s = timeout_s
        self._stop = stop or threading.Event()

    def publish(
        self,
        *,
        origin_topic: str,
        origin: Origin | None,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        error_type: str,
    ) -> None:
        """Raises ``RuntimeError`` when the broker did not acknowledge in time, refused the letter, or the
        notifier is stopping (the caller tries again, or gives up when stopping). A letter too large for
        the topic goes again at once without its value, the reason saying so."""
        record: dict[str, Any] = {
            "time": datetime.now(UTC),
            "stage": STAGE,
            "origin_topic": origin_topic,
            "origin_partition": origin.partition if origin else None,
            "origin_offset": origin.offset if origin else None,
            "key": key,
            "value": value,
            "reason": reason,
            "error_type": error_type,
            "source": STAGE,
        }
        error = self._send(record)
        if error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE and value is not None:
            record["value"] = None
            record["reason"] = (
                f"{reason} [the original value ({len(value)} bytes) is left out: the dead-letter topic "
                f"refused the whole letter ({error.str()})]"
            )
            error = self._send(record)
        if error is not None:
            raise RuntimeError(f"dead-letter topic {self.topic}: {error.str()}")

    def _send(self, record: dict[str, Any]) -> KafkaError | None:
        """The broker's refusal, or None once it acknowledged; RuntimeError when it did not answer."""
        encoded = self._codec.encode("DeadLetter", record, topic=self.topic)
        acked = threading.Event()
        errors: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)
            acked.set()

        try:
            self._producer.produce(
                self.topic, value=encoded, key=record["origin_topic"].encode(), on_delivery=delivered
            )
        except KafkaException as exc:  # refused before sending (the client's own size limit)
            return exc.args[0]
        except BufferError as exc:
            raise RuntimeError(f"dead-letter topic {self.topic}: the producer's queue is full") from exc
        deadline = time.monotonic() + self._timeout_s
        while not acked.is_set() and time.monotonic() < deadline and not self._stop.is_set():
            self._producer.poll(0.05)
        if not acked.is_set():
            why = "the notifier is stopping" if self._stop.is_set() else f"none within {self._timeout_s:g} s"
            raise RuntimeError(f"dead-letter topic {self.topic}: no acknowledgement ({why})")
        return errors[0] if errors else None


class Deliverer:
    """Delivers notifications to channels: skip what the log says was settled, retry, dead-letter, record."""

    def __init__(
        self,
        *,
        dead_letters: DeadLetters,
        origin_topic: str,
        metrics: NotifierMetrics,
        stop: threading.Event,
        log_store: NotificationLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._dead_letters = dead_letters
        self._origin_topic = origin_topic
        self._metrics = metrics
        self._stop = stop
        self._log = log_store
        self._clock = clock
        self._rng = rng

    def deliver(self, notification: Notification, channel: Channel, origins: Iterable[Origin] = ()) -> Result:
        kind = channel.config.kind
        labels = (notification.receiver, notification.channel)
        if not notification.repeat and self._log is not None:
            settled = self._log.settled(notification)
            if all((a.fingerprint, a.status, a.starts_at) in settled for a in notification.alerts):
                self._metrics.notifications.labels(*labels, Outcome.DUPLICATE.value).inc()
                log.info(
                    "already settled, not sent again",
                    extra={
                        "group_key": notification.group_key,
                        "receiver": notification.receiver,
                        "channel": notification.channel,
                    },
                )
                return Result(Outcome.DUPLICATE)
        progress: set[str] = set()

        def on_retry(attempt: int, error: DeliveryError, delay: float) -> None:
            self._metrics.retries.labels(kind).inc()
            log.warning(
                "delivery failed, retrying",
                extra={
                    "receiver": notification.receiver,
                    "channel": notification.channel,
                    "attempt": attempt,
                    "retry_in_s": round(delay, 3),
                    "reason": error.reason,
                },
            )

        result = retry(
            lambda: channel.send(notification, progress),
            channel.config.retry,
            stop=self._stop,
            clock=self._clock,
            rng=self._rng,
            on_retry=on_retry,
        )
        if result.outcome is Outcome.GAVE_UP:
            result = self._dead_letter(notification, result, list(origins))
        if result.outcome is Outcome.ABORTED:
            return result
        now = datetime.now(UTC)
        if result.outcome is Outcome.DELIVERED:
            newest = max(a.event_time for a in notification.alerts)
            if not notification.repeat:
                self._metrics.latency.labels(kind).observe(max(0.0, (now - newest).total_seconds()))
        self._metrics.notifications.labels(*labels, result.outcome.value).inc()
        if self._log is not None:
            self._log.record(notification, result, now)
        return result

    def _dead_letter(self, notification: Notification, result: Result, origins: list[Origin]) -> Result:
        reason = f"receiver {notification.receiver} channel {notification.channel}: {result.reason}"
        log.error(
            "delivery gave up; dead-lettering", extra={"group_key": notification.group_key, "reason": reason}
        )
        value = json.dumps(_dead_letter_value(notification, result), separators=(",", ":")).encode()
        first = min(origins, key=lambda o: (o.partition, o.offset)) if origins else None
        failures = 0
        while True:
            try:
                self._dead_letters.publish(
                    origin_topic=self._origin_topic,
                    origin=first,
                    key=notification.group_key.encode(),
                    value=value,
                    reason=reason,
                    error_type=result.error_type or "DeliveryFailed",
                )
                break
            except (RuntimeError, ValueError) as exc:
                failures += 1
                log.error("cannot publish the dead letter; trying again: %s", exc)
                if self._stop.wait(letter_retry_s(failures)):
                    return Result(Outcome.ABORTED, result.attempts, "the notifier stopped")
        self._metrics.dead_letters.labels(notification.channel.split("/")[0], result.error_type).inc()
        return Result(Outcome.DEAD_LETTERED, result.attempts, reason, result.error_type, result.elapsed_s)


def _dead_letter_value(notification: Notification, result: Result) -> dict[str, Any]:
    """What was not delivered, as JSON: enough to resend it by hand or replay it."""
    return {
        "receiver": notification.receiver,
        "channel": notification.channel,
        "groupKey": notification.group_key,
        "groupLabels": dict(notification.group_labels),
        "status": notification.status,
        "attempts": result.attempts,
        "alerts": [
            {
                "fingerprint": a.fingerprint,
                "rule": a.rule,
                "status": a.status,
                "severity": a.severity,
                "startsAt": rfc3339(a.starts_at),
                "endsAt": rfc3339(a.ends_at) if a.ends_at else None,
                "eventTime": rfc3339(a.event_time),
                "value": a.value,
                "labels": dict(a.labels),
                "annotations": dict(a.annotations),
            }
            for a in notification.alerts
        ],
    }
