"""Faust plumbing of the stream app: a consumer that hands records over one fetched batch at a time, and a
sender that hands records to the producer one batch per topic partition.

faust-streaming 0.15 moves every record through its conductor, a channel queue and a stream iterator, with
several asyncio tasks per record, and every produced record through a buffer task that awaits one send per
record. On this project's bench those two paths alone, without any processing, reach about 15 % of a plain
consumer's rate. :class:`BatchConsumer` keeps Faust's consumer, rebalancing, offset bookkeeping, commits,
tables and recovery, and replaces only the per-record dispatch of the topics it is told about (mirroring
``Consumer._drain_messages``); :class:`Sender` appends records to aiokafka record batches directly.

At-least-once, step by step, for one fetched batch (see ``streams.runtime.app.Dispatcher.handle``):
1. the batch is registered as in flight, so a rebalance or a stop waits for it (``Consumer.wait_empty``);
2. the processors run; their state writes go to the table store and, as changelog records, to the sender;
3. the sender hands every record (changelogs, outputs, dead letters) to the aiokafka producer and waits
   for the broker's answer to each (:meth:`Sender.flush`; ``Dispatcher._deliver`` dead-letters refused
   outputs and retries deliveries that failed for a passing reason);
4. only then are the offsets acknowledged, and the batch leaves the in-flight set;
5. Faust's commit flushes the producer (nothing of the batch is left there), then commits the offsets.

Stopping, whatever the worker is doing (:class:`StreamsWorker`, :class:`StreamsApp`): every SIGTERM or
SIGINT goes through the process's stop request (bus/runtime.py: it arms the stop bound, and a second one
exits at once) and starts Faust's graceful stop. Each step of that stop which waits on the broker (a commit,
the producer's flush, closing the consumer, closing the producer) gets a share of what the bound leaves, so
a broker that is away or a rebalance under way never holds the exit; what is cut short was not committed,
and the next start processes it again. Faust's own stop could hang for a minute or more when the stop came
during a rebalance: the consumer thread's revocation callback waits on a commit that closing the thread
cancels, the thread dies of that ``CancelledError`` without telling the main thread it is done, and the
main thread waits ``shutdown_timeout`` (60 s) for it; and a fetcher cancelled while ``app.rebalancing``
"restarts on rebalance" by crashing the app (exit 1). :class:`_ConsumerThread` and :class:`_Fetcher`
close those.

While the broker is away, aiokafka retries every ``retry_backoff_ms`` (100 ms) in each of its loops
(metadata, coordinator, fetcher, sender), reconnecting each time. :class:`ConnectBackoff` spaces the
connection attempts to one broker address with bounded exponential delays (librdkafka's
``reconnect.backoff.ms``/``reconnect.backoff.max.ms``, which aiokafka lacks), so those loops wait instead
of spinning; bus/logs.py summarises the errors they still log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import aiokafka.client
import faust
from aiokafka.errors import (
    BrokerResponseError,
    CorruptRecordException,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from faust.events import Event
from faust.streams import _current_event
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ack_lock
from mode import Service as ModeService
from mode.utils.futures import notify
from mode.utils.times import want_seconds

__all__ = [
    "RECORD_REFUSALS",
    "BatchConsumer",
    "ConnectBackoff",
    "DeliveryFailed",
    "InFlight",
    "InternalTopic",
    "Refused",
    "Sender",
    "StreamsApp",
    "StreamsWorker",
    "flow_active",
    "internal_topics",
    "refused_for_good",
    "reset_current_event",
    "set_current_event",
    "still_current",
    "until_flow_stops",
]

log = logging.getLogger(__name__)

BatchHandler = Callable[["BatchConsumer", int, list[tuple[TP, list[Any]]]], Awaitable[None]]
"""(consumer, consumer generation, [(topic partition, aiokafka ConsumerRecords in offset order)])."""


class InFlight:
    """Stands for a batch being processed in Faust's set of unacknowledged messages, so that
    ``Consumer.wait_empty`` (before a rebalance's commit, and at stop) waits until it is done."""

    refcount = 1
    acked = False

    def __repr__(self) -> str:
        return "<batch in flight>"


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer; records of ``StreamsApp.batch_topics`` go to ``StreamsApp.batch_handler``
    one fetch at a time, all others (table changelogs during recovery, agents' topics) through Faust's own
    per-record path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asked: dict[TP, int | None] = {}

    def ack_batch(self, tp: TP, records: list[Any]) -> None:
        """``Consumer.ack`` for a whole batch of one partition, under Faust's lock."""
        with ack_lock:
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            acked = self._acked[tp]
            added = 0
            for record in records:
                offset = record.offset
                if (committed is None or offset >= committed) and offset not in index:
                    index.add(offset)
                    acked.append(offset)
                    added += 1
            self._n_acked += added

    async def committed_offset(self, tp: TP) -> int | None:
        """The partition's committed offset (the next offset a restart would read); None when the group
        has none. Faust forgets these at every rebalance and learns them back when it seeks, which a first
        batch can beat; then the group coordinator is asked, once per partition and assignment."""
        known = self._committed_offset.get(tp)
        if known is not None:
            return known
        if tp not in self._asked:
            thread = self._thread
            try:
                # Bounded: a rebalance starting meanwhile waits for this batch (see InFlight).
                offset = await asyncio.wait_for(
                    thread.call_thread(thread._ensure_consumer().committed, tp), timeout=5.0
                )
            except (TimeoutError, KafkaError) as exc:
                self.log.warning(f"committed offset of {tp} unknown: {exc!r}")
                return None  # unknown: processors re-send what they cannot prove was committed
            self._asked[tp] = offset if offset is not None and offset > 0 else None
        return self._asked[tp]

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._asked.clear()
        if self.app.should_stop:
            # The stop commits what is safe itself; the rebalance's wait and commit would only race it.
            self.log.info("stopping: partitions revoked without a commit of their own")
            return
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        if self.app.should_stop:
            self.log.info("stopping: an assignment that came in meanwhile is left alone")
            return
        await super().on_partitions_assigned(assigned, generation_id)

    # -- stopping ---------------------------------------------------------------------------------------

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Faust's commit; while the app stops, bounded by a share of what the stop bound leaves (with the
        broker away it would wait for the coordinator for ever). Cut short, nothing more is committed: the
        next start reads again from the last committed offsets."""
        if not self.app.should_stop:
            # at-least-once step 5 (Faust's timer, a rebalance): flush the producer, then commit the offsets
            return await super().commit(topics, start_new_transaction=start_new_transaction)
        step_s = _stop_step_s(self.app)
        try:
            return await asyncio.wait_for(
                super().commit(topics, start_new_transaction=start_new_transaction), step_s
            )
        except TimeoutError:
            self.log.warning(f"stopping: commit not done within {step_s:.1f} s; it is left to the next start")
            return False

    async def wait_empty(self) -> None:
        """Faust's wait for the batches in flight (and its commit), bounded while the app stops."""
        if not self.app.should_stop:
            return await super().wait_empty()
        step_s = _stop_step_s(self.app)
        try:
            await asyncio.wait_for(super().wait_empty(), step_s)
        except TimeoutError:
            self.log.warning(f"stopping: batches in flight after {step_s:.1f} s are left unacknowledged")

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def begin_batch(self) -> InFlight:
        token = InFlight()
        self._unacked_messages.add(token)
        return token

    def end_batch(self, token: InFlight) -> None:
        token.acked = True
        self._unacked_messages.discard(token)
        if self._waiting_for_ack is not None:
            notify(self._waiting_for_ack)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - driven by Faust
        """Faust's fetch loop (``Consumer._drain_messages`` with ``Consumer.getmany`` inlined), with the
        records of batch topics kept as aiokafka records and handed over per fetch, grouped by partition."""
        app: StreamsApp = self.app  # type: ignore[assignment]
        handler, batch_topics = app.batch_handler, app.batch_topics
        callback, to_message = self.callback, self._to_message
        read_offsets = self._read_offset
        acks_enabled_for = app.topics.acks_enabled_for
        commit_every = self._commit_every
        consumer_should_stop, fetcher_should_stop = self._stopped.is_set, fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                records, active = await self._wait_next_records(1.0)
                await self.sleep(0)
                if not records or self.should_stop:
                    continue
                if not self.flow_active:
                    # As Faust's getmany: what was fetched while the flow stopped is dropped, and the
                    # partitions seek back to their committed offsets.
                    try:
                        await self.perform_seek()
                    except Exception as exc:
                        self.log.warning(f"exception performing seek when flow not active {exc}")
                    continue
                generation = app.consumer_generation_id
                batches: list[tuple[TP, list[Any]]] = []
                for tp, fetched in records.items():
                    if not fetched:
                        continue
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        continue
                    app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    read = read_offsets[tp]
                    if read is not None and fetched[0].offset < read:
                        fetched = [record for record in fetched if record.offset >= read]
                    if tp.topic in batch_topics:
                        if read and acks_enabled_for(tp.topic):
                            for record in fetched:
                                if record.offset - read > 1:
                                    await self._add_gap(tp, read + 1, record.offset)
                                read = record.offset
                        if fetched:
                            batches.append((tp, fetched))
                            read_offsets[tp] = fetched[-1].offset
                        continue
                    for record in fetched:
                        if app.consumer_generation_id != generation:
                            break
                        read = read_offsets[tp]
                        if read and record.offset - read > 1 and acks_enabled_for(tp.topic):
                            await self._add_gap(tp, read + 1, record.offset)
                        await self.wait_first(callback(to_message(tp, record)), self.suspend_flow.wait())
                        read_offsets[tp] = record.offset
                if batches and app.consumer_generation_id == generation:
                    await handler(self, generation, batches)
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    # at-least-once step 5: Faust's commit flushes the producer, then commits the offsets
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise


def _stop_step_s(app: Any) -> float:
    """What one waiting step of the stop may take (see :meth:`StreamsApp.stop_step_s`)."""
    step = getattr(app, "stop_step_s", None)
    return step() if step is not None else StreamsApp.STEP_MIN_S


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose stop always ends and always says so. Closing the aiokafka consumer
    (its coordinator finishing a rebalance, leaving the group) gets a share of the stop bound; an error
    there, also the ``CancelledError`` of a rebalance callback that the thread's stop cut short, is logged
    instead of ending the thread without telling the main thread, which would then wait
    ``shutdown_timeout`` for it."""

    @property
    def shutdown_timeout(self) -> float:  # type: ignore[override]
        return _stop_step_s(self.app) + 1.0

    async def on_thread_stop(self) -> None:
        step_s = _stop_step_s(self.app)
        try:
            await asyncio.wait_for(super().on_thread_stop(), step_s)
        except TimeoutError:
            self.log.warning(f"stopping: the consumer did not close within {step_s:.1f} s")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self.log.warning("stopping: a rebalance under way was cut short")
        except Exception as exc:
            self.log.warning(f"stopping: closing the consumer failed: {exc!r}")

    async def _shutdown_thread(self) -> None:
        try:
            await super()._shutdown_thread()
        finally:
            self.set_shutdown()


class _Fetcher(faust_consumer.Fetcher):
    """Faust's fetcher, minus its "restart on rebalance": Faust stops the fetcher only when the app (or
    its table manager) stops, and a stop during a rebalance made that path crash the app (exit 1)."""

    @ModeService.task
    async def _fetcher(self) -> None:
        try:
            await self.app.consumer._drain_messages(self)
        except asyncio.CancelledError:
            self.log.info("fetcher stopped")
        finally:
            self.set_shutdown()


class _Producer(faust_aiokafka.Producer):
    """Faust's aiokafka producer, whose stop (which waits for every buffered record to be delivered)
    gets a share of the stop bound: with the broker away it would wait out the request timeout."""

    async def on_stop(self) -> None:
        step_s = _stop_step_s(self.app)
        try:
            await asyncio.wait_for(super().on_stop(), step_s)
        except TimeoutError:
            self.log.warning(
                f"stopping: records not delivered within {step_s:.1f} s are dropped; their input offsets "
                "were not committed, so the next start produces them again"
            )


class _BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer
    Producer = _Producer
    Fetcher = _Fetcher


class StreamsApp(faust.App):
    """A Faust app whose consumer hands ``batch_topics`` to ``batch_handler`` in batches, and whose stop
    fits in the process's stop bound (``stop_time_left_s``, which :class:`StreamsWorker` sets)."""

    batch_topics: frozenset[str] = frozenset()
    batch_handler: BatchHandler
    stop_time_left_s: Callable[[], float] = staticmethod(lambda: 28.0)
    """Seconds the process may still spend stopping (``bus.runtime.Service.time_left_s``)."""

    STEP_SHARE = 1 / 3
    """Of what the bound leaves, what one waiting step of the stop may take: the steps that follow
    (commit, flush, closing the consumer, closing the producer) keep time of their own."""
    STEP_MIN_S = 0.5

    def _new_transport(self) -> Any:
        ConnectBackoff.install()
        return _BatchTransport(self.conf.broker_consumer, self)

    def stop_step_s(self) -> float:
        return max(self.STEP_MIN_S, self.stop_time_left_s() * self.STEP_SHARE)

    async def _producer_flush(self, logger: Any) -> None:
        if not self.should_stop:
            return await super()._producer_flush(logger)
        step_s = self.stop_step_s()
        try:
            await asyncio.wait_for(super()._producer_flush(logger), step_s)
        except TimeoutError:
            self.log.warning(f"stopping: producer not flushed within {step_s:.1f} s")


