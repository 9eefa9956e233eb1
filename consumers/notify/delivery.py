"""Delivering one notification to one channel, at least once.

Attempts repeat with exponential backoff and full jitter (:func:`backoff_s`) while the failure is
retryable, up to the channel's ``max_attempts`` and ``max_elapsed``. Then the notification goes to the
dead-letter topic with the reason (stage ``notifier``); only once that record is acknowledged by the broker
does the delivery count as settled. A dead letter the broker refuses is never dropped: one too large for
the topic is sent again without its value (the reason says so), any other failure is retried with bounded
exponential backoff (:data:`LETTER_RETRY_S`) until the broker takes it or the notifier stops (then the
offsets stay uncommitted and the record is read again). What was told where is kept in the notification
log and in memory (:mod:`told`): a state (fingerprint, status, starts_at) told on a channel is not sent there
again, whoever reads its record again (:class:`Deliverer` says when it still can be).
"""

from __future__ import annotations

import dataclasses
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

from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import CollectorRegistry

from bus import self_metrics
from bus.codec import Codec
from consumers.notify.channels.base import Channel, DeliveryError
from consumers.notify.config import RetryPolicy
from consumers.notify.model import Alert, Notification, Origin, rfc3339
from consumers.notify.told import (
    SENDING,
    SETTLED,
    Key,
    LogUnavailable,
    NotificationLog,
    Scoped,
    Told,
    key_of,
)

__all__ = [
    "DeadLetters",
    "Deliverer",
    "NotificationLog",
    "NotifierMetrics",
    "Outcome",
    "Result",
    "Told",
    "backoff_s",
    "log_retry_s",
    "retry",
]

log = logging.getLogger(__name__)
STAGE = "notifier"
LETTER_RETRY_S = (1.0, 30.0)
"""The first and the longest pause before a dead letter that failed is sent again."""


LOG_RETRY_S = (0.5, 5.0)
"""The first and the longest pause before the notification log is asked again (PostgreSQL away)."""


def letter_retry_s(failures: int) -> float:
    """The pause before sending a dead letter again after ``failures`` failed sends."""
    return min(LETTER_RETRY_S[0] * 2 ** max(0, failures - 1), LETTER_RETRY_S[1])


