"""What the cost processors share: their record names and topics, the CostRecord they publish, the hour
split of a job's GPU time, and the batch plumbing (the state view, the cue for a prune pass, a batch cut
where the watermark enters a new hour).

Times are integer milliseconds since the epoch, converted with :func:`streams.runtime.buckets.to_ms` and
:func:`streams.runtime.buckets.from_ms`: a naive datetime is refused with ``ValueError``, never taken for UTC.
Every time a cost processor reads is tz-aware already (the decoder gives tz-aware UTC, and
``Input.event_time`` is so by contract), so a naive one is a caller's bug to surface, not to guess at."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from streams.runtime.buckets import HOUR_MS, bucket_start, from_ms, to_ms
from streams.runtime.processor import Input, PartitionBatch
from streams.runtime.state import OFFSET

COST_RECORD = "aima.metrics.CostRecord"
GPU_ENERGY = "aima.metrics.GpuEnergy"
JOBS_BY_PROJECT = "streams.jobs-by-project"
DEVICE_HOURS = "streams.device-hours"
DEVICE_SOURCE_PREFIX = "stream:device:"
INDEX = "~index"
"""Per partition: running jobs, open months and the watermark so far. '~' sorts it apart from entries."""
MS = timedelta(milliseconds=1)
"""``retention // MS``: a duration in whole milliseconds."""
UPSTREAM_MARK = " via job.events/"
"""Joins a repartitioned JobEvent's ``source`` and the job.events partition it was read from."""
_COST_FIELDS = (
    "project",
    "gpu_model",
    "provider",
    "pricing",
    "job_id",
    "budget",
    "gpu_hours",
    "device_hours",
    "idle_gpu_hours",
    "cost_estimated_eur",
    "job_cost_eur",
    "job_cost_per_media_minute_eur",
    "budget_eur",
    "budget_utilization_percent",
    "forecast_eur",
    "energy_kwh",
    "energy_cost_eur",
)


def hour_label(ms: int) -> str:
    """The hour in the keys of published cost records: ``2026-01-31T23:00Z``."""
    return from_ms(ms).strftime("%Y-%m-%dT%H:00Z")


def span(ms: int) -> str:
    """A limit as people write it: ``48 h``, ``90 s``."""
    return f"{ms / HOUR_MS:g} h" if ms % HOUR_MS == 0 else f"{ms / 1000:g} s"


