"""The database sink: stores every record of the sample, rollup, cost, alert, anomaly and dead-letter topics
in PostgreSQL/TimescaleDB (D1, D3). Rows per record: ``consumers/tables.py``; the database side:
``consumers/sink_writer.py``.

Order of work for each batch (bounded by ``batch_max`` records and ``batch_timeout_s`` of age):
  1. each record is decoded and turned into rows as it arrives; a record that cannot be decoded, is not
     the record its topic carries, or breaks the value rules every reader applies (``bus.validation``:
     InvalidRecord, and FutureEventTime for an event time more than AIMA_MAX_CLOCK_SKEW_S ahead of the
     sink's clock) becomes a dead letter: a dead_letters row in the batch, and a record on the
     dead-letter topic (``consumers/sink_letters.py``); with selective storage on (D6,
     ``consumers/sink_filter.py``), a raw sample row no metric of which moved beyond its deadband, and
     whose heartbeat is not due, is left out: its record is in the batch with no rows, so its offset is
     committed like any other (never a dead letter);
  2. the batch goes to the writer thread: one transaction of COPY + upsert per table; the database may
     reject single records too (bisected out and dead-lettered);
  3. after the database commit, the database's dead letters are sent too;
  4. only once the batch is stored and every dead letter of it (and of each batch before it) is
     acknowledged by the broker are its offsets committed (asynchronously: a commit never blocks the
     loop while the broker is away).
One batch is written while the next fills. While the database is away the writer retries the same batch
and the consumer pauses its partitions, polling on so it stays in the group; nothing is committed until
the batch is stored, so nothing is lost and (by the upserts) nothing is stored twice.

A stop (``stopping``) stores and commits what is safe within what the stop bound leaves (``time_left_s``),
and closes each client within a bound of its own: what is not stored and committed by then is read again
by the next start.

The sink is given its clients (consumer, dead-letter producer, writers, codec): :func:`open_sink` builds
them from the settings, closing what it opened when a later one fails, and :func:`run` runs the result.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl
from confluent_kafka import (
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry, Counter

from bus.codec import Codec
from bus.errors import CodecError
from bus.frames import FrameDecoder, FrameDecoders
from bus.health import database_check
from bus.kafka import client_config, quiet_config
from bus.runtime import Service, bounded_call
from bus.selective_storage import SelectiveStorage
from bus.settings import Settings
from bus.topics import BY_KEY, consumer_group, topic_name
from bus.tracing import OFF, Tracing, open_tracing
from bus.validation import FUTURE_EVENT_TIME, ColumnValidator, EventTimeGuard, Validator
from consumers.settings import ArchiveSettings, RetentionSettings
from consumers.sink_chunks import Chunk
from consumers.sink_filter import RowFilter
from consumers.sink_letters import Letter, LetterOutbox
from consumers.sink_metrics import SinkMetrics
from consumers.sink_writer import Aborted, Entry, Writer, WriteResult, now_ms
from consumers.tables import BY_NAME, BY_RECORD, Origin, Table, dead_letter_row, rows_for

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOPICS", "CommitTracker", "Sink", "SinkStats", "open_sink", "run"]

DEFAULT_TOPICS: tuple[str, ...] = (
    "gpu.samples",
    "system.samples",
    "job.timings",
    "job.events",
    "queue.samples",
    "k8s.pods",
    "rollups",
    "costs",
    "energy",
    "alerts",
    "anomalies",
    "deadletter",
)
"""Catalogue keys of the topics the sink stores."""

_LAG_EVERY_S = 1.0
_BLOCKED_BEFORE_PAUSE_S = 1.0
"""A full batch waits this long for a busy (healthy) writer before the partitions are paused; pausing
discards what librdkafka prefetched, so it is kept for real stalls."""
_DEAD_LETTER_FLUSH_S = 10.0
_CLOSE_RESERVE_S = 4.0
"""Of the time a stop leaves, what closing the clients keeps (the drain takes the rest)."""
_CLIENT_CLOSE_S = 3.0
"""The longest the consumer's close may take (leaving the group with the broker away can hang)."""
_MAX_UNCOMMITTED_BATCHES = 50
"""Stored batches waiting for a dead letter's acknowledgement before the sink pauses its partitions."""
_COLUMNAR_MIN = 64
"""Fewer records than this from one consume are decoded one by one: the native read would not pay."""
_FILTERED = "filtered"
"""A place of a record read natively whose rows selective storage left out."""


@dataclass
class SinkStats:
    """What one run did, for callers and tests (Prometheus has the same, continuously)."""

    records: int = 0
    batches: int = 0
    dead_letters: int = 0
    staged: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    """Raw rows selective storage left out, per table."""


