"""The notifier process (``aima-metrics notify``): alerts topic -> routes -> groups -> channels.

One loop on the calling thread reads AlertEvents, folds them into aggregation groups (:mod:`grouping`) and
hands due notifications, less silenced alerts, to a pool of delivery threads (:mod:`delivery`), one task per
receiver channel. Commit order, so that every notification is delivered, and only once:

1. a record is read; its offset is owed by every group it joined;
2. a group's notification settles when every channel has delivered it, dead-lettered it (acknowledged by the
   broker) or found it told before (:mod:`told`), and the outcome is in the notification log (written
   again and again while PostgreSQL is away); only then are the offsets it carried released;
3. the consumer commits, per partition, up to the lowest offset still owed (asynchronously, one commit
   at a time: a synchronous one blocks up to 45 s while the broker is away).

A notifier that stops (or crashes) before step 2 leaves the offsets uncommitted; the next one in the group
reads the records again and the notification log keeps already told channels from sending twice; this
process's memory of what it told does the same for records it reads again itself (a rebalance). What is
left: a kill -9 between a receiver's 2xx and the log write sends that notification again (webhooks carry
an idempotency key for it). A resolution read together with its firing (the firing's sender stopped before
committing) is told where the log shows the firing (:meth:`Grouper.take_unconfirmed`).
A stop settles and commits what it can within what the stop bound leaves (``time_left_s``), each client
closed within a bound of its own.

The notifier is given its clients (consumer, dead-letter producer, database pool, HTTP client and the
channels on it, codec): :func:`open_notifier` builds them from the settings, closing what it opened when a
later one fails, and :func:`run` runs the result.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry
from psycopg import sql
from psycopg_pool import ConnectionPool

from bus.codec import Codec
from bus.errors import DecodeError
from bus.health import database_check
from bus.kafka import client_config, quiet_config
from bus.runtime import Service, bounded_call
from bus.settings import Settings
from bus.silences import Silence, active_silences, silenced_by
from bus.topics import consumer_group, topic_name
from bus.tracing import OFF, Tracing, open_tracing
from consumers.notify import channels as channel_factory
from consumers.notify.channels.base import Channel
from consumers.notify.config import NotifyConfig, load_from_env
from consumers.notify.delivery import (
    DeadLetters,
    Deliverer,
    NotificationLog,
    NotifierMetrics,
    Outcome,
    Result,
    letter_retry_s,
)
from consumers.notify.grouping import Flush, Grouper, OffsetTracker, Unconfirmed
from consumers.notify.model import Alert, Notification, Origin

__all__ = ["Commits", "Notifier", "open_notifier", "run"]

log = logging.getLogger(__name__)
ALERT_RECORD = "aima.metrics.AlertEvent"


def run(
    settings: Settings,
    *,
    service: Service | None = None,
    config: NotifyConfig | None = None,
    schema: str | None = None,
    group_id: str | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Run until ``service.stopping`` is set (SIGTERM/SIGINT when this call makes and starts the service,
    which it then must do on the main thread). ``config``: default from ``AIMA_NOTIFY_CONFIG``. ``schema``:
    the database schema of the silences and notification log (default: the search_path's). ``tracing``:
    default the process's (bus/tracing.py, ``AIMA_OTEL_*``)."""
    if service is None:
        service = Service("notify", settings)
        service.start()
    try:  # a bad routing file, too, ends with the service stopped
        # Silences and the notification log live in the database: ready (/readyz) only while it answers.
        service.add_check("database", database_check(settings.database_dsn()))
        if config is None:
            config = load_from_env()
        if config.nowhere:
            log.warning(
                "no routing file (AIMA_NOTIFY_CONFIG): every alert goes to the dead-letter topic "
                "(error type NoReceiver) until one names a receiver"
            )
        tracing = tracing if tracing is not None else open_tracing("aima-notify")
        notifier = open_notifier(
            settings,
            service.stopping,
            config,
            registry=service.registry,
            schema=schema,
            group_id=group_id,
            time_left_s=service.time_left_s,
            tracing=tracing,
        )
        try:
            notifier.run()
        finally:
            tracing.flush(min(5.0, service.time_left_s()))
    finally:
        service.stopped()