class StreamsWorker(faust.Worker):
    """Faust's worker, whose SIGTERM and SIGINT go through ``request_stop`` (the process's stop bound:
    bus/runtime.py ``Service.request_stop``, which exits at once on a second request) before Faust's
    graceful stop starts; a stop requested before Faust took the signals over (``stop_requested``) starts
    it as soon as it has. Also without Faust's terminal spinner, which would set the root logger to DEBUG
    (and so build a log record for every produced message) whenever the log level is WARN or above."""

    def __init__(
        self,
        app: StreamsApp,
        *args: Any,
        request_stop: Callable[[str], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        time_left_s: Callable[[], float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, *args, **kwargs)
        self._request_stop = request_stop
        self._stop_requested = stop_requested
        if time_left_s is not None:
            app.stop_time_left_s = time_left_s

    def on_setup_root_logger(self, logger: Any, level: int) -> None:
        self.spinner = None

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._on_stop_signal, signum)
        if self._stop_requested is not None and self._stop_requested():
            self._schedule_shutdown(signal.SIGTERM)

    def _on_stop_signal(self, signum: int) -> None:
        if self._request_stop is not None:
            self._request_stop(signal.Signals(signum).name)  # a second request ends the process here
        self._schedule_shutdown(signal.Signals(signum))


class ConnectBackoff:
    """Bounded exponential back-off between connection attempts to one broker address, for every
    aiokafka client of the process: after ``n`` failed attempts in a row the next waits
    ``min(max_s, initial_s * 2 ** (n - 1))`` (jittered by a fifth); a success resets it. aiokafka retries
    a failed request after a fixed ``retry_backoff_ms`` and reconnects for it, in each of its loops, so
    with the broker away those loops would spin; gated here, they wait. :meth:`install` wraps the
    connection factory aiokafka's client uses (once per process)."""

    INITIAL_S = 0.2
    MAX_S = 10.0
    _installed: ConnectBackoff | None = None
    _install_lock = threading.Lock()

    def __init__(
        self,
        initial_s: float = INITIAL_S,
        max_s: float = MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial_s, self.max_s, self.clock = initial_s, max_s, clock
        self._failures: dict[tuple[str, int], int] = {}
        self._not_before: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()  # the consumer's thread and the main loop share it

    def delay_s(self, host: str, port: int) -> float:
        """How long the next attempt to ``host:port`` waits."""
        with self._lock:
            return max(0.0, self._not_before.get((host, port), 0.0) - self.clock())

    def failed(self, host: str, port: int) -> float:
        with self._lock:
            failures = self._failures[(host, port)] = self._failures.get((host, port), 0) + 1
            delay = min(self.max_s, self.initial_s * 2 ** min(failures - 1, 30))
            delay *= random.uniform(0.8, 1.0)
            self._not_before[(host, port)] = self.clock() + delay
            return delay

    def succeeded(self, host: str, port: int) -> None:
        with self._lock:
            self._failures.pop((host, port), None)
            self._not_before.pop((host, port), None)

    def wrap(self, create: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def create_conn(host: str, port: int, **kwargs: Any) -> Any:
            while (wait := self.delay_s(host, port)) > 0:
                await asyncio.sleep(wait)
            try:
                conn = await create(host, port, **kwargs)
            except (OSError, TimeoutError, KafkaError):
                self.failed(host, port)
                raise
            self.succeeded(host, port)
            return conn

        create_conn.__wrapped__ = create  # type: ignore[attr-defined]
        return create_conn

    @classmethod
    def install(cls) -> ConnectBackoff:
        with cls._install_lock:
            if cls._installed is None:
                backoff = cls()
                aiokafka.client.create_conn = backoff.wrap(aiokafka.client.create_conn)
                cls._installed = backoff
            return cls._installed


class Refused(NamedTuple):
    """A record the broker refused for good (too large for the topic, invalid): sending it again cannot
    succeed. ``tag`` is what the caller passed to :meth:`Sender.add` with it."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    tag: Any
    error: KafkaError


class DeliveryFailed(Exception):
    """Records not delivered for a reason that may pass (retries used up, broker away, leader moving, not
    authorised): the batch they belong to must not be acknowledged. The :class:`Sender` keeps them, so a
    later :meth:`Sender.flush` tries them again; :meth:`Sender.discard` drops them."""

    def __init__(self, errors: list[tuple[str, int, BaseException]]) -> None:
        self.errors = errors
        topic, partition, first = errors[0]
        more = f" (and {len(errors) - 1} more partitions)" if len(errors) > 1 else ""
        super().__init__(f"records to {topic}[{partition}] not delivered: {first!r}{more}")


RECORD_REFUSALS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
)
"""Broker errors about the record itself: the same record is refused again however often it is sent."""
_INVALID_RECORD = 87  # INVALID_RECORD (e.g. no key on a compacted topic); aiokafka has no class for it


def refused_for_good(error: BaseException) -> bool:
    """Whether the broker refused a record for what it is (resending cannot help), as opposed to a
    delivery that failed for a passing reason."""
    if isinstance(error, RECORD_REFUSALS):
        return True
    return isinstance(error, BrokerResponseError) and getattr(error, "errno", None) == _INVALID_RECORD


_Entry = tuple[bytes | None, bytes | None, Any, list[tuple[str, bytes]] | None]
"""(key, value, tag, headers): the headers carry a trace context (bus/tracing.py), or are None."""


class Sender:
    """Collects the records of one fetched batch, hands them to the aiokafka producer as record batches per
    topic partition, and waits until the broker has every one (:meth:`flush`), so that offsets are
    acknowledged only after their outputs are durable, whatever Faust's commit does. Records without a
    partition go to ``crc32(key) % partitions``, librdkafka's ``consistent`` partitioner, which the
    project's confluent-kafka producers use too. Each partition gets its records in the order they were
    added, whether they named the partition or were routed by key (a processor's progress record sent to
    every partition must not overtake the keyed records before it).

    A record batch the broker refuses as too large is sent again one record per batch, so that only the
    records too large themselves are refused; the records after it on that partition are sent again too
    (the later copy of a key stays the last one, which upserting readers and compacted changelogs need;
    at-least-once allows the duplicates)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._records: dict[str, list[tuple[int | None, _Entry]]] = {}
        """Per topic, in the order added: (the partition named, or None to route by key; the record)."""
        self._partitions: dict[str, int] = {}

    def add(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        tag: Any = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Collect one record; ``tag`` comes back with it if the broker refuses it (:class:`Refused`)."""
        records = self._records.get(topic)
        if records is None:
            records = self._records[topic] = []
        records.append((partition, (key, value, tag, headers)))

    def __len__(self) -> int:
        return sum(len(records) for records in self._records.values())

    def discard(self) -> int:
        """Drop every collected record (a batch left unacknowledged is processed again); how many."""
        count, self._records = len(self), {}
        return count

    async def flush(self) -> list[Refused]:
        """Hand every collected record to the producer, in the order added per topic partition, and wait
        for the broker's answer to each. Returns the records refused for good (:func:`refused_for_good`);
        raises :class:`DeliveryFailed` when any record was not delivered for another reason, keeping those
        records (from the first undelivered one on, per partition) for the next flush."""
        if not self._records:
            return []
        producer = self._app.producer._ensure_producer()  # type: ignore[attr-defined]
        collected, self._records = self._records, {}
        by_tp: dict[tuple[str, int], list[_Entry]] = {}
        for topic, records in collected.items():
            count: int | None = None
            last: int | None = None
            into: list[_Entry] = []
            for partition, entry in records:
                if partition is None:
                    if count is None:
                        count = self._partitions.get(topic)
                        if count is None:
                            count = self._partitions[topic] = len(await producer.partitions_for(topic))
                    partition = zlib.crc32(entry[0] or b"") % count
                if partition != last:
                    into, last = by_tp.setdefault((topic, partition), []), partition
                into.append(entry)
        outcomes = await asyncio.gather(
            *(
                self._deliver(producer, topic, partition, records)
                for (topic, partition), records in by_tp.items()
            )
        )
        refused: list[Refused] = []
        failed: list[tuple[str, int, BaseException]] = []
        for (topic, partition), (gone, left, error) in zip(by_tp, outcomes, strict=True):
            refused.extend(gone)
            if error is not None:
                failed.append((topic, partition, error))
                self._records.setdefault(topic, []).extend((partition, entry) for entry in left)
        if failed:
            raise DeliveryFailed(failed)
        return refused

    async def _deliver(
        self, producer: Any, topic: str, partition: int, records: list[_Entry]
    ) -> tuple[list[Refused], list[_Entry], BaseException | None]:
        """One partition's records: (refused for good, not delivered, why not) once the broker answered
        for all of them."""
        refused: list[Refused] = []
        pending, singles = records, 0
        while pending:
            chunks = _chunks(producer, pending, singles)
            futures = []
            try:
                for batch, _ in chunks:
                    future = await producer.send_batch(batch, topic, partition=partition)
                    future.add_done_callback(_retrieve)  # an abandoned wait must not leave it unread
                    futures.append(future)
            except KafkaError as exc:  # not even queued (no metadata, queue full for the whole timeout)
                await asyncio.gather(*futures, return_exceptions=True)
                return refused, pending, exc
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed_at = next((i for i, r in enumerate(results) if isinstance(r, BaseException)), None)
            if failed_at is None:
                return refused, [], None
            error = results[failed_at]
            start = sum(len(entries) for _, entries in chunks[:failed_at])
            entries = chunks[failed_at][1]
            if not refused_for_good(error):
                return refused, pending[start:], error
            if len(entries) > 1:
                pending, singles = pending[start:], len(entries)  # again, one record per batch
                continue
            for key, value, tag, _ in entries:
                refused.append(Refused(topic, partition, key, value, tag, error))
            pending, singles = pending[start + len(entries) :], max(0, singles - start - len(entries))
        return refused, [], None


_NO_HEADERS: list[tuple[str, bytes]] = []
"""aiokafka's record builder takes a list (only a list) and only reads it: one shared empty one."""


def _chunks(producer: Any, records: list[_Entry], singles: int) -> list[tuple[Any, list[_Entry]]]:
    """Record batches for ``records`` in order: the first ``singles`` alone in one each, the rest as full
    as the producer's batch size allows (a fresh batch takes any one record, however large)."""
    chunks: list[tuple[Any, list[_Entry]]] = []
    batch, entries = producer.create_batch(), []
    for position, entry in enumerate(records):
        key, value, _, headers = entry
        headers = headers or _NO_HEADERS
        alone = position < singles
        if entries and (alone or batch.append(timestamp=None, key=key, value=value, headers=headers) is None):
            chunks.append((batch, entries))
            batch, entries = producer.create_batch(), []
            batch.append(timestamp=None, key=key, value=value, headers=headers)
        elif not entries:
            batch.append(timestamp=None, key=key, value=value, headers=headers)
        entries.append(entry)
        if alone:
            chunks.append((batch, entries))
            batch, entries = producer.create_batch(), []
    if entries:
        chunks.append((batch, entries))
    return chunks


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# -- what streams/runtime/app.py needs of Faust's internals, kept here (tests/unit/test_faust_coupling.py) --


def still_current(app: faust.App, generation: int) -> bool:
    """Whether a batch fetched in consumer ``generation`` is still this worker's to finish: no rebalance
    since, and the flow not stopped (a rebalance and a stop begin by stopping it)."""
    return app.consumer_generation_id == generation and app.flow_control.is_active()


def flow_active(app: faust.App) -> bool:
    """False once a rebalance or a stop has begun (until a rebalance ends)."""
    return app.flow_control.is_active()


async def until_flow_stops(app: faust.App) -> None:
    """Returns once the consumer's flow stops: a rebalance or a stop has begun."""
    await app.consumer.suspend_flow.wait()


def set_current_event(app: faust.App, tp: TP, record: Any) -> Any:
    """Make ``record`` (an aiokafka ConsumerRecord of ``tp``) Faust's *current event*, the event any Faust
    table write takes its changelog partition from; returns the token for :func:`reset_current_event`."""
    message = app.consumer._to_message(tp, record)
    event = Event(app, message.key, message.value, message.headers, message)
    return _current_event.set(weakref.ref(event))


def reset_current_event(token: Any) -> None:
    _current_event.reset(token)


class InternalTopic(NamedTuple):
    name: str
    partitions: int
    config: dict[str, str]


def internal_topics(app: faust.App) -> list[InternalTopic]:
    """The topics Faust creates by itself as the app starts (the leader assignor's, each table's
    changelog), with the partitions and config Faust gives them: created beforehand and awaited until the
    broker's metadata shows them, Faust finds them there instead of creating them one by one while its
    consumer subscribes, which raced the broker's metadata (a changelog "not found in cluster metadata",
    and the assignor leaving a table's changelog out of the assignment)."""
    topics = [app._leader_assignor._leader_topic]  # type: ignore[attr-defined]
    topics += [table.changelog_topic for table in app.tables.values()]
    found = []
    for topic in topics:
        config: dict[str, str] = {}
        policy = [name for name, on in (("compact", topic.compacting), ("delete", topic.deleting)) if on]
        if policy:
            config["cleanup.policy"] = ",".join(sorted(policy))
        if topic.retention:
            config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000))
        config.update({key: str(value) for key, value in (topic.config or {}).items()})
        partitions = topic.partitions or app.conf.topic_partitions
        found.extend(InternalTopic(name, partitions, config) for name in topic.topics)
    return found
