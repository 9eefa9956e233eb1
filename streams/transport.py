"""Faust plumbing of the stream app: a consumer that hands records over one fetched batch at a time, and a
sender that hands records to the producer one batch per topic partition.

faust-streaming 0.15 moves every record through its conductor, a channel queue and a stream iterator, with
several asyncio tasks per record, and every produced record through a buffer task that awaits one send per
record. On this project's bench those two paths alone, without any processing, reach about 15 % of a plain
consumer's rate. :class:`BatchConsumer` keeps Faust's consumer, rebalancing, offset bookkeeping, commits,
tables and recovery, and replaces only the per-record dispatch of the topics it is told about (mirroring
``Consumer._drain_messages``); :class:`Sender` appends records to aiokafka record batches directly.

At-least-once, step by step, for one fetched batch (see ``streams.app.Dispatcher.handle``):
1. the batch is registered as in flight, so a rebalance or a stop waits for it (``Consumer.wait_empty``);
2. the processors run; their state writes go to the table store and, as changelog records, to the sender;
3. the sender hands every record (changelogs, outputs, dead letters) to the aiokafka producer;
4. the offsets are acknowledged and the batch leaves the in-flight set;
5. Faust's commit flushes the producer, then commits the acknowledged offsets.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

__all__ = ["BatchConsumer", "InFlight", "Sender", "StreamsApp", "StreamsWorker"]

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
        await super().on_partitions_revoked(revoked)

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
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise


class _BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class StreamsApp(faust.App):
    """A Faust app whose consumer hands ``batch_topics`` to ``batch_handler`` in batches."""

    batch_topics: frozenset[str] = frozenset()
    batch_handler: BatchHandler

    def _new_transport(self) -> Any:
        return _BatchTransport(self.conf.broker_consumer, self)


class StreamsWorker(faust.Worker):
    """Faust's worker without its terminal spinner, which would set the root logger to DEBUG (and so
    build a log record for every produced message) whenever the log level is WARN or above."""

    def on_setup_root_logger(self, logger: Any, level: int) -> None:
        self.spinner = None


class Sender:
    """Collects the records of one fetched batch and hands them to the aiokafka producer as one record
    batch per topic partition. Records without a partition go to ``crc32(key) % partitions``, librdkafka's
    ``consistent`` partitioner, which the project's confluent-kafka producers use too."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._records: dict[tuple[str, int | None], list[tuple[bytes | None, bytes | None]]] = {}
        self._partitions: dict[str, int] = {}

    def add(self, topic: str, partition: int | None, key: bytes | None, value: bytes | None) -> None:
        records = self._records.get((topic, partition))
        if records is None:
            records = self._records[(topic, partition)] = []
        records.append((key, value))

    def __len__(self) -> int:
        return sum(len(records) for records in self._records.values())

    async def flush(self) -> None:
        """Hand every collected record to the producer, in the order added per topic partition."""
        if not self._records:
            return
        producer = self._app.producer._ensure_producer()  # type: ignore[attr-defined]
        collected, self._records = self._records, {}
        by_tp: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
        for (topic, partition), records in collected.items():
            if partition is not None:
                by_tp.setdefault((topic, partition), []).extend(records)
                continue
            count = self._partitions.get(topic)
            if count is None:
                count = self._partitions[topic] = len(await producer.partitions_for(topic))
            for key, value in records:
                target = zlib.crc32(key or b"") % count
                by_tp.setdefault((topic, target), []).append((key, value))
        for (topic, partition), records in by_tp.items():
            batch = producer.create_batch()
            for key, value in records:
                if batch.append(timestamp=None, key=key, value=value) is None:
                    # Full: submit it; a fresh batch takes any one record, however large.
                    await producer.send_batch(batch, topic, partition=partition)
                    batch = producer.create_batch()
                    batch.append(timestamp=None, key=key, value=value)
            await producer.send_batch(batch, topic, partition=partition)