def open_notifier(
    settings: Settings,
    stop: threading.Event,
    config: NotifyConfig,
    *,
    schema: str | None = None,
    group_id: str | None = None,
    consumer_config: dict[str, Any] | None = None,
    **options: Any,
) -> Notifier:
    """The notifier with its clients built from ``settings``, in this order: the HTTP client and the
    channels on it, the database pool (it connects in the background: PostgreSQL may be away), the
    dead-letter producer, the consumer (``consumer_config`` added to its librdkafka settings). When a step
    fails, what was opened before it is closed before the error goes on. ``options``: the rest of
    :class:`Notifier`'s keyword arguments."""
    dsn = settings.database_dsn()  # fails first, with a clear message, when no database is configured
    group_id = group_id or consumer_group(settings, "notify")
    with contextlib.ExitStack() as opened:
        codec = Codec.from_settings(settings)
        http = httpx.Client(
            limits=httpx.Limits(max_connections=config.workers * 2, max_keepalive_connections=config.workers),
            follow_redirects=False,
        )
        opened.callback(http.close)
        channels: dict[tuple[str, str], Channel] = {}
        for receiver in config.receivers.values():
            for target in receiver.channels:
                channel = channel_factory.build(target, http)
                opened.callback(channel.close)
                channels[(receiver.name, target.id)] = channel
        pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max(2, config.workers // 2 + 1),
            kwargs={"autocommit": True},
            configure=_search_path(schema),
            timeout=5.0,
            open=False,
            name="aima-notify",
        )
        pool.open(wait=False)
        opened.callback(pool.close, timeout=5.0)
        producer = Producer(
            client_config(
                settings,
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "client.id": f"{group_id}-deadletter",
                    **quiet_config("notify-deadletter"),
                },
            )
        )
        opened.callback(producer.close)  # nothing is queued yet: the close does not wait
        commits = Commits(OffsetTracker())
        consumer = Consumer(
            client_config(
                settings,
                **{
                    "group.id": group_id,
                    "client.id": group_id,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": 10_000,
                    "on_commit": commits.on_commit,
                    **quiet_config("notify"),
                    **(consumer_config or {}),
                },
            )
        )
        opened.callback(consumer.close)
        notifier = Notifier(
            settings,
            stop,
            config,
            consumer=consumer,
            producer=producer,
            pool=pool,
            http=http,
            channels=channels,
            commits=commits,
            codec=codec,
            **options,
        )
        opened.pop_all()  # the notifier owns them now: its run closes them
    return notifier


class Commits:
    """The offsets the notifier owes (:class:`OffsetTracker`) and the broker's answers to its asynchronous
    commits. Made before the consumer, whose ``on_commit`` it is (librdkafka runs it from poll/consume),
    and given to the notifier with that consumer."""

    def __init__(self, tracker: OffsetTracker) -> None:
        self.tracker = tracker
        self.outstanding = False
        """A commit was sent and not answered yet."""

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self.outstanding = False
        if error is not None:
            log.warning("commit failed, trying again later: %s", error)
            return
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                self.tracker.committed(tp.topic, tp.partition, tp.offset)


