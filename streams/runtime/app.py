"""The Faust app that runs every stream processor (the contract is streams/runtime/processor.py).

Per fetched batch (streams/runtime/transport.py says how Faust hands it over, and the at-least-once steps):
group the records by topic partition, decode and validate them (a partition batch that ``bus.frames`` reads
whole and that is all valid reaches the processors as columns, streams/runtime/columns.py; otherwise each
record is decoded and checked alone, and what fails goes to the dead-letter topic with its reason and origin),
advance the partition's event-time watermark, call every processor of the topic once with the partition's
inputs and a view of its table restricted to that partition, publish the outputs, dead-letter the late
records, and acknowledge the offsets. A processor that raises stops the worker with the batch unacknowledged
(at-least-once: a fixed worker processes it again).

Tables: one Faust table per (processor, topic), with the topic's partition count, so that Faust
co-partitions it with the topic and restores it where the topic partition goes. Keys are
``<partition>|<processor's key>``. Writes go to the table's store and, as JSON changelog records to the
changelog partition of the topic partition, through the sender (Faust's own table write would take its
per-record producer path, and picks the partition from its *current event*, which the app sets anyway).
The watermark of a partition is kept in the same table under ``<partition>#progress``, written after the
processor's writes, so a restored watermark never runs ahead of the restored state; with it the offset of
the last record processed, under the field every state entry uses (``offset``; records written before
named it ``o``, still read: :func:`_progress_offset`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import faust
import orjson
import polars as pl
from faust.types import TP
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from bus import self_metrics, validation
from bus.codec import Codec
from bus.errors import CodecError
from bus.frames import Frame, FrameDecoders
from bus.kafka import aiokafka_config, create_topics, wait_for_group_coordinator
from bus.settings import Settings
from bus.topics import BY_KEY, TopicSpec, topic_name
from bus.tracing import OFF, Tracing
from streams.runtime.buckets import from_ms, to_ms
from streams.runtime.columns import Columns, LazyInputs
from streams.runtime.processor import Input, Output, PartitionBatch, Processor
from streams.runtime.state import OFFSET, offset_of
from streams.runtime.transport import (
    BatchConsumer,
    DeliveryFailed,
    Refused,
    Sender,
    StreamsApp,
    flow_active,
    internal_topics,
    reset_current_event,
    set_current_event,
    still_current,
    until_flow_stops,
)

if TYPE_CHECKING:
    from streams.runtime.settings import StreamsSettings

__all__ = ["Dispatcher", "PartitionView", "StreamMetrics", "create_app"]

log = logging.getLogger(__name__)

DEADLETTER_RECORD = "aima.metrics.DeadLetter"
_PROGRESS = "#progress"
DEAD_LETTER_VALUE_MAX = 64 * 1024
"""Bytes of the original value a dead letter keeps when the whole one does not fit the topic."""
_FLOW_STOP_GRACE_S = 5.0
"""How long a batch's deliveries may still take once a rebalance or a stop has begun, before the batch is
left unacknowledged (to be processed again) so that the rebalance or stop can go on."""


class DeliveryRefused(RuntimeError):
    """The broker refused for good a record that cannot be dead-lettered (a changelog write, or a dead
    letter that does not fit even truncated): the worker stops with the batch unacknowledged."""


@dataclass(frozen=True, slots=True)
class _Truncated:
    """Tag of a dead letter sent again with its value cut to :data:`DEAD_LETTER_VALUE_MAX`."""

    record: dict[str, Any]


class StreamMetrics:
    """The app's own Prometheus metrics (A5); names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = self_metrics.counter("aima_stream_events_total", registry)
        self.dead_letters = self_metrics.counter("aima_stream_dead_letters_total", registry)
        self.late = self_metrics.counter("aima_stream_late_records_total", registry)
        self.outputs = self_metrics.counter("aima_stream_outputs_total", registry)
        self.batch_records = self_metrics.histogram(
            "aima_stream_batch_records", registry, buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
        )
        self.forms = self_metrics.counter("aima_stream_handed_records_total", registry)
        self.batch_seconds = self_metrics.histogram(
            "aima_stream_batch_seconds",
            registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.watermarks: dict[tuple[str, int], int] = {}
        registry.register(_WatermarkCollector(self.watermarks))


class _WatermarkCollector:
    """Watermark and its lag behind the wall clock per topic partition, computed at scrape time (so the lag
    grows while a partition is silent). The wall clock feeds only this metric, never a result."""

    def __init__(self, watermarks: Mapping[tuple[str, int], int], clock: Callable[[], float] = time.time):
        self._watermarks = watermarks
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        mark = self_metrics.gauge_family("aima_stream_watermark_seconds")
        lag = self_metrics.gauge_family("aima_stream_watermark_lag_seconds")
        now = self._clock()
        for (topic, partition), ms in sorted(self._watermarks.items()):
            mark.add_metric([topic, str(partition)], ms / 1000)
            lag.add_metric([topic, str(partition)], now - ms / 1000)
        yield mark
        yield lag

    def describe(self) -> list[GaugeMetricFamily]:
        return []


class PartitionView(MutableMapping[str, Any]):
    """One processor's state for one topic partition: its table's store, keys prefixed with the partition;
    every write and delete is also handed to ``changelog(full key, value or None)``. Iterating scans the
    whole store: fine on rare occasions (a resumed partition, an hour closing), not per record."""

    __slots__ = ("_changelog", "_delete", "_get", "_keys", "_prefix", "_set")

    def __init__(self, store: Any, partition: int, changelog: Callable[[str, Any], None]) -> None:
        self._prefix = f"{partition}|"
        self._changelog = changelog
        raw = getattr(store, "data", None)  # the memory store's plain dict: the fastest there is
        target = raw if isinstance(raw, dict) else store
        self._get = target.get
        self._keys = target.keys
        self._set = target.__setitem__
        self._delete = target.__delitem__

    def __getitem__(self, key: str) -> Any:
        value = self._get(self._prefix + key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._get(self._prefix + key)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._get(self._prefix + key) is not None

    def __setitem__(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError(f"state values must not be None ({key!r}); delete the key instead")
        full = self._prefix + key
        self._set(full, value)
        self._changelog(full, value)

    def __delitem__(self, key: str) -> None:
        full = self._prefix + key
        if self._get(full) is None:
            raise KeyError(key)
        self._delete(full)
        self._changelog(full, None)

    def __iter__(self) -> Iterator[str]:
        prefix, size = self._prefix, len(self._prefix)
        return iter([key[size:] for key in list(self._keys()) if key.startswith(prefix)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class _Binding:
    processor: Processor
    table: Any
    changelog: str
    late: Any


@dataclass
class _Route:
    """Everything the app does with one consumed topic."""

    spec: TopicSpec
    name: str
    bindings: list[_Binding] = field(default_factory=list)


def _json(value: Any) -> bytes:
    """Compact JSON, as ``json.dumps`` writes it for the state's values (int keys become strings), at a
    fraction of its cost: every state write goes through here."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


class Dispatcher:
    """Turns fetched records into processor calls, outputs, dead letters and acknowledgements."""

    def __init__(
        self,
        app: StreamsApp,
        settings: Settings,
        processors: Sequence[Processor],
        codec: Codec,
        metrics: StreamMetrics,
        options: StreamsSettings,
        clock: Callable[[], float] = time.time,
        tracing: Tracing = OFF,
    ) -> None:
        self.app = app
        self.tracing = tracing
        self.settings = settings
        self.codec = codec
        self.metrics = metrics
        self.options = options
        self.clock = clock
        self.sender = Sender(app)
        self.validation = validation.Validator()
        self.column_validation = validation.ColumnValidator()
        self.event_times = validation.EventTimeGuard(settings.max_clock_skew_s, clock)
        """Records too far ahead of this worker's clock are dead-lettered and never move a watermark."""
        self._frames = FrameDecoders(codec)
        self.routes: dict[str, _Route] = {}
        self._fresh: set[tuple[str, TP]] = set()
        """(processor, partition) pairs that have had a batch since the last rebalance."""
        names = [processor.name for processor in processors]
        if len(set(names)) != len(names):
            raise ValueError(f"processor names must be unique: {names}")
        for processor in processors:
            for key in processor.topics:
                spec = BY_KEY.get(key)
                if spec is None:
                    raise ValueError(f"processor {processor.name!r} consumes unknown topic {key!r}")
                name = topic_name(settings, key)
                route = self.routes.get(name)
                if route is None:
                    route = self.routes[name] = _Route(spec, name)
                table = app.Table(
                    f"{processor.name}-{key}",
                    partitions=spec.partitions,
                    help=f"state of the {processor.name} processor for {name}, by partition",
                )
                changelog = table.changelog_topic.get_topic_name()
                route.bindings.append(
                    _Binding(processor, table, changelog, metrics.late.labels(processor.name, key))
                )

    # -- rebalances -------------------------------------------------------------------------------------

    def on_revocation(self) -> None:
        """A rebalance starts (Faust revokes every partition first; an in-flight batch has finished, see
        streams/runtime/transport.py): each partition's next batch is a resumed one."""
        self._fresh.clear()

    def on_assignment(self, assigned: Iterable[TP]) -> None:
        """After a rebalance: drop from the memory store the state of partitions this worker no longer
        holds. The changelog keeps it; a later assignment restores it from there, while a stale copy here
        could outlive a delete that compaction has since removed from the changelog."""
        self._fresh.clear()
        held: dict[str, set[int]] = {}
        for tp in assigned:
            held.setdefault(tp.topic, set()).add(tp.partition)
        for route in self.routes.values():
            partitions = held.get(route.name, set())
            for binding in route.bindings:
                raw = getattr(binding.table.data, "data", None)
                if not isinstance(raw, dict):
                    continue
                stale = [key for key in raw if _partition_of(key) not in partitions]
                for key in stale:
                    raw.pop(key, None)
            for known in [k for k in self.metrics.watermarks if k[0] == route.spec.key]:
                if known[1] not in partitions:
                    del self.metrics.watermarks[known]

    # -- one fetched batch ------------------------------------------------------------------------------

    async def handle(
        self, consumer: BatchConsumer, generation: int, batches: list[tuple[TP, list[Any]]]
    ) -> None:
        """One fetch: ``batches`` holds each partition's aiokafka records in offset order."""
        started = time.monotonic()
        # at-least-once step 1: in flight, so a rebalance or a stop waits for this batch
        token = consumer.begin_batch()
        try:
            done: list[tuple[TP, list[Any]]] = []
            for tp, records in batches:
                route = self.routes[tp.topic]
                inputs = await self._decode(route, records)
                committed = await consumer.committed_offset(tp) if inputs else None
                if inputs is None or not self._still_ours(generation):
                    break  # a rebalance or a stop came in between: not acknowledged, so fetched again
                if inputs:
                    # at-least-once step 2: the processors run; state writes go to the store and the sender
                    self._run(route, tp, records, inputs, committed)
                    form = "columns" if isinstance(inputs, LazyInputs) else "records"
                    self.metrics.forms.labels(route.spec.key, form).inc(len(inputs))
                done.append((tp, records))
            # at-least-once step 3: the broker has every changelog, output and dead letter of the batch
            if not await self._deliver(consumer, generation):
                return  # a rebalance or a stop came first: not acknowledged, so processed again
            for tp, records in done:
                # at-least-once step 4: only now are the offsets acknowledged
                consumer.ack_batch(tp, records)
                key = self.routes[tp.topic].spec.key
                self.metrics.events.labels(key).inc(len(records))
                self.metrics.batch_records.labels(key).observe(len(records))
        finally:
            # at-least-once step 4: the batch leaves the in-flight set (acknowledged or to be fetched again)
            consumer.end_batch(token)
        self.metrics.batch_seconds.observe(time.monotonic() - started)

    def _still_ours(self, generation: int) -> bool:
        return still_current(self.app, generation)

    async def _deliver(self, consumer: BatchConsumer, generation: int) -> bool:
        """Wait until the broker has every record the batch produced (changelog writes, outputs, dead
        letters); True once it has, and only then may the offsets be acknowledged (at-least-once does not
        rest on Faust's commit flushing the producer).

        A record the broker refuses for good (too large, invalid) is dead-lettered with the reason when it
        is an output; a dead letter that does not fit goes again with its value truncated; a changelog
        write (state that cannot be put aside) or a truncated dead letter refused again raises
        :class:`DeliveryRefused`, which stops the worker with the batch unacknowledged. A delivery that
        failed for a reason that may pass (aiokafka has retried it for the producer's request timeout) is
        tried again, with back-off, while the batch is still this worker's: the records are in hand, and
        stopping would only make a restart redo the batch. False when a rebalance or a stop comes first
        (after a short grace for deliveries under way): the batch stays unacknowledged."""
        pause = 0.5
        while True:
            try:
                refused = await self._flush_unless_flow_stops()
            except DeliveryFailed as exc:
                if consumer.should_stop or not self._still_ours(generation):
                    self.sender.discard()
                    return False
                log.warning("delivery failed, retrying", extra={"error": str(exc), "pause_s": pause})
                await consumer.sleep(pause)
                pause = min(pause * 2, self.options.transient_retry_max_s)
                continue
            if refused is None:
                self.sender.discard()
                return False
            if not refused:
                return True
            for record in refused:
                self._refused(record)

    async def _flush_unless_flow_stops(self) -> list[Refused] | None:
        """The sender's flush; None when the flow stops (rebalance, stop) and the deliveries still take
        longer than :data:`_FLOW_STOP_GRACE_S` after that."""
        flush = asyncio.ensure_future(self.sender.flush())
        stopped = asyncio.ensure_future(until_flow_stops(self.app))
        try:
            await asyncio.wait([flush, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not flush.done():
                await asyncio.wait([flush], timeout=_FLOW_STOP_GRACE_S)
            if not flush.done():
                flush.cancel()
                return None
            return flush.result()
        finally:
            stopped.cancel()
            if not flush.done():
                flush.cancel()

    async def _decode(self, route: _Route, batch: list[Any]) -> Sequence[Input] | None:
        decode, problems, schema = self.codec.decode, self.validation.problems, route.spec.schema
        key = route.spec.key
        frame = self._decode_together(schema, batch)
        columns = self._columns(frame, batch)
        if columns is not None:
            return LazyInputs(key, batch[0].partition, columns)
        inputs: list[Input] = []
        fast: dict[int, tuple[str, dict[str, Any]]] = {}
        if frame is not None:
            fast = {
                row: (frame.record_name, value)
                for row, value in zip(frame.rows, frame.records(), strict=True)
            }
        for position, message in enumerate(batch):
            try:
                name, value = fast[position] if position in fast else decode(message.value)
            except CodecError as exc:
                if not exc.transient:
                    self._dead_letter(message, exc.reason, type(exc).__name__, route)
                    continue
                try:
                    retried = await self._decode_transient(message)
                except CodecError as final:
                    self._dead_letter(message, final.reason, type(final).__name__, route)
                    continue
                if retried is None:
                    return None
                name, value = retried
            if name != schema:
                self._dead_letter(message, f"a {name} record on a topic of {schema}", "WrongRecord", route)
                continue
            found = problems(name, value)
            if found:
                self._dead_letter(message, f"{name}: " + "; ".join(found), "InvalidRecord", route)
                continue
            event_time = value.get("time")
            if not isinstance(event_time, datetime):
                self._dead_letter(message, f"{name} has no event time", "NoEventTime", route)
                continue
            ahead = self.event_times.problem(event_time)
            if ahead is not None:
                self._dead_letter(message, f"{name}: {ahead}", validation.FUTURE_EVENT_TIME, route)
                continue
            inputs.append(Input(key, message.partition, message.offset, name, value, event_time))
        return inputs

    def _decode_together(self, schema: str, batch: list[Any]) -> Frame | None:
        """The records of the batch read in one native pass (``bus.frames``); the others (``rest``), and
        every record of a schema that path does not read (None), are decoded one by one."""
        decoder = self._frames.get(schema)
        return None if decoder is None else decoder.decode([message.value for message in batch])

    def _columns(self, frame: Frame | None, batch: list[Any]) -> Columns | None:
        """The batch as columns for the processors, when every record was read natively, every one is
        valid and has an event time not too far ahead; otherwise None, and the records are checked one by
        one (which dead-letters the bad ones with their reasons)."""
        if frame is None or frame.columns is None or frame.rest:
            return None
        if "time" not in frame.columns.columns or frame.columns.get_column("time").null_count():
            return None
        if not isinstance(frame.columns.schema["time"], pl.Datetime):
            return None
        if not self.column_validation.all_valid(frame.record_name, frame.columns):
            return None
        columns = Columns(frame.record_name, frame.columns, [message.offset for message in batch])
        if not self.event_times.columns_ok(max(columns.event_ms)):
            return None
        return columns

    async def _decode_transient(self, message: Any) -> tuple[str, dict[str, Any]] | None:
        """Retry a record whose decoding failed for a passing reason (a registry outage); None when the app
        stops or rebalances meanwhile; raises the error once it is no longer a passing one."""
        pause = 0.5
        consumer = self.app.consumer
        while not consumer.should_stop and flow_active(self.app):
            await consumer.sleep(pause)
            try:
                return self.codec.decode(message.value)
            except CodecError as exc:
                if not exc.transient:
                    raise
                log.warning("decoding still fails, retrying", extra={"reason": exc.reason, "pause_s": pause})
                pause = min(pause * 2, self.options.transient_retry_max_s)
        return None

    def _run(
        self, route: _Route, tp: TP, batch: list[Any], inputs: Sequence[Input], committed: int | None
    ) -> None:
        token = set_current_event(self.app, tp, batch[-1])  # the partition any Faust table write would use
        try:
            columns = inputs.columns if isinstance(inputs, LazyInputs) else None
            if columns is not None:
                newest, first_offset, last_offset = (
                    max(columns.event_ms),
                    columns.offsets[0],
                    columns.offsets[-1],
                )
            else:
                newest = max(to_ms(record.event_time) for record in inputs)
                first_offset, last_offset = inputs[0].offset, inputs[-1].offset
            progress_key = f"{tp.partition}{_PROGRESS}"
            watermark = newest
            traced = self._traced_records(batch) if self.tracing.on else None
            for binding in route.bindings:
                started_ns = self.tracing.start_ns()
                store = binding.table.data
                progress = store.get(progress_key)
                previous = progress["wm"] if progress else None
                mark = newest if previous is None else max(previous, newest)
                watermark = max(watermark, mark)
                fresh = (binding.processor.name, tp)
                if fresh not in self._fresh:
                    log.info(
                        "partition resumed",
                        extra={
                            "processor": binding.processor.name,
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "first_offset": first_offset,
                            "committed_offset": committed,
                            "watermark_ms": previous,
                            "state_offset": _progress_offset(progress),
                        },
                    )
                partition_batch = PartitionBatch(
                    route.spec.key,
                    tp.partition,
                    inputs,
                    from_ms(mark),
                    None if previous is None else from_ms(previous),
                    committed_offset=committed,
                    resumed=fresh not in self._fresh,
                    columns=columns,
                )
                changelog = self._changelog_writer(binding.changelog, tp.partition)
                view = PartitionView(store, tp.partition, changelog)
                result = binding.processor.process(partition_batch, view)
                progress = {"wm": mark, OFFSET: last_offset}
                store[progress_key] = progress
                changelog(progress_key, progress)
                self._fresh.add(fresh)
                span = None
                if traced is not None:
                    span = self._batch_span(binding.processor.name, tp, traced, result.outputs, started_ns)
                self._publish(result.outputs, self.tracing.headers(span), traced)
                self.tracing.end(span, attributes={"aima.outputs": len(result.outputs)})
                if result.late:
                    by_offset = {message.offset: message for message in batch}
                    for record, reason in result.late:
                        self._dead_letter(by_offset[record.offset], reason, "LateSample", route)
                    binding.late.inc(len(result.late))
            self.metrics.watermarks[(route.spec.key, tp.partition)] = watermark
        finally:
            reset_current_event(token)

    # -- sending ----------------------------------------------------------------------------------------

    def _changelog_writer(self, topic: str, partition: int) -> Callable[[str, Any], None]:
        add = self.sender.add

        def write(key: str, value: Any) -> None:
            add(topic, partition, _json(key), None if value is None else _json(value))

        return write

    def _traced_records(self, batch: list[Any]) -> dict[int, Any]:
        """Offset -> trace context of each record of the batch that carries a sampled one."""
        context = self.tracing.context
        found: dict[int, Any] = {}
        for message in batch:
            if message.headers:
                span_context = context(message.headers)
                if span_context is not None:
                    found[message.offset] = span_context
        return found

    def _batch_span(
        self, processor: str, tp: TP, traced: dict[int, Any], outputs: list[Output], started_ns: int
    ) -> Any:
        """One processor's span over one partition batch (bus/tracing.py says how its parent is chosen). No
        links to the batch's other traced records: there is a span per processor and partition batch, and
        at 1 % nearly every partition batch holds a traced record, so each link (the SDK's dearest part of
        a span) would be paid many times per fetch; their number is an attribute."""
        parent = next((traced[o.cause_offset] for o in outputs if o.cause_offset in traced), None)
        if parent is None and traced:
            parent = next(iter(traced.values()))
        return self.tracing.batch_span(
            f"streams {processor}",
            parent,
            (),
            started_ns,
            {"messaging.destination.partition.id": tp.partition, "aima.traced_records": len(traced)},
        )

    def _publish(
        self,
        outputs: list[Output],
        headers: list[tuple[str, bytes]] | None = None,
        traced: dict[int, Any] | None = None,
    ) -> None:
        """``headers``: the batch span's trace context, carried by the outputs a traced record caused
        (``Output.cause_offset`` in ``traced``); the others (aggregates of many records) carry none, or
        1 % sampling would trace every derived record downstream."""
        counts: dict[str, int] = {}
        encode, add = self.codec.encode, self.sender.add
        for output in outputs:
            topic = topic_name(self.settings, output.topic_key)
            try:
                data = encode(output.record_name, output.value, topic=topic)
            except (CodecError, KeyError) as exc:
                # A processor produced a record that does not fit its schema: keep it, with why.
                self._dead_letter_output(output, topic, exc)
                continue
            carried = headers if headers is not None and traced and output.cause_offset in traced else None
            add(topic, output.partition, output.key.encode(), data, output, carried)
            counts[output.topic_key] = counts.get(output.topic_key, 0) + 1
        for key, count in counts.items():
            self.metrics.outputs.labels(key).inc(count)

    def _dead_letter(self, message: Any, reason: str, kind: str, route: _Route) -> None:
        """Dead-letter a consumed record (an aiokafka ConsumerRecord)."""
        record = {
            "time": int(self.clock() * 1000),
            "stage": "stream",
            "origin_topic": message.topic,
            "origin_partition": message.partition,
            "origin_offset": message.offset,
            "key": message.key,
            "value": message.value,
            "reason": reason,
            "error_type": kind,
            "source": "stream",
        }
        self._send_dead_letter(record, message.topic)
        self.metrics.dead_letters.labels(route.spec.key, kind).inc()

    def _dead_letter_output(self, output: Output, topic: str, exc: Exception) -> None:
        record = {
            "time": int(self.clock() * 1000),
            "stage": "stream",
            "origin_topic": topic,
            "origin_partition": None,
            "origin_offset": None,
            "key": output.key.encode(),
            "value": json.dumps(output.value, default=str).encode(),
            "reason": f"output does not fit {output.record_name}: {exc}",
            "error_type": type(exc).__name__,
            "source": "stream",
        }
        self._send_dead_letter(record, topic)
        self.metrics.dead_letters.labels(output.topic_key, type(exc).__name__).inc()

    def _send_dead_letter(self, record: dict[str, Any], origin: str, tag: Any = None) -> None:
        topic = topic_name(self.settings, "deadletter")
        self.sender.add(
            topic,
            None,
            origin.encode(),
            self.codec.encode(DEADLETTER_RECORD, record, topic=topic),
            record if tag is None else tag,
        )

    def _refused(self, refused: Refused) -> None:
        """A record the broker refused for good: an output is dead-lettered with the reason, a dead letter
        sent again with its value truncated; anything else raises :class:`DeliveryRefused`."""
        tag, error = refused.tag, refused.error
        where = f"{refused.topic}[{refused.partition}]"
        if isinstance(tag, Output):
            value = refused.value or b""
            record = {
                "time": int(self.clock() * 1000),
                "stage": "stream",
                "origin_topic": refused.topic,
                "origin_partition": refused.partition,
                "origin_offset": None,
                "key": refused.key,
                "value": value,
                "reason": f"the broker refused the {tag.record_name} output to {where} for good: {error}",
                "error_type": type(error).__name__,
                "source": "stream",
            }
            log.warning(
                "output refused by the broker, dead-lettered",
                extra={"topic": refused.topic, "error": repr(error), "bytes": len(value)},
            )
            if len(value) > DEAD_LETTER_VALUE_MAX:
                record = _truncated(record, "the output did not fit its topic")
            self._send_dead_letter(record, refused.topic)
            self.metrics.dead_letters.labels(tag.topic_key, type(error).__name__).inc()
            return
        if isinstance(tag, dict) and len(tag.get("value") or b"") > DEAD_LETTER_VALUE_MAX:
            log.warning(
                "dead letter refused by the broker, sent again truncated", extra={"error": repr(error)}
            )
            record = _truncated(tag, f"the whole dead letter did not fit {where}: {error}")
            self._send_dead_letter(record, record["origin_topic"], _Truncated(record))
            return
        what = "a dead letter" if isinstance(tag, dict | _Truncated) else "a changelog write"
        raise DeliveryRefused(
            f"the broker refused {what} to {where} for good ({error!r}); the batch is not acknowledged"
        )


def _truncated(record: dict[str, Any], why: str) -> dict[str, Any]:
    """The dead letter with its value cut to :data:`DEAD_LETTER_VALUE_MAX` bytes, the reason saying so."""
    value = record["value"] or b""
    cut = f"value truncated from {len(value)} to {DEAD_LETTER_VALUE_MAX} bytes ({why})"
    return {**record, "value": value[:DEAD_LETTER_VALUE_MAX], "reason": f"{record['reason']}; {cut}"}


def _progress_offset(progress: Mapping[str, Any] | None) -> int | None:
    """The offset of the last record a partition's restored state has processed (None before its first
    batch), from its progress record, whichever name the offset was written under."""
    return None if progress is None else offset_of(progress)


def _partition_of(key: str) -> int:
    """The partition a table key belongs to: ``3|...`` or ``3#progress``."""
    end = min((i for i in (key.find("|"), key.find("#")) if i >= 0), default=len(key))
    return int(key[:end])


def _store_url(options: StreamsSettings) -> str:
    if options.store:
        return options.store
    return "rocksdb://" if importlib.util.find_spec("rocksdict") else "memory://"


def _credentials(settings: Settings) -> Any:
    """Faust's credentials object for the broker settings (TLS and SASL, P2); None for plaintext."""
    config = aiokafka_config(settings)
    protocol = config["security_protocol"]
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=config.get("sasl_plain_username"),
            password=config.get("sasl_plain_password"),
            ssl_context=config.get("ssl_context"),
            mechanism=config.get("sasl_mechanism", "PLAIN"),
        )
    if protocol == "SSL":
        return config["ssl_context"]
    return None


def create_app(
    settings: Settings,
    processors: Sequence[Processor],
    *,
    options: StreamsSettings | None = None,
    registry: CollectorRegistry | None = None,
    codec: Codec | None = None,
    tracing: Tracing = OFF,
) -> StreamsApp:
    """The Faust app running ``processors``; start it with ``streams.runtime.transport.StreamsWorker(app)``
    (streams/main.py does). Needs the broker: creates the app's internal topics (table changelogs, the
    leader assignor's topic) and waits for its consumer group's coordinator. ``options``: the worker's
    :class:`streams.settings.StreamsSettings`; without them, their defaults (the environment is read
    where the process starts, streams/main.py, not here). ``tracing``: bus/tracing.py (off by default)."""
    from streams.runtime.settings import StreamsSettings

    options = options or StreamsSettings.from_environ({})
    if not processors:
        raise ValueError("the stream app needs at least one processor")
    datadir = settings.state_dir / "streams" / options.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    brokers = [f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",") if host.strip()]
    app = StreamsApp(
        options.app_id,
        broker=brokers,
        broker_credentials=_credentials(settings),
        store=_store_url(options),
        datadir=str(datadir),
        autodiscover=False,
        web_enabled=options.web_port is not None,
        web_port=options.web_port or 6066,
        topic_replication_factor=settings.topic_replication,
        table_standby_replicas=0,
        broker_max_poll_records=options.batch_max,
        broker_commit_interval=options.commit_interval_s,
        broker_session_timeout=options.session_timeout_s,
        consumer_auto_offset_reset="earliest",
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        consumer_max_fetch_size=4 * 1024 * 1024,
    )
    metrics = StreamMetrics(registry if registry is not None else CollectorRegistry())
    dispatcher = Dispatcher(
        app, settings, processors, codec or Codec.from_settings(settings), metrics, options, tracing=tracing
    )
    app.batch_topics = frozenset(dispatcher.routes)
    app.batch_handler = dispatcher.handle
    app.dispatcher = dispatcher  # type: ignore[attr-defined]
    for route in dispatcher.routes.values():
        # Subscribed as raw bytes; the dispatcher decodes.
        app.topics.add(app.topic(route.name, key_serializer="raw", value_serializer="raw"))
    # Faust would create these one by one as it starts, racing its own consumer's metadata (a changelog
    # "not found in cluster metadata", a table's changelog left out of the assignment); on a new cluster
    # the group's coordinator is not there until the broker has made its offsets topic.
    create_topics(settings, internal_topics(app))
    wait_for_group_coordinator(settings, options.app_id)

    @app.on_partitions_revoked.connect
    async def _on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        dispatcher.on_revocation()

    @app.on_partitions_assigned.connect
    async def _on_assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
        dispatcher.on_assignment(assigned)

    return app