class CommitTracker:
    """The broker's answers to the sink's asynchronous offset commits. Made before the consumer, whose
    ``on_commit`` it is (librdkafka runs it from ``consume``), and given to the sink with that consumer:
    the answers need no sink to exist yet."""

    def __init__(self, failures: Counter) -> None:
        """``failures``: counts each commit the broker refused."""
        self.committed: dict[tuple[str, int], int] = {}
        """Offsets the broker acknowledged as committed, per (topic, partition)."""
        self.outstanding = 0
        """Commits sent and not answered yet."""
        self._failures = failures

    def sent(self) -> None:
        self.outstanding += 1

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The broker's answer to a commit; only what it acknowledged counts."""
        self.outstanding = max(0, self.outstanding - 1)
        if error is not None:
            # The rows are stored; the records come again after a restart and are stored once.
            self._failures.inc()
            log.warning("offset commit failed", extra={"error": str(error)})
            return
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                key = (tp.topic, tp.partition)
                self.committed[key] = max(self.committed.get(key, -1), tp.offset)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        for tp in partitions:
            self.committed.pop(tp, None)


@dataclass
class _InFlight:
    future: Future[WriteResult]
    offsets: dict[tuple[str, int], int]
    records: int
    started: float
    writer: int
    letters: list[Letter] = field(default_factory=list)
    """Dead letters of this batch's records; its offsets are committed only once all are delivered."""
    traces: list[Any] = field(default_factory=list)
    """Trace contexts its records carried (bus/tracing.py; empty with tracing off)."""
    started_ns: int = 0


