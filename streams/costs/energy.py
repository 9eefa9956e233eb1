"""The energy a GPU drew between two of its samples, split by UTC hour: what the DeviceHoursProcessor
(streams/costs/device_hours.py) adds up per GPU and hour for the energy cost (issue 17, item 3).

A *reading* is a sample with an energy counter (``energy_joules``, J since the driver was loaded) or a
power draw (``power_watts``), or both; the collectors put them in the slow group, every 30 s. Between two
consecutive readings of a GPU, ``prev`` and ``cur``:

1. both have the counter, it did not go back and they are at most ``max_gap`` apart: the counter's
   increase, exact whatever the power did in between;
2. otherwise (the counter went back: a driver reload reset it; one side has no counter; or the readings
   are further apart than ``max_gap``): power x time, the mean power of the two readings (the one that has
   it, when only one does) over the time the GPU counts as present: up to ``max_gap`` after ``prev``, the
   rule the device-hours follow, so energy is never counted for time a GPU is not;
3. neither counter increase nor any power: nothing. No figure is invented, not even 0; the hour's energy
   stays unknown unless other readings tell it.

Energy over an interval that crosses an hour boundary is split in proportion to the time in each hour.
A reading is kept as ``[ms, joules or None, watts or None]`` (JSON, for the state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streams.costs.common import split_by_hour

__all__ = ["J_PER_KWH", "Reading", "energy_by_hour", "reading"]

J_PER_KWH = 3_600_000.0
Reading = Sequence[Any]
"""``[event ms, energy counter in J or None, power in W or None]``."""


def reading(t_ms: int, energy_j: float | None, power_w: float | None) -> list[float | None] | None:
    """The reading of a sample, or None for a sample with neither an energy counter nor a power draw."""
    if energy_j is None and power_w is None:
        return None
    return [t_ms, energy_j, power_w]


def energy_by_hour(prev: Reading, cur: Reading, max_gap_ms: int) -> list[tuple[int, float]]:
    """Joules per UTC hour start between readings ``prev`` and ``cur`` (``cur`` later), by the rules of the
    module doc; empty when nothing is known."""
    start, end = int(prev[0]), int(cur[0])
    if end <= start:
        return []
    prev_j, cur_j = prev[1], cur[1]
    covered_end = min(end, start + max_gap_ms)
    if prev_j is not None and cur_j is not None and cur_j >= prev_j and end - start <= max_gap_ms:
        joules = cur_j - prev_j
    else:
        powers = [w for w in (prev[2], cur[2]) if w is not None]
        if not powers:
            return []
        joules = sum(powers) / len(powers) * (covered_end - start) / 1000
    span = covered_end - start
    return [(hour, joules * overlap / span) for hour, overlap in split_by_hour(start, covered_end)]
