"""Idle GPU-hours per GPU model and hour (device-hours less allocated GPU-hours) and the energy the
model's GPUs drew with its cost, from ``streams.device-hours``, published to ``costs`` as fleet records;
each GPU's energy and its cost per hour to ``energy``."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any

from streams.costs.common import (
    COST_RECORD,
    DEVICE_HOURS,
    DEVICE_SOURCE_PREFIX,
    GPU_ENERGY,
    INDEX,
    MS,
    cost_record,
    hour_label,
    since_committed,
    span,
)
from streams.costs.pricing import PriceCatalogue, Reloading
from streams.runtime.buckets import HOUR_MS, bucket_start, from_ms, to_ms
from streams.runtime.processor import Output, PartitionBatch, Result
from streams.runtime.state import OFFSET, BatchState, copy_entry

log = logging.getLogger(__name__)


class IdleHoursProcessor:
    """Reads ``streams.device-hours``; per (gpu_model, hour) an entry ``idle|<gpu_model>|<hour>`` with the
    latest device-hours per gpu_uuid and allocated GPU-hours per project/provider/pricing. Publishes to
    ``costs`` a fleet record (project null) with device_hours and idle_gpu_hours = max(device - allocated,
    0) for every changed hour with at least one device seen. gpu_hours stays null in it: the projects'
    records carry the allocation, and a fleet copy would be counted twice by anyone summing gpu_hours.
    energy_kwh is the sum over the devices whose records tell their energy (null when none does), and
    energy_cost_eur that times the catalogue's ``energy_eur_per_kwh`` in force when the hour is (re)computed
    (null without a tariff). Each device whose hour changed gets its own record on ``energy`` too, a
    GpuEnergy (gpu_uuid, hour: device_hours, energy_kwh, energy_cost_eur), priced here so that the tariff
    is applied in one place and the fleet record is the sum of those. A project's share is not made here:
    the costs table's ``energy_costs`` view (consumers/migrations/0020_energy_per_gpu.sql) shares it out,
    each GPU's measured energy to the jobs that named it, the rest by GPU-hours, from these rows, the
    projects' own and the GPUs the job events name, so each row keeps one writer.

    This topic merges senders that each keep their own pace: device records come from every gpu.samples
    partition, allocations from every jobs-by-project partition, and in a backfill the few job events run
    days ahead of the many samples. So the partition's watermark, moved by the fastest sender, says nothing
    about how late another sender is. The clock is the slowest device instead (each device's records come
    in its own event-time order): an hour is dropped once every device still reporting is ``retention``
    past it. A device more than ``stale_after`` behind the newest one (a GPU taken out) stops holding the
    clock back. Nothing is dead-lettered here, the records are the app's own; one for an hour already
    dropped is left out, logged. That happens to a device this processor has not heard of yet while the
    others are more than the retention ahead: a backlog read one gpu.samples partition at a time (a
    fetch takes megabytes from one partition) gets there, which is why the default retention is long
    (45 days, a month-long backfill). State: one entry per (gpu_model, hour) with a figure per device."""

    topics = (DEVICE_HOURS,)

    def __init__(
        self,
        *,
        name: str = "costs_idle_hours",
        retention: timedelta = timedelta(days=45),
        stale_after: timedelta = timedelta(days=7),
        prices: PriceCatalogue | Reloading[PriceCatalogue] | None = None,
    ) -> None:
        if retention <= timedelta(0) or stale_after <= timedelta(0):
            raise ValueError(f"retention and stale_after must be positive, got {retention}, {stale_after}")
        self.name = name
        self._retention_ms = retention // MS
        self._stale_ms = stale_after // MS
        self._prices = prices
        """The energy tariff's source; None: no tariff, energy costs stay null."""
        self._told_no_tariff = False

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        tariff = None if self._prices is None else self._prices.current().energy_eur_per_kwh
        e = BatchState(state, order=("idle|",), load=copy_entry)  # the figures before the clock
        index = e.get(INDEX) or {"devices": {}, "dropped_before": None}
        progress: dict[str, int] = index["devices"]
        """Newest hour seen per device: the clock."""
        dropped = index["dropped_before"]
        result = Result()
        changed: dict[str, dict[str, Any]] = {}
        gpus: dict[str, set[str]] = {}
        """Per changed entry, the devices whose hour changed: their GpuEnergy records."""
        if batch.resumed:  # publish again what may not have been published before a crash
            for key in e.live_keys():
                entry = e.get(key) if key.startswith("idle|") else None
                if entry is not None and since_committed(entry, batch.committed_offset):
                    changed[key] = entry
                    gpus[key] = set(entry["devices"])
        left_out: list[int] = []
        for record in batch.inputs:
            value = record.value
            hour, model = bucket_start("hour", to_ms(value["time"])), value.get("gpu_model")
            if model is None:
                continue
            if value.get("device_hours") is not None:
                side, figure = "devices", value["device_hours"]
                sender = value.get("gpu_uuid") or str(value.get("source", "")).removeprefix(
                    DEVICE_SOURCE_PREFIX
                )
                progress[sender] = max(progress.get(sender, hour), hour)
            elif value.get("gpu_hours") is not None and value.get("project") is not None:
                side, figure = "allocated", value["gpu_hours"]
                sender = f"{value['project']}|{value.get('provider') or ''}|{value.get('pricing') or ''}"
            else:
                continue
            key = f"idle|{model}|{hour}"
            entry = e.get(key)
            if entry is not None and record.offset <= entry[OFFSET]:
                continue  # a replay
            if entry is None and dropped is not None and hour < dropped:
                left_out.append(hour)
                continue
            if entry is None:
                entry = {"gpu_model": model, "hour_ms": hour, "devices": {}, "allocated": {}, OFFSET: -1}
            entry[side][sender] = figure
            if side == "devices":  # replaced like the device-hours: each record has the hour's total
                entry.setdefault("energy", {})[sender] = value.get("energy_kwh")
                gpus.setdefault(key, set()).add(sender)
            entry[OFFSET] = record.offset
            e.put(key, entry)
            changed[key] = entry
        if left_out:
            log.warning(
                "%s: %d record(s) for hours from %s on left out: every device had moved on by more than the "
                "%s retention (AIMA_IDLE_HOURS_RETENTION_S), so those hours' figures were dropped",
                self.name,
                len(left_out),
                hour_label(min(left_out)),
                span(self._retention_ms),
            )
        for key, entry in changed.items():
            result.outputs.extend(_gpu_energy(entry, sorted(gpus.get(key, ())), tariff))
            if not entry["devices"]:
                continue  # no device seen: nothing to compare the allocation with
            device = sum(entry["devices"].values())
            allocated = sum(entry["allocated"].values())
            hour, model = entry["hour_ms"], entry["gpu_model"]
            known = [kwh for kwh in entry.get("energy", {}).values() if kwh is not None]
            energy = sum(known) if known else None
            if energy is not None and tariff is None and not self._told_no_tariff:
                self._told_no_tariff = True
                log.warning(
                    "%s: no energy_eur_per_kwh in the price catalogue: energy costs are reported as unknown",
                    self.name,
                )
            value = cost_record(
                "gpu_hours",
                hour,
                hour + HOUR_MS,
                gpu_model=model,
                device_hours=device,
                idle_gpu_hours=max(device - allocated, 0.0),
                energy_kwh=energy,
                energy_cost_eur=None if energy is None or tariff is None else energy * tariff,
            )
            result.outputs.append(Output("costs", f"idle|{model}|{hour_label(hour)}", COST_RECORD, value))
        if progress:
            newest = max(progress.values())
            index["devices"] = {u: h for u, h in progress.items() if h >= newest - self._stale_ms}
            horizon = bucket_start("hour", min(index["devices"].values()) - self._retention_ms)
            if dropped is None or horizon > dropped:
                for key in e.live_keys():
                    entry = e.get(key) if key.startswith("idle|") else None
                    if entry is not None and entry["hour_ms"] < horizon:
                        e.delete(key)
                index["dropped_before"] = horizon
            e.put(INDEX, index)
        e.flush()
        return result


def _gpu_energy(entry: dict[str, Any], uuids: list[str], tariff: float | None) -> list[Output]:
    """The GpuEnergy records of the devices ``uuids`` in an (gpu_model, hour) entry: each GPU's
    device-hours and energy of the hour, the energy priced at ``tariff`` (null without one)."""
    hour, model = entry["hour_ms"], entry["gpu_model"]
    outputs = []
    for uuid in uuids:
        kwh = entry.get("energy", {}).get(uuid)
        value = {
            "time": from_ms(hour),
            "period_end": from_ms(hour + HOUR_MS),
            "gpu_uuid": uuid,
            "gpu_model": model,
            "device_hours": entry["devices"][uuid],
            "energy_kwh": kwh,
            "energy_cost_eur": None if kwh is None or tariff is None else kwh * tariff,
            "currency": "EUR",
            "source": "stream",
        }
        outputs.append(Output("energy", f"{uuid}|{hour_label(hour)}", GPU_ENERGY, value))
    return outputs
