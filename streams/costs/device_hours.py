"""Device-hours and energy per whole GPU and hour, from ``gpu.samples``, forwarded to
``streams.device-hours`` where the IdleHoursProcessor (streams/costs/idle_hours.py) sets them against the
allocated hours and prices the energy. How energy is counted: streams/costs/energy.py."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from datetime import timedelta
from typing import Any

from streams.costs.common import (
    COST_RECORD,
    DEVICE_HOURS,
    DEVICE_SOURCE_PREFIX,
    MS,
    cost_record,
    hour_crossed,
    since_committed,
    span,
    split_by_hour,
)
from streams.costs.energy import J_PER_KWH, energy_by_hour, reading
from streams.runtime.buckets import HOUR_MS, bucket_start, from_ms, iso, to_ms
from streams.runtime.processor import Input, Output, PartitionBatch, Result
from streams.runtime.state import OFFSET, BatchState, copy_entry


class DeviceHoursProcessor:
    """Reads ``gpu.samples``; per whole GPU an entry ``dev|<gpu_uuid>`` with its last sample time, its
    seconds present per hour, its last energy reading and its joules per hour. Publishes each changed
    (gpu_uuid, hour) to ``streams.device-hours``: device_hours, and energy_kwh (null while no reading of
    the GPU told the hour's energy).

    The clock is the partition's watermark as it stands at each record, in offset order (not at the end
    of the batch: one batch of a backfill can span days). Hours more than ``retention`` behind it are
    complete and dropped; a sample that old (out of order on its own partition) goes to ``Result.late``.

    Coalescing (``emit_interval``): a GPU's changed hours are published at most once per ``emit_interval``
    of its own event time, as the rollups' non-final upserts are; until then the entry lists them under
    ``unsent``. Without it a live fleet, whose batches hold about one sample per GPU, sent one record per
    sample here and one more downstream (IdleHoursProcessor's GpuEnergy), each a database upsert, for a
    figure that only says "a few more seconds". Held-back hours still go out: at once when the GPU's
    samples reach a later hour (the hour it left is complete), and, for a GPU that stopped sending, when
    the partition's watermark crosses an hour. So each published figure is the hour's current value, at
    most ``emit_interval`` of event time old while the GPU reports. 0 publishes every batch's changes."""

    topics = ("gpu.samples",)

    def __init__(
        self,
        *,
        name: str = "costs_device_hours",
        max_gap: timedelta = timedelta(seconds=60),
        retention: timedelta = timedelta(hours=48),
        emit_interval: timedelta = timedelta(0),
    ) -> None:
        if max_gap <= timedelta(0):
            raise ValueError(f"max_gap must be positive, got {max_gap}")
        if retention <= timedelta(0):
            raise ValueError(f"retention must be positive, got {retention}")
        self.name = name
        self._max_gap_ms = max_gap // MS
        self._retention_ms = retention // MS
        if emit_interval < timedelta(0):
            raise ValueError(f"emit_interval must not be negative, got {emit_interval}")
        self._emit_ms = emit_interval // MS

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        e = BatchState(state, load=copy_entry)
        retention = self._retention_ms
        mark = None if batch.previous_watermark is None else to_ms(batch.previous_watermark)
        result = Result()
        changed: dict[str, tuple[dict[str, Any], set[int]]] = {}
        if batch.resumed:  # publish again what may not have been published before a crash
            for key in list(state.keys()):
                device = e.get(key)
                if device is not None and since_committed(device, batch.committed_offset):
                    labels = {*device["hours"], *device.get("energy", {})}
                    self._publish(device, {int(label) for label in labels}, result.outputs)
        devices: dict[str, dict[str, Any]] = {}  # each entry the batch touches, read once
        gap = self._max_gap_ms
        for row, offset, t, mig_instance, uuid, model, energy_j, power_w in _gpu_samples(batch):
            if mark is None or t > mark:
                mark = t
            if mig_instance is not None:
                continue  # counted through its physical GPU
            key = f"dev|{uuid}"
            device = devices.get(key)
            if device is None:
                device = devices[key] = e.get(key) or {
                    "gpu_uuid": uuid,
                    "last_ms": None,
                    "hours": {},
                    OFFSET: -1,
                }
            if offset <= device[OFFSET]:
                continue
            horizon = bucket_start("hour", mark - retention)
            if t < horizon:
                result.late.append((_input(batch, row), self._late_reason(t, mark)))
                continue
            last = device["last_ms"]
            if last is not None and t > last:
                hours = device["hours"]
                for hour, overlap in split_by_hour(max(last, horizon), min(t, last + gap)):
                    label = str(hour)
                    hours[label] = hours.get(label, 0) + overlap
                    if key not in changed:
                        changed[key] = (device, set())
                    changed[key][1].add(hour)
            if last is None or t > last:
                device["last_ms"] = t
            now = reading(t, energy_j, power_w)
            before = device.get("energy_last")
            if now is not None and (before is None or t > before[0]):
                if before is not None:
                    energy = device.setdefault("energy", {})
                    for hour, joules in energy_by_hour(before, now, gap):
                        if hour < horizon:
                            continue  # complete and published already
                        label = str(hour)
                        energy[label] = energy.get(label, 0.0) + joules
                        if key not in changed:
                            changed[key] = (device, set())
                        changed[key][1].add(hour)
                device["energy_last"] = now
            device["gpu_model"], device[OFFSET] = model, offset
        for device, hours in changed.values():
            unsent = set(device.get("unsent", ())) | hours
            if self._due(device, unsent):
                self._publish(device, unsent, result.outputs)
                device["unsent"], device["sent_ms"] = [], device["last_ms"]
            else:
                device["unsent"] = sorted(unsent)
        horizon = bucket_start("hour", (to_ms(batch.watermark) if mark is None else mark) - retention)
        for key, device in devices.items():
            # Published above; no later sample reaches back past the horizon, so these are complete.
            device["hours"] = {h: ms for h, ms in device["hours"].items() if int(h) >= horizon}
            if "energy" in device:
                device["energy"] = {h: j for h, j in device["energy"].items() if int(h) >= horizon}
            e.put(key, device)
        if hour_crossed(batch):
            for key in list(state.keys()):
                device = e.get(key)
                if device is None:
                    continue
                if device.get("unsent"):  # a GPU that stopped sending: what it held back, now
                    self._publish(device, set(device["unsent"]), result.outputs)
                    device["unsent"], device["sent_ms"] = [], device["last_ms"]
                    e.put(key, device)
                if (device["last_ms"] or 0) < horizon:
                    e.delete(key)  # not seen for the whole retention
        e.flush()
        return result

    def _due(self, device: dict[str, Any], unsent: set[int]) -> bool:
        """Whether a touched GPU's held-back hours go out now (class doc, coalescing)."""
        sent, last = device.get("sent_ms"), device["last_ms"]
        if self._emit_ms == 0 or sent is None or last is None or last - sent >= self._emit_ms:
            return True
        return min(unsent) < last - last % HOUR_MS  # an hour the GPU has left is complete

    @staticmethod
    def _publish(device: dict[str, Any], hours: set[int], outputs: list[Output]) -> None:
        """The current figures of ``hours`` of one GPU, to ``streams.device-hours``."""
        energy = device.get("energy", {})
        for hour in sorted(hours):
            label = str(hour)
            if label not in device["hours"] and label not in energy:
                continue  # past the horizon, published before it was pruned
            joules = energy.get(label)
            value = cost_record(
                "gpu_hours",
                hour,
                hour + HOUR_MS,
                gpu_model=device["gpu_model"],
                device_hours=device["hours"].get(label, 0) / HOUR_MS,
                energy_kwh=None if joules is None else joules / J_PER_KWH,
                source=DEVICE_SOURCE_PREFIX + device["gpu_uuid"],
            )
            outputs.append(Output(DEVICE_HOURS, device["gpu_model"], COST_RECORD, value))

    def _late_reason(self, event_ms: int, mark_ms: int) -> str:
        return (
            f"{self.name}: sample at {iso(event_ms)} is {from_ms(mark_ms) - from_ms(event_ms)} behind the "
            f"partition watermark {iso(mark_ms)}, beyond the {span(self._retention_ms)} retention "
            f"(AIMA_DEVICE_HOURS_RETENTION_S)"
        )


def _gpu_samples(
    batch: PartitionBatch,
) -> Iterator[tuple[int, int, int, str | None, str, str, float | None, float | None]]:
    """(row, offset, event ms, mig_instance, gpu_uuid, gpu_model, energy_joules, power_watts) of each
    GpuSample of the batch, read from its columns when it has them."""
    columns = batch.columns
    if columns is not None:
        yield from zip(
            range(len(columns)),
            columns.offsets,
            columns.event_ms,
            columns.values("mig_instance"),
            columns.values("gpu_uuid"),
            columns.values("gpu_model"),
            columns.values("energy_joules"),
            columns.values("power_watts"),
            strict=True,
        )
        return
    for row, record in enumerate(batch.inputs):
        value = record.value
        yield (
            row,
            record.offset,
            to_ms(value["time"]),
            value.get("mig_instance"),
            value["gpu_uuid"],
            value["gpu_model"],
            value.get("energy_joules"),
            value.get("power_watts"),
        )


def _input(batch: PartitionBatch, row: int) -> Input:
    columns = batch.columns
    return batch.inputs[row] if columns is None else columns.input(batch.topic_key, batch.partition, row)