def split_by_hour(start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """The UTC hours that ``[start_ms, end_ms)`` overlaps, as (hour start, overlap in ms)."""
    hour = start_ms - start_ms % HOUR_MS  # bucket_start("hour", ...), inlined: once per sample and GPU
    if end_ms <= hour + HOUR_MS:  # the common case, within one hour
        return [(hour, end_ms - start_ms)] if end_ms > start_ms else []
    out = []
    while hour < end_ms:
        overlap = min(end_ms, hour + HOUR_MS) - max(start_ms, hour)
        if overlap > 0:
            out.append((hour, overlap))
        hour += HOUR_MS
    return out


def gpu_hours_by_hour(gpu_count: int, start_ms: int, end_ms: int) -> dict[int, float]:
    """GPU-hours per UTC hour of a job holding ``gpu_count`` GPUs over ``[start_ms, end_ms)``."""
    return {hour: gpu_count * overlap / HOUR_MS for hour, overlap in split_by_hour(start_ms, end_ms)}


def cost_record(kind: str, start_ms: int, end_ms: int, **fields: Any) -> dict[str, Any]:
    """A CostRecord of ``kind`` over ``[start_ms, end_ms)``: every figure null unless given."""
    value: dict[str, Any] = {"time": from_ms(start_ms), "period_end": from_ms(end_ms), "kind": kind}
    value.update(dict.fromkeys(_COST_FIELDS))
    value.update(currency="EUR", source="stream")
    value.update(fields)
    return value


def since_committed(entry: Mapping[str, Any], committed: int | None) -> bool:
    """Whether ``entry`` changed while folding a record at or after the committed offset (None: nothing
    committed), so outputs made then may not have been published."""
    offset = entry.get(OFFSET)
    return committed is None or (offset is not None and offset >= committed)


def slot(entry: Mapping[str, Any]) -> str:
    """``gpu_model|provider|pricing`` of a job or hour bucket (empty where unknown)."""
    return f"{entry['gpu_model'] or ''}|{entry['provider'] or ''}|{entry['pricing']}"


def hour_crossed(batch: PartitionBatch) -> bool:
    """Whether the watermark entered a new hour: the cue for a prune pass over the partition's state."""
    previous = batch.previous_watermark
    return previous is None or bucket_start("hour", to_ms(previous)) != bucket_start(
        "hour", to_ms(batch.watermark)
    )


def by_watermark_hour(batch: PartitionBatch) -> Iterator[PartitionBatch]:
    """``batch`` in event-time order, cut where the watermark, advanced record by record, enters a new
    hour: each part is folded with the clock as it stood at its records, so a batch that spans days of a
    backfill keeps what a live stream would (the retention counts from each record's time, not from the
    batch's end). Only the first part is ``resumed``.

    Sorted because the topic is a repartition: it interleaves job.events partitions that were read at
    their own pace (a backlog read at once arrives one upstream partition after the other, days apart).
    The sort is stable, so one job's events, which all come from one upstream partition, keep their order;
    replays are recognised per job by offset, so folding jobs in another order changes nothing else."""
    inputs = sorted(batch.inputs, key=lambda record: record.event_time)
    if not inputs:
        yield batch
        return
    previous = batch.previous_watermark
    mark = None if previous is None else to_ms(previous)
    start = 0
    for position, record in enumerate(inputs):
        t = to_ms(record.event_time)
        if (
            mark is not None
            and position > start
            and t > mark
            and bucket_start("hour", t) != bucket_start("hour", mark)
        ):
            yield _part(batch, inputs[start:position], mark, previous, first=start == 0)
            previous, start = from_ms(mark), position
        mark = t if mark is None else max(mark, t)
    assert mark is not None
    yield _part(batch, inputs[start:], max(mark, to_ms(batch.watermark)), previous, first=start == 0)


def _part(
    batch: PartitionBatch, inputs: list[Input], mark_ms: int, previous: datetime | None, *, first: bool
) -> PartitionBatch:
    return PartitionBatch(
        batch.topic_key,
        batch.partition,
        inputs,
        from_ms(mark_ms),
        previous,
        committed_offset=batch.committed_offset,
        resumed=batch.resumed and first,
    )


def tag_upstream(value: Mapping[str, Any], partition: int) -> dict[str, Any]:
    """The JobEvent as the repartitioner forwards it: its ``source`` also names the ``job.events``
    partition it was read from (``sdk via job.events/2``). ``streams.jobs-by-project`` interleaves those
    partitions at the pace each was read, so the cost clock waits for the slowest of them."""
    return {**value, "source": f"{value['source']}{UPSTREAM_MARK}{partition}"}


def upstream_of(value: Mapping[str, Any]) -> str | None:
    """The ``job.events`` partition a repartitioned JobEvent came from; None for one sent untagged."""
    _, mark, partition = str(value.get("source", "")).rpartition(UPSTREAM_MARK)
    return partition if mark else None


def slowest_upstream(
    progress: dict[str, Any] | None, batch: PartitionBatch, partitions: int, stale_ms: int
) -> tuple[int | None, dict[str, Any] | None]:
    """The clock of a partition that merges ``partitions`` upstream partitions, for the batch's records:
    the oldest of the upstreams' newest event times before them (each upstream's records are in order,
    and a batch can hold days of one upstream, so the clock cannot take its records' times yet). An
    upstream not heard from may still hold anything, so it keeps the clock at 0 (nothing final); one more
    than ``stale_ms`` behind the newest (or, never heard from, that long after the first record) stops
    holding it back: a partition gone quiet.

    ``progress`` is what the last call returned (None at first): ``since``, the first record's time, and
    ``newest`` per upstream (None: not heard from). Returns (clock, progress advanced by the batch); both
    None until a record names its upstream."""
    tagged = [(upstream_of(r.value), to_ms(r.event_time)) for r in batch.inputs]
    tagged = [(upstream, t) for upstream, t in tagged if upstream is not None]
    if progress is None:
        if not tagged:
            return None, None
        since = min(t for _, t in tagged)
        newest: dict[str, int | None] = {str(p): None for p in range(partitions)}
    else:
        since, newest = progress["since"], dict(progress["newest"])
    clock = 0 if any(t is None for t in newest.values()) else min(newest.values(), default=None)
    for upstream, t in tagged:
        seen = newest.get(upstream)
        newest[upstream] = t if seen is None else max(seen, t)
    front = max((t for t in newest.values() if t is not None), default=since)
    kept = {u: t for u, t in newest.items() if (since if t is None else t) >= front - stale_ms}
    return clock, {"since": since, "newest": kept}
