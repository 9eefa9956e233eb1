"""The contract between the Faust app (streams/runtime/app.py) and its processors (rollups, costs, alerts,
anomalies).

The app consumes the topics its processors name, decodes and validates every record (dead-lettering what
fails), groups each batch by topic partition, tracks an event-time watermark per topic partition, and calls
every processor of that topic once per partition batch. A processor is plain Python: it folds the batch
into its state (a mapping backed by a Faust table, written at most once per key per batch) and returns the
records to publish. Results never depend on the wall clock: only event time and the watermark move state
forward.

At-least-once input: after a crash the app re-delivers records since the last committed offset. A
processor makes replays harmless by remembering, in each state entry it writes, the offset of the last
record folded into it (``Input.offset``) and skipping records at or below it.

State is restored from a changelog that holds a prefix of the writes in the order they were made (one
changelog partition per topic partition); the app writes the partition's watermark after the processor's
own writes, so ``previous_watermark`` never runs ahead of the restored state. A processor orders its own
writes so that any prefix is a state it can continue from (e.g. a parent aggregate before the child that
says it was merged): every processor reads and writes its state through ``streams.runtime.state.BatchState``,
whose docstring states the write order and why, and whose ``OFFSET`` names the replay offset field.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from streams.runtime.columns import Columns


@dataclass(frozen=True, slots=True)
class Input:
    """One decoded, validated record."""

    topic_key: str
    """Catalogue key of the topic it came from, e.g. ``gpu.samples``."""
    partition: int
    offset: int
    record_name: str
    """Full Avro name, e.g. ``aima.metrics.GpuSample``."""
    value: dict[str, Any]
    event_time: datetime
    """The record's own time (tz-aware UTC), not the broker's timestamp."""


@dataclass(frozen=True, slots=True)
class Output:
    """A record to publish: encoded and sent by the app, keyed so that one key stays on one partition."""

    topic_key: str
    key: str
    record_name: str
    value: dict[str, Any]
    partition: int | None = None
    """Where to send it instead of the key's partition (a record every partition must see, such as a
    sender's progress in streams/rollups/merge.py). The outputs of one call reach each partition in the
    order they are listed, whichever way each was routed."""
    cause_offset: int | None = None
    """The offset of the input that caused it, where one did (the sample that fired an alert): its trace
    is the one the output continues (bus/tracing.py)."""


@dataclass(frozen=True, slots=True)
class PartitionBatch:
    topic_key: str
    """Catalogue key of the topic every input came from (one batch, one topic partition)."""
    partition: int
    inputs: Sequence[Input]
    """In offset order (per topic)."""
    watermark: datetime
    """Event-time watermark of this partition after this batch: the largest event time seen so far."""
    previous_watermark: datetime | None
    """The watermark before this batch (None on the partition's first batch)."""
    committed_offset: int | None = None
    """Kafka's committed position of this partition: a restart re-delivers from here. Every record before
    it, and every state write and output made while processing those records, is durable. None when
    unknown (nothing committed yet)."""
    resumed: bool = False
    """True on the partition's first batch since this worker was assigned it (start, restart, rebalance):
    state was just restored, inputs may replay records already folded in, and outputs sent before a crash
    may be missing (a processor re-sends what it cannot prove was committed)."""
    columns: Columns | None = None
    """The same records as columns (streams/runtime/columns.py), when every one was read natively; a processor
    may fold these instead of ``inputs`` and must then give the same state and outputs."""

    @property
    def last_offset(self) -> int:
        """Offset of the batch's last record; -1 for an empty batch."""
        if self.columns is not None:
            return self.columns.offsets[-1] if len(self.columns) else -1
        return self.inputs[-1].offset if self.inputs else -1


@dataclass(slots=True)
class Result:
    outputs: list[Output] = field(default_factory=list)
    """Records to publish."""
    late: list[tuple[Input, str]] = field(default_factory=list)
    """Records later than the allowed lateness, with the reason: the app dead-letters and counts them."""


class Processor(Protocol):
    name: str
    """Names its Faust tables: one per consumed topic, so each table's partitions match its topic's."""
    topics: tuple[str, ...]
    """Catalogue keys of the topics it consumes."""

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        """Fold ``batch`` into ``state`` and return what to publish. ``state`` holds this processor's
        entries for this topic partition only; values must be JSON-serialisable (dicts, lists, numbers,
        strings). Write each key at most once per call (``streams.runtime.state.BatchState`` does)."""
        ...