class Sink:
    """One consumer in group ``group_id``. :meth:`run` until ``stopping`` is set; it then stores and
    commits what it holds and closes.

    ``writer``: one Writer, or several (each its own connection and thread): batch N+1 may be written
    while batch N still is; offsets are committed in batch order, each once every batch before it is
    stored."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        producer: Producer,
        writers: Sequence[Writer],
        commits: CommitTracker,
        metrics: SinkMetrics,
        codec: Codec,
        topics: Sequence[str] = DEFAULT_TOPICS,
        batch_max: int = 5000,
        batch_timeout_s: float = 1.0,
        shutdown_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        time_left_s: Callable[[], float] | None = None,
        selective: SelectiveStorage | None = None,
        tracing: Tracing = OFF,
    ) -> None:
        """The sink owns the clients it is given and closes them when :meth:`run` ends. ``consumer``:
        configured without auto commit or auto offset store, with ``commits.on_commit`` as its
        ``on_commit`` (:func:`open_sink` does so); ``producer``: for the dead letters.
        ``shutdown_timeout_s``: the longest a stop waits for the database; ``time_left_s``: what the stop
        bound leaves the process (``Service.time_left_s``), which caps that wait and the closes.
        ``selective``: deadbands and heartbeats of raw samples (D6); None: every row is stored.
        ``tracing``: a ``sink batch`` span per stored batch (bus/tracing.py), off by default."""
        if batch_max < 1 or batch_timeout_s <= 0:
            raise ValueError("batch_max must be >= 1 and batch_timeout_s > 0")
        self._writers = list(writers)
        if not self._writers:
            raise ValueError("a sink needs at least one writer")
        self._metrics = metrics
        self._codec = codec
        self._expected = {topic_name(settings, key): BY_KEY[key].schema for key in topics}
        self._deadletter_topic = topic_name(settings, "deadletter")
        self._batch_max = batch_max
        self._batch_timeout_s = batch_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._clock = clock
        self._time_left_s = time_left_s or (lambda: shutdown_timeout_s + _CLOSE_RESERVE_S)
        self._validator = Validator()
        self._column_validator = ColumnValidator()
        self._event_times = EventTimeGuard(settings.max_clock_skew_s)
        self._consumer = consumer
        self._producer = producer
        self._commits = commits
        self._letters = LetterOutbox(
            self._producer, self._codec, self._deadletter_topic, metrics.dead_letter_failures
        )
        # Their threads start with the first batch each is given.
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"aima-sink-writer-{i}")
            for i in range(len(self._writers))
        ]
        self._batch: list[Entry] = []
        self._batch_offsets: dict[tuple[str, int], int] = {}
        self._batch_letters: list[Letter] = []
        self._tracing = tracing
        self._batch_traces: list[Any] = []
        self._batch_started: float | None = None
        self._full_since: float | None = None
        self._inflight: deque[_InFlight] = deque()
        """Batches handed to writers, oldest first; each leaves once it and every one before it is done."""
        self._ready_to_commit: list[_InFlight] = []
        self._held: deque[Message] = deque()
        self._held_retry_at = 0.0
        self._held_delay_s = 0.2
        self._assigned: set[tuple[str, int]] = set()
        self._paused = False
        self._pause_state_unknown = False
        self._lag_at = 0.0
        self._closing = False
        self._frames = FrameDecoders(self._codec)
        self._filter = RowFilter(selective or SelectiveStorage())
        if self._filter.active and selective is not None:
            log.info("selective storage on (D6)", extra={"file": selective.source})
        self.stats = SinkStats()

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self, stopping: threading.Event) -> SinkStats:
        try:
            self._consumer.subscribe(
                list(self._expected),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            log.info("sink consuming", extra={"topics": sorted(self._expected)})
            while not stopping.is_set():
                self._step()
            self._drain()
        finally:
            self._close()
        return self.stats

    def _step(self) -> None:
        self._letters.serve()
        self._collect(commit=False)
        now = self._clock()
        if self._batch_due(now) and self._free_writer() is not None:
            self._submit()
        elif not self._batch and not self._inflight and self._writers[0].upkeep_due():
            self._submit_upkeep(now)
        if self._ready_to_commit:  # after the hand-over: the writer works on while offsets commit
            self._commit()
        full = len(self._batch) >= self._batch_max
        if full and self._full_since is None:
            self._full_since = now
        stalled = self._full_since is not None and now - self._full_since >= _BLOCKED_BEFORE_PAUSE_S
        retrying = any(writer.retrying for writer in self._writers)
        busy = bool(self._inflight) and (retrying or stalled)
        # Batches stored but held back by an undelivered dead letter: reading on would only pile up more.
        unacknowledged = len(self._ready_to_commit) >= _MAX_UNCOMMITTED_BATCHES
        self._set_paused(bool(self._held) or busy or unacknowledged)
        if full and not self._paused and self._inflight:
            wait([inflight.future for inflight in self._inflight], timeout=0.05, return_when=FIRST_COMPLETED)
        else:
            wanted = max(1, self._batch_max - len(self._batch))
            self._accept_many(self._consumer.consume(num_messages=wanted, timeout=self._poll_timeout(now)))
            self._retry_held()
        self._report_lag()

    def _batch_due(self, now: float) -> bool:
        if not self._batch or self._batch_started is None:
            return False
        return len(self._batch) >= self._batch_max or now - self._batch_started >= self._batch_timeout_s

    def _poll_timeout(self, now: float) -> float:
        if any(writer.retrying for writer in self._writers):
            return 0.25  # the database is away: nothing to hurry for, and the loop costs CPU
        if self._inflight or self._paused or self._held:
            return 0.05
        if self._batch_started is not None:
            return max(0.0, min(self._batch_timeout_s - (now - self._batch_started), 0.5))
        return min(self._batch_timeout_s, 0.5)

    # -- records in --------------------------------------------------------------------------------------

    def _accept_many(self, messages: list[Message]) -> None:
        """Decode what one consume returned: per topic, the records of a columnar-capable schema in one
        native read (``bus.frames``); every other record, and each one that read leaves out, one by one
        (:meth:`_accept`, which also knows the exact dead-letter reasons)."""
        if self._held or len(messages) < _COLUMNAR_MIN:
            for message in messages:
                self._accept(message)
            return
        by_topic: dict[str, list[Message]] = {}
        for message in messages:
            if self._kafka_error(message):
                continue
            by_topic.setdefault(message.topic(), []).append(message)
        for topic, batch in by_topic.items():
            # Once a record waits for the registry, every later one waits behind it, decided then.
            places = self._columnar(topic, batch) if not self._held else [None] * len(batch)
            for message, place in zip(batch, places, strict=True):
                if place is None or self._held:
                    self._accept(message)
                elif isinstance(place, tuple):
                    # at-least-once step 1: read natively into the batch's columns (checked valid)
                    self._append(message, None, *place)
                else:  # _FILTERED by selective storage: no rows, and its offset is committed all the same
                    self._append(message, [])

    def _columnar(self, topic: str, messages: list[Message]) -> list[tuple[Chunk, int] | str | None]:
        """For each message read natively, its chunk and row (or ``_FILTERED``: selective storage left
        its rows out); None for those to decode one by one."""
        places: list[tuple[Chunk, int] | str | None] = [None] * len(messages)
        decoder = self._frame_decoder(self._expected[topic])
        if decoder is None:
            return places
        frame = decoder.decode([message.value() for message in messages])
        if frame.columns is None or not self._columns_valid(topic, frame.record_name, frame.columns):
            return places
        tables = BY_RECORD[frame.record_name]
        columns, rows, plan = frame.columns, frame.rows, None
        if self._filter.filters(frame.record_name):
            if frame.rest or not self._filter.columnar(frame.record_name):
                # One by one, in offset order: each source's decisions depend on its previous row.
                return places
            partitions = [(topic, messages[position].partition()) for position in frame.rows]
            plan = self._filter.plan(tables[0], columns, partitions)
            if not all(plan.keep):
                columns = columns.filter(pl.Series(plan.keep, dtype=pl.Boolean))
                rows = [position for position, kept in zip(frame.rows, plan.keep, strict=True) if kept]
        chunk = None
        if rows:
            origins = None
            if Chunk.needs_origins(tables):
                origins = [_origin(messages[position]) for position in rows]
            chunk = Chunk(tables, columns, origins)
            # Its CSV is made now, while the writer copies the previous batch (polars works without the
            # GIL): the writer thread is the narrowest stage of the sink.
            try:
                chunk.prepare()
            except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
                log.warning("no CSV for these records; storing them one by one", extra={"error": str(exc)})
                return places  # the plan is not applied: the one-by-one path decides them
        if plan is not None:
            self._filter.apply(plan)
            self._count_filtered(plan.filtered)
            for position, kept in zip(frame.rows, plan.keep, strict=True):
                if not kept:
                    places[position] = _FILTERED
        if chunk is not None:
            for index, position in enumerate(rows):
                places[position] = (chunk, index)
        return places

    def _count_filtered(self, filtered: dict[str, int]) -> None:
        for table, count in filtered.items():
            self._metrics.rows_filtered.labels(table).inc(count)
            self.stats.filtered[table] = self.stats.filtered.get(table, 0) + count

    def _columns_valid(self, topic: str, record_name: str, columns: pl.DataFrame) -> bool:
        """Whether every record read natively passes the value rules and the event-time guard; when not
        (or when the columns cannot tell), each is checked one by one, which dead-letters the bad ones
        with their reasons."""
        if topic == self._deadletter_topic:
            return True
        if self._column_validator.all_valid(record_name, columns) is not True:
            return False
        if "time" not in columns.columns:
            return True
        if not isinstance(columns.schema["time"], pl.Datetime):
            return False
        newest = columns.get_column("time").dt.epoch("ms").max()
        return newest is None or self._event_times.columns_ok(int(newest))  # type: ignore[arg-type]

    def _frame_decoder(self, record_name: str) -> FrameDecoder | None:
        """A columnar decoder for the records of ``record_name``; None where a chunk cannot hold them (a
        table with a row per item that also stores message properties, see consumers/sink_chunks.py)."""
        tables = BY_RECORD.get(record_name, ())
        if not tables or any(t.items is not None and Chunk.needs_origins((t,)) for t in tables):
            return None
        return self._frames.get(record_name)

    def _kafka_error(self, message: Message) -> bool:
        """True for a consumer error instead of a record (logged; a fatal one raises)."""
        error = message.error()
        if error is None:
            return False
        if error.fatal():
            raise KafkaException(error)
        log.warning("consumer error", extra={"error": str(error)})
        return True

    def _accept(self, message: Message) -> None:
        if self._kafka_error(message):
            return
        if self._held:  # keep order behind a record waiting for the schema registry
            self._held.append(message)
            return
        try:
            self._add(message)
        except CodecError as exc:
            if not exc.transient:
                raise
            log.warning("decoding needs the schema registry, holding records", extra={"reason": exc.reason})
            self._held.append(message)
            self._held_retry_at = self._clock() + self._held_delay_s

    def _retry_held(self) -> None:
        while self._held and self._clock() >= self._held_retry_at:
            try:
                self._add(self._held[0])
            except CodecError as exc:
                if not exc.transient:
                    raise
                self._held_delay_s = min(self._held_delay_s * 2, 10.0)
                self._held_retry_at = self._clock() + self._held_delay_s
                return
            self._held.popleft()
            self._held_delay_s = 0.2

    def _add(self, message: Message) -> None:
        """Decode one record into the batch; poison becomes a dead letter. Raises only a transient
        CodecError (the record must wait)."""
        topic = message.topic()
        try:
            # at-least-once step 1: decoded and turned into rows, or made a dead letter (row and record)
            name, record = self._codec.decode(message.value())
        except CodecError as exc:
            if exc.transient:
                raise
            rows = self._poison(message, exc.reason, type(exc).__name__)
        else:
            expected = self._expected.get(topic)
            if name != expected:
                rows = self._poison(message, f"{topic} carries {expected} records, not {name}", "WrongRecord")
            elif (invalid := self._invalid(topic, name, record)) is not None:
                rows = self._poison(message, *invalid)
            else:
                try:
                    rows = rows_for(name, record, _origin(message))
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    rows = self._poison(message, f"{name} does not fit its tables: {exc}", type(exc).__name__)
                else:
                    if self._filter.filters(name):
                        rows, filtered = self._filter.rows((topic, message.partition()), rows)
                        self._count_filtered(filtered)
        self._append(message, rows)

    def _invalid(self, topic: str, name: str, record: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, error type) when the record breaks the rules every reader applies, else None. Dead
        letters are stored whatever they hold: refusing one would lose the trace of a refusal."""
        if topic == self._deadletter_topic:
            return None
        found = self._validator.problems(name, record)
        if found:
            return f"{name}: " + "; ".join(found), "InvalidRecord"
        event_time = record.get("time")
        if isinstance(event_time, datetime):
            ahead = self._event_times.problem(event_time)
            if ahead is not None:
                return f"{name}: time: {ahead}", FUTURE_EVENT_TIME
        return None

    def _append(
        self,
        message: Message,
        rows: list[tuple[Table, tuple[Any, ...]]] | None,
        chunk: Chunk | None = None,
        index: int = 0,
    ) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        self.stats.records += 1
        if not self._batch:
            self._batch_started = self._clock()
        entry = Entry(topic, partition, offset, message.key(), message.value(), rows, chunk, index)
        if self._tracing.on:
            span_context = self._tracing.context(message.headers())
            if span_context is not None:
                self._batch_traces.append(span_context)
        self._batch.append(entry)
        self._batch_offsets[(topic, partition)] = offset

    def _poison(self, message: Message, reason: str, error_type: str) -> list[tuple[Table, tuple[Any, ...]]]:
        """The dead letter for a record that cannot be stored: its dead_letters row (stored with the
        batch) and, now, its record on the dead-letter topic."""
        letter = {
            "time": now_ms(),
            "stage": "sink",
            "origin_topic": message.topic(),
            "origin_partition": message.partition(),
            "origin_offset": message.offset(),
            "key": message.key(),
            "value": message.value(),
            "reason": reason,
            "error_type": error_type,
            "source": "sink",
        }
        log.warning(
            "record dead-lettered",
            extra={
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "reason": reason,
            },
        )
        self._publish_letter(letter, self._batch_letters)
        return [(BY_NAME["dead_letters"], dead_letter_row(letter))]

    def _publish_letter(self, letter: dict[str, Any], owed_by: list[Letter]) -> None:
        """The dead letter goes to the dead-letter topic too, unless it came from there (no loops); the
        batch ``owed_by`` belongs to is committed only once the broker has it."""
        self._metrics.dead_letters.labels(letter["origin_topic"], letter["error_type"]).inc()
        self.stats.dead_letters += 1
        if letter["origin_topic"] == self._deadletter_topic:
            return
        owed_by.append(self._letters.send(letter))

    # -- batches out -------------------------------------------------------------------------------------

    def _submit(self) -> None:
        entries, offsets = self._batch, self._batch_offsets
        started = self._batch_started if self._batch_started is not None else self._clock()
        self._metrics.batch_seconds.labels("fill").observe(self._clock() - started)
        per_topic: dict[str, int] = {}
        for entry in entries:
            per_topic[entry.topic] = per_topic.get(entry.topic, 0) + 1
        for topic, count in per_topic.items():
            self._metrics.records.labels(topic).inc(count)
        letters, traces = self._batch_letters, self._batch_traces
        self._batch, self._batch_offsets, self._batch_started, self._full_since = [], {}, None, None
        self._batch_letters, self._batch_traces = [], []
        # The span starts where the batch began to fill (the clock is monotonic; spans take wall time).
        started_ns = 0
        if self._tracing.on:
            started_ns = self._tracing.start_ns() - int((self._clock() - started) * 1e9)
        index = self._free_writer()
        if index is None:  # callers check first
            raise RuntimeError("no writer is free")
        # at-least-once step 2: to a writer thread, one transaction of COPY + upsert per table
        future = self._executors[index].submit(self._writers[index].write, entries)
        self._inflight.append(
            _InFlight(future, offsets, len(entries), started, index, letters, traces, started_ns)
        )

    def _submit_upkeep(self, now: float) -> None:
        """An idle sink hands its first writer (the one doing partition upkeep and retention) an empty
        write, so retention runs on schedule also while no record comes; it carries no offsets."""
        future = self._executors[0].submit(self._writers[0].write, [])
        self._inflight.append(_InFlight(future, {}, 0, now, 0))

    def _free_writer(self) -> int | None:
        """A writer with no batch still being written (its last one may wait for an older batch)."""
        busy = {inflight.writer for inflight in self._inflight if not inflight.future.done()}
        return next((i for i in range(len(self._writers)) if i not in busy), None)

    def _collect(self, commit: bool = True) -> None:
        """Once the batch in flight is stored: send its database dead letters, and (unless the caller
        does it later) commit the offsets of the stored batches whose letters are all delivered."""
        while self._inflight and self._inflight[0].future.done():
            inflight = self._inflight.popleft()
            result = inflight.future.result()  # a fatal database error ends the sink here, uncommitted
            # at-least-once step 3: after the database commit, the database's dead letters are sent
            for letter in result.letters:
                self._publish_letter(letter, inflight.letters)
            if inflight.records:  # an upkeep-only write is no batch
                self._account(inflight, result)
                if self._tracing.on:
                    self._trace(inflight, result)
            self._ready_to_commit.append(inflight)
        if commit and self._ready_to_commit:
            self._commit()

    def _account(self, inflight: _InFlight, result: WriteResult) -> None:
        self._metrics.batches.inc()
        self._metrics.batch_records.observe(inflight.records)
        self._metrics.batch_seconds.labels("write").observe(result.seconds)
        for table, count in result.staged.items():
            stored = result.stored.get(table, 0)
            self._metrics.rows.labels(table, "stored").inc(stored)
            self._metrics.rows.labels(table, "skipped").inc(count - stored)
            self.stats.staged[table] = self.stats.staged.get(table, 0) + count
            self.stats.stored[table] = self.stats.stored.get(table, 0) + stored
        self.stats.batches += 1

    def _trace(self, inflight: _InFlight, result: WriteResult) -> None:
        """The stored batch's span: child of its first traced record, linked to the others'."""
        traces = inflight.traces
        span = self._tracing.batch_span(
            "sink batch",
            traces[0] if traces else None,
            traces[1:],
            inflight.started_ns,
            {"aima.records": inflight.records, "aima.rows_stored": sum(result.stored.values())},
        )
        self._tracing.end(span)

    def _commit(self) -> None:
        """Commit the stored batches, oldest first, up to the first one with a dead letter the broker has
        not acknowledged yet (that one and every later one wait: at least once)."""
        self._letters.serve()
        if self._commits.outstanding:  # one at a time: the next one carries what was stored meanwhile
            return
        # at-least-once step 4: stored batches, oldest first, while every letter of each is acknowledged
        settled = 0
        while settled < len(self._ready_to_commit) and all(
            letter.delivered for letter in self._ready_to_commit[settled].letters
        ):
            settled += 1
        if not settled:
            return
        started = self._clock()
        offsets: dict[tuple[str, int], int] = {}
        batches = self._ready_to_commit[:settled]
        self._ready_to_commit = self._ready_to_commit[settled:]
        for done in batches:
            for tp, offset in done.offsets.items():
                offsets[tp] = max(offsets.get(tp, -1), offset + 1)
        # Only partitions still ours, and never backwards (a batch from before a rebalance may finish late).
        commit = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in sorted(offsets.items())
            if (topic, partition) in self._assigned
            and offset > self._commits.committed.get((topic, partition), -1)
        ]
        if commit:
            try:
                # Asynchronous: a synchronous commit blocks up to 45 s while the coordinator is away.
                self._consumer.commit(offsets=commit, asynchronous=True)
                self._commits.sent()
            except KafkaException as exc:
                # The rows are stored; the records come again after a restart and are stored once.
                self._metrics.commit_failures.inc()
                log.warning("offset commit failed", extra={"error": str(exc)})
        now = self._clock()
        self._metrics.batch_seconds.labels("commit").observe(now - started)
        for done in batches:
            if done.records:
                self._metrics.batch_seconds.labels("total").observe(now - done.started)

    def _drain(self) -> None:
        """Stop: store and commit the batch in hand, waiting at most ``shutdown_timeout_s`` for the
        database, and never past what the stop bound leaves; what is not stored (or whose dead letters
        are not delivered) by then is not committed: it comes again on the next start."""
        budget = min(self._shutdown_timeout_s, max(0.0, self._time_left_s() - _CLOSE_RESERVE_S))
        deadline = self._clock() + budget
        self._set_paused(True)
        while self._inflight or self._batch:
            self._letters.serve()
            self._collect()
            if self._batch and self._free_writer() is not None:
                self._submit()
            if not self._inflight:
                break
            remaining = deadline - self._clock()
            if remaining <= 0:
                log.warning("database still unavailable at shutdown; batch left uncommitted")
                for writer in self._writers:
                    writer.abort.set()
                for inflight in self._inflight:
                    with contextlib.suppress(Aborted):
                        inflight.future.result(timeout=60)
                # Batches stored after an older one failed to be stay uncommitted: they come again.
                self._inflight.clear()
                break
            futures = [inflight.future for inflight in self._inflight]
            wait(futures, timeout=min(remaining, 0.5), return_when=FIRST_COMPLETED)
            self._set_paused(True)
            self._consumer.consume(num_messages=1, timeout=0)  # paused: serves callbacks; nothing is read
        # The last dead letters and the commits' acknowledgements, within what is left.
        while (self._ready_to_commit or self._commits.outstanding) and self._clock() < deadline:
            self._commit()
            self._letters.serve(min(0.05, max(0.0, deadline - self._clock())))
            # Paused: nothing is read; this serves the commit's answer.
            self._consumer.consume(num_messages=1, timeout=min(0.05, max(0.0, deadline - self._clock())))
        if self._ready_to_commit or self._commits.outstanding or self._letters.pending():
            log.warning(
                "stopping with work not acknowledged; it is read again on the next start",
                extra={
                    "batches_uncommitted": len(self._ready_to_commit),
                    "commits_unanswered": self._commits.outstanding,
                    "dead_letters_pending": self._letters.pending(),
                },
            )

    def _close(self) -> None:
        """Close every client, each within a bound: with the broker or the database away a close could
        otherwise outlast the stop bound (nothing is committed here any more)."""
        self._closing = True
        try:
            bounded_call(self._consumer.close, min(_CLIENT_CLOSE_S, self._time_left_s()), "consumer close")
        finally:
            if self._inflight:  # an error left batches in flight: stop their retries
                for writer in self._writers:
                    writer.abort.set()
            for executor in self._executors:
                executor.shutdown(wait=False, cancel_futures=True)
            for inflight in self._inflight:
                with contextlib.suppress(Exception):
                    inflight.future.result(timeout=max(0.0, self._time_left_s() - 1.0))
            for writer in self._writers:
                with contextlib.suppress(Exception):
                    writer.close()
            self._producer.flush(min(_DEAD_LETTER_FLUSH_S, max(0.0, self._time_left_s() - 1.0)))
            self._metrics.paused.set(0)
            self._metrics.lag.update({})

    # -- partitions --------------------------------------------------------------------------------------

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused and not self._pause_state_unknown:
            return
        partitions = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)
            if paused != self._paused:
                log.info("partitions paused" if paused else "partitions resumed")
        self._paused = paused
        self._pause_state_unknown = False
        self._metrics.paused.set(1 if paused else 0)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        # librdkafka keeps a partition's pause across rebalances: state it again on the next step.
        self._pause_state_unknown = True
        log.info("partitions assigned", extra={"partitions": len(self._assigned)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is stored before the partitions go; records held or unwritten are simply read
        again by their next owner (the upserts store them once)."""
        if not self._closing:
            if self._inflight:
                wait([inflight.future for inflight in self._inflight], timeout=10.0)
            self._collect()
        self._forget(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        self._commits.forget(gone)
        self._filter.forget(gone)  # their next owner stores the first row of each source again
        self._held = deque(m for m in self._held if (m.topic(), m.partition()) not in gone)
        self._pause_state_unknown = True

    def _report_lag(self) -> None:
        now = self._clock()
        if now - self._lag_at < _LAG_EVERY_S:
            return
        self._lag_at = now
        partitions = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        offsets: dict[tuple[str, int], tuple[int, int]] = {}
        if partitions:
            for tp in self._consumer.position(partitions):
                position = tp.offset
                if position == OFFSET_INVALID:  # nothing read yet: count from the last commit
                    position = self._commits.committed.get((tp.topic, tp.partition), OFFSET_INVALID)
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if position >= 0 and high >= 0:
                    offsets[(tp.topic, tp.partition)] = (high, position)
        self._metrics.lag.update(offsets)


def _origin(message: Message) -> Origin:
    kind, millis = message.timestamp()
    return Origin(
        message.topic(),
        message.partition(),
        message.offset(),
        None if kind == TIMESTAMP_NOT_AVAILABLE else millis,
    )


def open_sink(
    settings: Settings,
    metrics: SinkMetrics,
    writers: Sequence[Writer],
    *,
    codec: Codec | None = None,
    topics: Sequence[str] = DEFAULT_TOPICS,
    group_id: str | None = None,
    consumer_config: dict[str, Any] | None = None,
    **options: Any,
) -> Sink:
    """The sink with its clients built from ``settings``: the dead-letter producer, then the consumer
    (``consumer_config`` added to its librdkafka settings); ``writers`` are handed over too. When a
    step fails, what was opened before it is closed (and the writers are) before the error goes on.
    ``options``: the rest of :class:`Sink`'s keyword arguments."""
    with contextlib.ExitStack() as opened:
        for writer in writers:
            opened.callback(writer.close)
        commits = CommitTracker(metrics.commit_failures)
        producer = Producer(
            client_config(
                settings,
                **{
                    "acks": "all",
                    "enable.idempotence": True,
                    "linger.ms": 20,
                    "client.id": "aima-sink-dlq",
                    **quiet_config("sink-dlq"),
                },
            )
        )
        opened.callback(producer.close)  # nothing is queued yet: the close does not wait
        config = client_config(
            settings,
            **{
                "group.id": group_id or consumer_group(settings, "sink"),
                "client.id": "aima-sink",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "on_commit": commits.on_commit,
                **quiet_config("sink"),
            },
        )
        config.update(consumer_config or {})
        consumer = Consumer(config)
        opened.callback(consumer.close)
        sink = Sink(
            settings,
            consumer=consumer,
            producer=producer,
            writers=writers,
            commits=commits,
            metrics=metrics,
            codec=codec or Codec.from_settings(settings),
            topics=topics,
            **options,
        )
        opened.pop_all()  # the sink owns them now: its run closes them
    return sink


def run(
    settings: Settings,
    *,
    service: Service | None = None,
    batch_max: int = 5000,
    batch_timeout_s: float = 1.0,
    group_id: str | None = None,
    topics: Sequence[str] | None = None,
    schema: str | None = None,
    registry: CollectorRegistry | None = None,
    codec: Codec | None = None,
    maintenance_every_s: float | None = 3600.0,
    retention_every_s: float | None = None,
    retention: RetentionSettings | None = None,
    archive: ArchiveSettings | None = None,
    shutdown_timeout_s: float = 10.0,
    retry_max_s: float = 5.0,
    consumer_config: dict[str, Any] | None = None,
    writers: int = 2,
    selective: SelectiveStorage | None = None,
    tracing: Tracing | None = None,
) -> SinkStats:
    """Run the sink until ``service.stopping`` is set, then store and commit the batch in hand and close.

    ``topics``: catalogue keys (default :data:`DEFAULT_TOPICS`). ``schema``: database schema to write
    into (search_path), default the database's own. ``registry``: for the sink's metrics, default the
    service's. Without a ``service``, one named ``sink`` is started (signals, metrics port) and stopped
    here; a caller's service is left for the caller to stop.
    ``maintenance_every_s``: how often daily partitions are created ahead (plain PostgreSQL).
    ``retention_every_s``: also apply retention this often (None: leave it to ``db retention``; the
    `sink` command passes SinkSettings.retention_every_s), with the periods of ``retention`` (default the
    environment's); with TimescaleDB what its policies trim is left to them. ``archive``: the long-term
    archive (D5) that retention writes to before it drops (default the environment's AIMA_ARCHIVE_*).
    ``shutdown_timeout_s``: how long a stop waits for an unavailable database to store the batch in
    hand (never past what the stop bound leaves); what it does not store is read again at the next start.
    ``writers``: database connections writing batches side by side (PostgreSQL's COPY is the sink's
    narrowest stage; two nearly double what one stores on a 2-core machine).
    ``selective``: selective storage of raw samples (D6; the `sink` command loads the file
    AIMA_SINK_SELECTIVE_STORAGE names); None: every row is stored. ``tracing``: default the process's
    (bus/tracing.py, ``AIMA_OTEL_*``)."""
    if writers < 1:
        raise ValueError("writers must be at least 1")
    own_service = service is None
    tracing = tracing if tracing is not None else open_tracing("aima-sink")
    if service is None:
        service = Service("sink", settings)
        service.start()
    try:
        # Ready (/readyz) only while the database answers too: a sink without it only retries.
        service.add_check("database", database_check(settings.database_dsn()))
        metrics = SinkMetrics(registry or service.registry)
        # Partition upkeep and retention are one writer's job: two doing it at once would race on the DDL.
        # A writer connects with its first batch.
        pool = [
            Writer(
                settings.database_dsn(),
                schema=schema,
                on_retry=lambda reason: metrics.db_retries.labels(reason).inc(),
                retry_max_s=retry_max_s,
                maintenance_every_s=maintenance_every_s if i == 0 else None,
                retention_every_s=retention_every_s if i == 0 else None,
                retention=retention,
                archive=archive,
                archive_metrics=metrics.archive if i == 0 else None,
            )
            for i in range(writers)
        ]
        sink = open_sink(
            settings,
            metrics,
            pool,
            codec=codec,
            topics=tuple(topics) if topics is not None else DEFAULT_TOPICS,
            group_id=group_id,
            consumer_config=consumer_config,
            batch_max=batch_max,
            batch_timeout_s=batch_timeout_s,
            shutdown_timeout_s=shutdown_timeout_s,
            time_left_s=service.time_left_s,
            selective=selective,
            tracing=tracing,
        )
        return sink.run(service.stopping)
    finally:
        tracing.flush(min(5.0, service.time_left_s()))
        if own_service:
            service.stopped()