def log_retry_s(failures: int) -> float:
    """The pause before reading or writing the notification log again after ``failures`` failures."""
    return min(LOG_RETRY_S[0] * 2 ** max(0, failures - 1), LOG_RETRY_S[1])


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"
    """Every alert of it was settled on this channel before (a replay after a crash): not sent again."""
    NOT_OWED = "not_owed"
    """A resolution whose firing this channel never received (``Deliverer.deliver(unconfirmed=True)``)."""
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
    """The notifier's own Prometheus metrics, registered on the registry it is given (names, help and
    labels: bus/self_metrics.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = self_metrics.counter("aima_notifier_alerts_received_total", registry)
        self.notifications = self_metrics.counter("aima_notifier_notifications_total", registry)
        self.latency = self_metrics.histogram(
            "aima_notifier_delivery_latency_seconds",
            registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
        )
        self.retries = self_metrics.counter("aima_notifier_retries_total", registry)
        self.dead_letters = self_metrics.counter("aima_notifier_dead_letters_total", registry)
        self.silenced = self_metrics.counter("aima_notifier_silenced_alerts_total", registry)
        self.pending = self_metrics.gauge("aima_notifier_pending_records", registry)
        self.groups = self_metrics.gauge("aima_notifier_groups", registry)


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
    """Delivers notifications to channels, once per alert state and channel: leave out what was told
    before (this process's memory, then the notification log), write an intent, retry, dead-letter, log.

    The log is waited for: a lookup or intent that fails is tried again with back-off until the database
    answers (up to ``log_wait_s``; after that the notification goes out unchecked, as at least once beats
    never during a long outage), and the outcome is written, again with back-off, before the delivery
    returns, so the offsets it carries are committed only once the log holds it. The one way left to
    send a state twice: the process killed between the receiver's answer and that write; webhook
    receivers recognise the repeat by its idempotency key (``X-AIMA-Idempotency-Key``)."""

    def __init__(
        self,
        *,
        dead_letters: DeadLetters,
        origin_topic: str,
        metrics: NotifierMetrics,
        stop: threading.Event,
        log_store: NotificationLog | None = None,
        told: Told | None = None,
        log_wait_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._dead_letters = dead_letters
        self._origin_topic = origin_topic
        self._metrics = metrics
        self._stop = stop
        self._log = log_store
        self.told = told if told is not None else Told()
        self._log_wait_s = log_wait_s
        self._clock = clock
        self._rng = rng

    def deliver(
        self,
        notification: Notification,
        channel: Channel,
        origins: Iterable[Origin] = (),
        *,
        unconfirmed: bool = False,
    ) -> Result:
        """``unconfirmed``: resolutions of firings this process never announced (read together with them
        after a predecessor stopped): told only where the firing was delivered (or may have been: an
        intent) and the resolution was not told yet."""
        if notification.repeat:  # meant to arrive again: no lookup
            return self._send(notification, channel, origins)
        keys = [_scoped(notification, key_of(a)) for a in notification.alerts]
        if not self.told.claim(keys, self._stop):
            return Result(Outcome.ABORTED, reason="the notifier stopped")
        try:
            watched = keys + (
                [_scoped(notification, key_of(a, "firing")) for a in notification.alerts]
                if unconfirmed
                else []
            )
            known = self._known(notification, watched)
            if known is None:
                return Result(Outcome.ABORTED, reason="the notifier stopped")
            owed = _owed(notification, known, unconfirmed)
            if not owed:
                told_all = all(known.get(k) in SETTLED for k in keys)
                outcome = Outcome.DUPLICATE if told_all or not unconfirmed else Outcome.NOT_OWED
                self._metrics.notifications.labels(
                    notification.receiver, notification.channel, outcome.value
                ).inc()
                log.info(
                    "already told, not sent again"
                    if outcome is Outcome.DUPLICATE
                    else "firing never told here",
                    extra={
                        "group_key": notification.group_key,
                        "receiver": notification.receiver,
                        "channel": notification.channel,
                    },
                )
                # at-least-once step 2 (consumers/notify/notifier.py): told before, so settled unsent
                return Result(outcome)
            if len(owed) < len(notification.alerts):
                notification = dataclasses.replace(notification, alerts=tuple(owed))
            if self._log is not None and not self._with_log(
                "write an intent", lambda: self._log.intend(notification, datetime.now(UTC))
            ):
                return Result(Outcome.ABORTED, reason="the notifier stopped")
            return self._send(notification, channel, origins)
        finally:
            self.told.release(keys)

    def _known(self, notification: Notification, keys: list[Scoped]) -> dict[Scoped, str] | None:
        """What memory and log say of ``keys`` (memory wins: it may be ahead of the log); None when the
        notifier stopped while the log was away."""
        memory = self.told.outcomes(keys)
        missing = [k[2:] for k in keys if k not in memory]
        if self._log is None or not missing:
            return memory
        found: dict[Key, str] = {}

        def lookup() -> None:
            found.update(self._log.lookup(notification.receiver, notification.channel, missing))

        if not self._with_log("read", lookup):
            return None
        return {**{_scoped(notification, k): o for k, o in found.items()}, **memory}

    def _with_log(self, what: str, call: Callable[[], None]) -> bool:
        """Call until the log answers; False when the notifier stopped first. Past ``log_wait_s`` it gives
        up waiting and returns True: the delivery goes on without the log."""
        started = self._clock()
        failures = 0
        while True:
            try:
                call()
                if failures:
                    log.info(
                        "the notification log answers again",
                        extra={"waited_s": round(self._clock() - started, 1)},
                    )
                return True
            except LogUnavailable as exc:
                failures += 1
                if self._clock() - started >= self._log_wait_s:
                    log.error(
                        "the notification log did not answer within %g s; delivering without it "
                        "(a notification told before may be told again): %s",
                        self._log_wait_s,
                        exc,
                    )
                    return True
                if failures == 1:
                    log.warning("cannot %s the notification log; waiting for it: %s", what, exc)
            if self._stop.wait(log_retry_s(failures)):
                return False

    def _send(self, notification: Notification, channel: Channel, origins: Iterable[Origin]) -> Result:
        kind = channel.config.kind
        labels = (notification.receiver, notification.channel)
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
        keys = [_scoped(notification, key_of(a)) for a in notification.alerts]
        self.told.remember(keys, result.outcome.value)
        now = datetime.now(UTC)
        if result.outcome is Outcome.DELIVERED:
            newest = max(a.event_time for a in notification.alerts)
            if not notification.repeat:
                self._metrics.latency.labels(kind).observe(max(0.0, (now - newest).total_seconds()))
        self._metrics.notifications.labels(*labels, result.outcome.value).inc()
        # at-least-once step 2: the outcome is in the notification log before the offsets are released
        if self._write(notification, result, now):
            self.told.logged(keys)
        return result

    def _write(self, notification: Notification, result: Result, at: datetime) -> bool:
        """Log the outcome, trying again with back-off until the database takes it. At the stop it gives
        up after one more try: the offsets are then committed all the same, since holding them would make
        the successor send the notification again. True once written."""
        if self._log is None:
            return False
        failures = 0
        while True:
            try:
                self._log.record(
                    notification,
                    outcome=result.outcome.value,
                    attempts=result.attempts,
                    reason=result.reason or None,
                    delivered_at=at if result.outcome is Outcome.DELIVERED else None,
                    at=at,
                )
                return True
            except LogUnavailable as exc:
                failures += 1
                where = {"group_key": notification.group_key, "channel": notification.channel}
                if self._stop.is_set():
                    log.error(
                        "the notifier stops before the notification log was written: %s", exc, extra=where
                    )
                    return False
                if failures == 1:
                    log.warning(
                        "cannot write the notification log; its offsets wait until it is written: %s",
                        exc,
                        extra=where,
                    )
            self._stop.wait(log_retry_s(failures))

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
                # at-least-once step 2: dead-lettered counts once the broker acknowledged it (publish waits)
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


def _scoped(notification: Notification, key: Key) -> Scoped:
    return (notification.receiver, notification.channel, *key)


def _owed(notification: Notification, known: dict[Scoped, str], unconfirmed: bool) -> list[Alert]:
    """The alerts still to tell on the notification's channel. A resolution is told once; firing alerts
    stay in the group's notification while anything else in it is news (Alertmanager's grouping)."""

    def told(alert: Alert, status: str | None = None) -> str | None:
        return known.get(_scoped(notification, key_of(alert, status)))

    if unconfirmed:
        return [
            a
            for a in notification.alerts
            if told(a) not in SETTLED and told(a, "firing") in ("delivered", SENDING)
        ]
    if all(told(a) in SETTLED for a in notification.alerts):
        return []
    return [a for a in notification.alerts if a.firing or told(a) not in SETTLED]


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