@dataclass
class _Job:
    """One flush (or one group's unconfirmed resolutions) on its way to every channel of its receiver."""

    flush: Flush | None
    alerts: tuple[Alert, ...]
    expected: int
    origins: tuple[Origin, ...] = ()
    unconfirmed: Unconfirmed | None = None
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Notifier:
    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        config: NotifyConfig,
        *,
        consumer: Consumer,
        producer: Producer,
        pool: ConnectionPool,
        http: httpx.Client,
        channels: Mapping[tuple[str, str], Channel],
        commits: Commits,
        codec: Codec,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = 10_000,
        commit_interval_s: float = 0.5,
        time_left_s: Callable[[], float] = lambda: 25.0,
        tracing: Tracing = OFF,
    ) -> None:
        """The notifier owns the clients it is given and closes them when :meth:`run` ends.
        ``consumer``: configured without auto commit, with ``commits.on_commit`` as its ``on_commit``
        (:func:`open_notifier` does so); ``producer``: for the dead letters; ``pool``: the silences and
        the notification log; ``channels``: per (receiver, channel id) of ``config``, the HTTP ones on
        ``http``. ``time_left_s``: what the stop bound leaves the process (``Service.time_left_s``); the
        last deliveries, commit and closes fit in it. ``tracing``: a ``notify <channel kind>`` span per
        delivery (bus/tracing.py), off by default."""
        self.settings = settings
        self.tracing = tracing
        self._traces: dict[Origin, Any] = {}
        """Trace contexts of the records read (with tracing on), oldest first, at most _MAX_TRACES."""
        self.stop = stop
        self.config = config
        self.clock = clock
        self.max_pending = max_pending
        self.commit_interval_s = commit_interval_s
        self.topic = topic_name(settings, "alerts")
        self.metrics = NotifierMetrics(registry if registry is not None else CollectorRegistry())
        self.codec = codec
        self.grouper = Grouper(config.route)
        self.commits = commits
        self.tracker = commits.tracker
        self.completions: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._silences: list[Silence] = []
        self._paused = False
        self._last_commit = 0.0
        self._time_left_s = time_left_s
        self._inflight: set[Future[Result]] = set()
        self._letter_failures = 0
        self._unconfirmed_again: list[Unconfirmed] = []
        """Unconfirmed resolutions whose delivery task failed: dispatched again (their origins still held)."""
        self.http = http
        self.channels = dict(channels)
        self.pool = pool
        self.producer = producer
        self.consumer = consumer
        self.dead_letters = DeadLetters(
            self.producer, self.codec, topic_name(settings, "deadletter"), stop=stop
        )
        self.deliverer = Deliverer(
            dead_letters=self.dead_letters,
            origin_topic=self.topic,
            metrics=self.metrics,
            stop=stop,
            log_store=NotificationLog(self.pool),
            log_wait_s=config.log_wait_s,
        )
        # Its threads start with the first delivery.
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="notify")

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
            log.info(
                "notifier started",
                extra={
                    "topic": self.topic,
                    "config": self.config.source,
                    "receivers": sorted(self.config.receivers),
                },
            )
            while not self.stop.is_set():
                self.step()
        finally:
            self._shutdown()

    def step(self) -> None:
        """One round: read what is there (waiting at most until the next group is due), fold it in, send
        what is due, settle what was delivered, commit."""
        now = self.clock()
        deadline = self.grouper.next_deadline()
        timeout = 0.1 if deadline is None else min(0.1, max(0.0, deadline - now))
        first = self.consumer.poll(timeout)
        if first is not None:
            batch = [first, *self.consumer.consume(num_messages=499, timeout=0)]
            for index, message in enumerate(batch):
                if self.stop.is_set() or not self._ingest(message):
                    self._rewind(batch[index:])
                    break
        now = self.clock()
        self._dispatch_due(now)
        self._settle_completed(now)
        if now - self._last_commit >= self.commit_interval_s:
            self._commit()
            self._last_commit = now
        self._backpressure()

    def _ingest(self, message: Message) -> bool:
        """Fold one record in; False when the loop must stop reading (stopping mid dead-letter)."""
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return True
            if error.fatal():
                raise KafkaException(error)
            log.warning("consumer error: %s", error)
            return True
        origin = Origin(message.topic(), message.partition(), message.offset())
        try:
            name, value = self.codec.decode(message.value())
            if name != ALERT_RECORD:
                raise _WrongRecord(f"expected {ALERT_RECORD}, got {name}")
            alert = Alert.from_event(value)
        except (DecodeError, _WrongRecord) as exc:
            if isinstance(exc, DecodeError) and exc.transient:
                # The schema registry is away: read it again later rather than dead-letter a good record.
                log.warning("cannot decode yet, waiting: %s", exc)
                self.stop.wait(1.0)
                return False
            return self._dead_letter_record(message, origin, exc)
        self.metrics.received.labels(alert.status).inc()
        if self.tracing.on:
            self._remember_trace(origin, message)
        refs = self.grouper.add(alert, origin, self.clock())
        # at-least-once step 1: the record's offset is owed by every group it joined
        self.tracker.add(origin, refs)
        return True

    def _remember_trace(self, origin: Origin, message: Message) -> None:
        span_context = self.tracing.context(message.headers())
        if span_context is None:
            return
        self._traces[origin] = span_context
        if len(self._traces) > _MAX_TRACES:
            del self._traces[next(iter(self._traces))]

    def _submit(
        self, notification: Notification, channel: Channel, origins: tuple[Origin, ...], **kwargs: Any
    ) -> Future[Result]:
        """One delivery task on the pool; with tracing on, in a span continuing its alerts' traces (the
        contexts are looked up here, on the loop's thread, which alone writes them)."""
        if not self.tracing.on:
            return self.executor.submit(self.deliverer.deliver, notification, channel, origins, **kwargs)
        contexts = [self._traces[o] for o in origins if o in self._traces]
        return self.executor.submit(self._deliver_traced, contexts, notification, channel, origins, **kwargs)

    def _deliver_traced(
        self,
        contexts: list[Any],
        notification: Notification,
        channel: Channel,
        origins: tuple[Origin, ...],
        **kwargs: Any,
    ) -> Result:
        started = self.tracing.start_ns()
        result = self.deliverer.deliver(notification, channel, origins, **kwargs)
        span = self.tracing.batch_span(
            f"notify {channel.config.kind}",
            contexts[0] if contexts else None,
            contexts[1:],
            started,
            {
                "aima.receiver": notification.receiver,
                "aima.channel": channel.config.id,
                "aima.alerts": len(notification.alerts),
                "aima.attempts": result.attempts,
            },
        )
        failed = result.outcome in (Outcome.DEAD_LETTERED, Outcome.GAVE_UP, Outcome.ABORTED)
        self.tracing.end(
            span,
            result.reason or result.outcome.value if failed else None,
            {"aima.outcome": result.outcome.value},
        )
        return result

    def _rewind(self, unread: list[Message]) -> None:
        """Records fetched but not folded in are read again: seek each partition back to the first."""
        first: dict[tuple[str, int], int] = {}
        for message in unread:
            if message.error() is None:
                key = (message.topic(), message.partition())
                first[key] = min(first.get(key, message.offset()), message.offset())
        for (topic, partition), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # not assigned any more: its new owner reads it
                log.info("cannot rewind %s[%d]: %s", topic, partition, exc)

    def _dead_letter_record(self, message: Message, origin: Origin, exc: Exception) -> bool:
        """Dead-letter an undecodable record; False when the notifier stopped first (the record stays
        uncommitted). The broker refusing the letter holds the loop here (backing off), never drops it."""
        error_type = type(exc).__name__.lstrip("_")
        while True:
            try:
                self.dead_letters.publish(
                    origin_topic=origin.topic,
                    origin=origin,
                    key=message.key(),
                    value=message.value(),
                    reason=f"not an alert record: {exc}",
                    error_type=error_type,
                )
                break
            except (RuntimeError, ValueError) as publish_error:
                self._letter_failures += 1
                log.error("cannot publish a dead letter; trying again: %s", publish_error)
                if self.stop.wait(letter_retry_s(self._letter_failures)):
                    return False
        self._letter_failures = 0
        self.metrics.dead_letters.labels("decode", error_type).inc()
        self.tracker.add(origin, 0)
        return True

    def _dispatch_due(self, now: float) -> None:
        flushes, released = self.grouper.due(now)
        unconfirmed = self.grouper.take_unconfirmed()
        for item in unconfirmed:  # held once more, before the release below, until the log decided
            for origin in item.origins:
                self.tracker.add(origin, 1)
        for origin in released:
            self.tracker.release(origin)
        unconfirmed += self._unconfirmed_again
        self._unconfirmed_again = []
        if not flushes and not unconfirmed:
            return
        silences = self._active_silences()
        for flush in flushes:
            self._dispatch(flush, silences, now)
        for item in unconfirmed:
            self._dispatch_unconfirmed(item, silences, now)

    def _dispatch_unconfirmed(self, item: Unconfirmed, silences: list[Silence], now: float) -> None:
        wall = datetime.now(UTC)
        alerts = tuple(a for a in item.alerts if silenced_by(silences, a.match_labels, wall) is None)
        receiver = self.config.receiver(item.route.receiver)
        targets = [t for t in receiver.channels if t.send_resolved] if alerts else []
        job = _Job(None, alerts, expected=len(targets), origins=item.origins, unconfirmed=item)
        if not targets:
            self._settle(job, now)
            return
        for target in targets:
            notification = Notification(
                receiver.name, target.id, item.group_key, item.group_labels, alerts, self.config.external_url
            )
            future = self._submit(
                notification, self.channels[(receiver.name, target.id)], item.origins, unconfirmed=True
            )
            self._inflight.add(future)
            future.add_done_callback(self._inflight.discard)
            future.add_done_callback(lambda f, job=job: self._target_done(job, f))

    def _dispatch(self, flush: Flush, silences: list[Silence], now: float) -> None:
        wall = datetime.now(UTC)
        alerts = tuple(a for a in flush.alerts if silenced_by(silences, a.match_labels, wall) is None)
        if len(alerts) < len(flush.alerts):
            self.metrics.silenced.inc(len(flush.alerts) - len(alerts))
        receiver = self.config.receiver(flush.route.receiver)
        if not alerts:  # all silenced: settled untold, and the group remembers none of them as told
            self._settle(_Job(flush, alerts, expected=0, origins=flush.origins), now)
            return
        # Every channel of the route's receiver: the channels a rule names picked the route (a hint) and
        # filter nothing here. NotifyConfig makes sure the receiver has one, so the job completes.
        targets = receiver.channels
        job = _Job(flush, alerts, expected=len(targets), origins=flush.origins)
        for target in targets:
            told = alerts if target.send_resolved else tuple(a for a in alerts if a.firing)
            if not told:
                self._target_done(job, None)
                continue
            notification = Notification(
                receiver.name,
                target.id,
                flush.group_key,
                flush.group_labels,
                told,
                self.config.external_url,
                flush.repeat,
            )
            future = self._submit(notification, self.channels[(receiver.name, target.id)], flush.origins)
            self._inflight.add(future)
            future.add_done_callback(self._inflight.discard)
            future.add_done_callback(lambda f, job=job: self._target_done(job, f))

    def _target_done(self, job: _Job, future: Future[Result] | None) -> None:
        """On a delivery thread (or here for a channel with nothing to send)."""
        if future is None:
            result = Result(Outcome.DUPLICATE)
        elif future.cancelled():
            result = Result(Outcome.ABORTED)
        elif future.exception() is not None:
            log.error("delivery task failed", exc_info=future.exception())
            result = Result(Outcome.ABORTED)
        else:
            result = future.result()
        with job.lock:
            job.results.append(result)
            finished = len(job.results) == job.expected
        if finished:
            self.completions.put(job)

    def _settle_completed(self, now: float) -> None:
        while True:
            try:
                job = self.completions.get_nowait()
            except queue.Empty:
                return
            self._settle(job, now)

    def _settle(self, job: _Job, now: float) -> None:
        completed = all(r.outcome is not Outcome.ABORTED for r in job.results)
        if job.flush is not None:
            self.grouper.done(job.flush, now, completed=completed, sent=job.alerts)
        if completed:
            # at-least-once step 2: every channel settled (consumers/notify/delivery.py), offsets released
            for origin in job.origins:
                self.tracker.release(origin)
        elif job.unconfirmed is not None and not self.stop.is_set():
            self._unconfirmed_again.append(job.unconfirmed)

    def _active_silences(self) -> list[Silence]:
        try:
            with self.pool.connection(timeout=2.0) as conn:
                self._silences = active_silences(conn)
        except (psycopg.Error, RuntimeError) as exc:  # the pool raises PoolTimeout (an OperationalError)
            log.warning("cannot read silences, using the last known %d: %s", len(self._silences), exc)
        return self._silences

    # -- offsets and partitions --------------------------------------------------------------------------

    def _commit(self) -> None:
        self.metrics.pending.set(self.tracker.pending())
        self.metrics.groups.set(len(self.grouper))
        if self.commits.outstanding:  # one at a time: the next one carries whatever moved meanwhile
            return
        # at-least-once step 3: per partition, up to the lowest offset still owed
        offsets = [TopicPartition(t, p, o) for t, p, o in self.tracker.committable()]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.warning("commit failed, trying again later: %s", exc)
            return
        self.commits.outstanding = True

    def _backpressure(self) -> None:
        pending = self.tracker.pending()
        if not self._paused and pending >= self.max_pending:
            self.consumer.pause(self.consumer.assignment())
            self._paused = True
            log.warning("pausing consumption: %d records wait for delivery", pending)
        elif self._paused and pending < self.max_pending // 2:
            self.consumer.resume(self.consumer.assignment())
            self._paused = False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        if self._paused:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._settle_completed(self.clock())
        self._commit()
        gone = [(p.topic, p.partition) for p in partitions]
        self._unconfirmed_again = [
            u for u in self._unconfirmed_again if not any((o.topic, o.partition) in gone for o in u.origins)
        ]
        self.grouper.drop_partitions(gone)
        self.tracker.drop(gone)
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})

    def _shutdown(self) -> None:
        """Within what the stop bound leaves: let deliveries in progress finish (their retries and
        dead-letter waits end at the stop), settle, commit, close each client within a bound."""
        log.info("notifier stopping")
        deadline = time.monotonic() + max(0.0, self._time_left_s() - _CLOSE_RESERVE_S)
        self.executor.shutdown(wait=False, cancel_futures=True)
        for future in list(self._inflight):
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        self._settle_completed(self.clock())
        try:
            self._commit_and_wait(deadline)
        finally:
            bounded_call(self.consumer.close, min(_CLIENT_CLOSE_S, self._time_left_s()), "consumer close")
            self.producer.flush(min(10.0, max(0.0, self._time_left_s() - 1.0)))
            for channel in self.channels.values():
                channel.close()
            self.http.close()
            self.pool.close(timeout=min(5.0, max(0.0, self._time_left_s() - 0.5)))
        if self._inflight:
            log.warning("deliveries still running at the stop bound; their records are read again")
        log.info("notifier stopped")

    def _commit_and_wait(self, deadline: float) -> None:
        """The last commit, and its answer, until ``deadline`` (the broker away: it is read again)."""
        while time.monotonic() < deadline:
            self._commit()
            if not self.commits.outstanding:
                return
            self.consumer.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        log.warning("the last commit was not answered in time; its records are read again")


_MAX_TRACES = 10_000
"""Trace contexts the notifier keeps for records not yet told (bounded: the oldest go first)."""
_CLOSE_RESERVE_S = 4.0
"""Of the time a stop leaves, what closing the clients keeps."""
_CLIENT_CLOSE_S = 3.0
"""The longest the consumer's close may take (leaving the group with the broker away can hang)."""


class _WrongRecord(Exception):
    """A decodable record that is not an AlertEvent."""


def _search_path(schema: str | None) -> Callable[[psycopg.Connection[Any]], None] | None:
    if schema is None:
        return None

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))

    return configure
