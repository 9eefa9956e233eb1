"""Test support: the same simulated partition batches given to a processor twice, once as per-record
``inputs`` only and once with ``columns`` (streams/runtime/columns.py), so a test can show that the columnar
path gives exactly the state and outputs of the per-record path."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bus.codec import Codec
from bus.frames import _MIN_ROWS, FrameDecoders
from producers.simulator import Fleet, generate
from streams.runtime.buckets import from_ms, to_ms
from streams.runtime.columns import Columns, LazyInputs
from streams.runtime.processor import Input, Output, PartitionBatch, Processor
from streams.runtime.series import topic_of_record

START = datetime(2026, 1, 5, tzinfo=UTC)
SAMPLE_RECORDS = (
    "aima.metrics.GpuSample",
    "aima.metrics.PodStatus",
    "aima.metrics.QueueSample",
    "aima.metrics.SystemSample",
)
"""The sample kinds the simulator writes and the columnar tests walk."""


def simulated_values(
    record_name: str = "aima.metrics.GpuSample",
    *,
    hosts: int = 3,
    gpus_per_host: int = 4,
    duration: timedelta = timedelta(hours=3),
    step_s: float = 10.0,
    seed: int = 7,
) -> list[dict[str, Any]]:
    """The simulator's records of one kind, in the order it writes them."""
    fleet = Fleet(seed=seed, hosts=hosts, gpus_per_host=gpus_per_host, start=START)
    return [
        value
        for _topic, _key, name, value in generate(fleet, START, START + duration, step_s)
        if record_name.endswith(f".{name}") or name == record_name
    ]


@dataclass
class Delivery:
    """One partition batch, as the app would hand it over, with and without columns."""

    rows: PartitionBatch
    columnar: PartitionBatch


def deliveries(
    values: list[dict[str, Any]],
    record_name: str = "aima.metrics.GpuSample",
    *,
    batch_size: int = 250,
    partition: int = 0,
    replay_every: int = 0,
) -> Iterator[Delivery]:
    """``values`` encoded and read back natively, cut into batches of ``batch_size``, each with the
    watermark the app would give it; every ``replay_every``-th batch (when > 0) is followed by a resumed
    re-delivery from the middle of that batch (as after a crash), with that position committed."""
    codec = Codec()
    decoder = FrameDecoders(codec).get(record_name)
    assert decoder is not None, f"bus.frames does not read {record_name}"
    topic_key = topic_of_record(record_name)
    encoded = [codec.encode(record_name, value) for value in values]
    watermark: int | None = None
    plan: list[tuple[int, int, bool]] = []
    starts = list(range(0, len(encoded), batch_size))
    if len(starts) > 1 and len(encoded) - starts[-1] < 2 * _MIN_ROWS:
        starts.pop()  # the short tail joins the batch before it: bus.frames reads batches of _MIN_ROWS up
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(encoded)
        plan.append((start, end, False))
        if replay_every and number % replay_every == replay_every - 1 and end - start >= 4 * _MIN_ROWS:
            plan.append(((start + end) // 2, end, True))
    for start, end, resumed in plan:
        frame = decoder.decode(encoded[start:end])
        assert frame.columns is not None and not frame.rest, "every record must be read natively"
        offsets = list(range(start, end))
        columns = Columns(frame.record_name, frame.columns, offsets)
        records = frame.records()
        inputs = [
            Input(topic_key, partition, offset, frame.record_name, value, value["time"])
            for offset, value in zip(offsets, records, strict=True)
        ]
        newest = max(to_ms(record.event_time) for record in inputs)
        previous = watermark
        watermark = newest if previous is None else max(previous, newest)
        common: dict[str, Any] = {
            "topic_key": topic_key,
            "partition": partition,
            "watermark": from_ms(watermark),
            "previous_watermark": None if previous is None else from_ms(previous),
            "committed_offset": start,
            "resumed": resumed or start == 0,
        }
        yield Delivery(
            PartitionBatch(inputs=inputs, **common),
            PartitionBatch(inputs=LazyInputs(topic_key, partition, columns), columns=columns, **common),
        )


class RecordingState(dict[str, Any]):
    """A processor's state that also logs every write and delete in order (what the changelog gets)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str | None]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.log.append((key, json.dumps(value, sort_keys=True, default=str)))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.log.append((key, None))


@dataclass
class Run:
    outputs: list[Output] = field(default_factory=list)
    late: list[tuple[int, str]] = field(default_factory=list)
    state: RecordingState = field(default_factory=RecordingState)
    built_inputs: int = 0
    """Columnar batches whose per-record dicts were built anyway."""


def run_both(make: Callable[[], Processor], batches: list[Delivery]) -> tuple[Run, Run]:
    """Feed ``batches`` to two fresh processors, one through ``rows`` and one through ``columnar``."""
    runs = (Run(), Run())
    processors = (make(), make())
    for delivery in batches:
        for run, processor, batch in zip(runs, processors, (delivery.rows, delivery.columnar), strict=True):
            state: MutableMapping[str, Any] = run.state
            result = processor.process(batch, state)
            run.outputs.extend(result.outputs)
            run.late.extend((record.offset, reason) for record, reason in result.late)
            if isinstance(batch.inputs, LazyInputs) and batch.inputs.built:
                run.built_inputs += 1
    return runs
