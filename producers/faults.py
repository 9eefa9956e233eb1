"""Labelled injected faults for the simulated fleet, off by default, with the truth of what was injected.

API: ``Fleet(..., faults=FaultPlan(every_s=3600.0))`` turns them on (``faults=None``, the default, leaves
the fleet's records exactly as before). From the fleet's first step on, one fault starts every ``every_s``
of event time (plus a seeded jitter) on a GPU chosen by the plan's own ``random.Random(seed)``, so the
fleet's own draws, and so its records, do not depend on whether faults are on. ``fleet.truth`` lists every
fault started so far as a frozen :class:`Truth` (kind, entity = GPU uuid, host, start, end, detail).

Kinds and what moves in the GpuSample records while ``start <= time < end``:

- ``fan_failure``: the temperature heads for ``+FAN_RISE_C`` over the fault's minutes (thermal lag); power
  and utilisation unchanged.
- ``throttling``: SM clock at ``THROTTLE_CLOCK_SHARE`` of normal, 'hw_slowdown' in throttle_reasons (slow
  group, busy or idle).
- ``memory_leak``: memory used grows by ``LEAK_BYTES_PER_S`` from the fault's start while a job holds the
  GPU, capped at the total.
- ``idle_allocated``: while a job holds the GPU its utilisation stays near ``IDLE_PERCENT`` (power follows).
- ``underused_job``: while a job holds the GPU its memory used is ``UNDERUSED_SHARE`` of the total, so its
  batch could grow by about ``0.9 / UNDERUSED_SHARE``.

Faults are per GPU: the job affected is whichever job holds the GPU then (the JobEvent records say which).
Each GPU's own life (job start/stop, idle stretches, the first host's hourly cooling fault) stays as without
faults.

Not there yet (issue 17 item 5): job_slowdown (frames/s of the job), throttling's effect on the job's
frames/s, faults per job id, CLI options (python -m producers.simulator, aima-metrics simulate)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["FAULT_KINDS", "FaultPlan", "Truth"]

FAULT_KINDS = ("fan_failure", "throttling", "memory_leak", "idle_allocated", "underused_job")
FAN_RISE_C = 25.0
THROTTLE_CLOCK_SHARE = 0.6
LEAK_BYTES_PER_S = 20 * 1024**2
IDLE_PERCENT = 2.0
UNDERUSED_SHARE = 0.2


@dataclass(frozen=True)
class Truth:
    kind: str
    entity: str
    """The GPU's uuid."""
    host: str
    start: datetime
    end: datetime
    detail: str


@dataclass
class FaultPlan:
    """When and for how long faults start; ``seed`` drives the plan's own random draws."""

    every_s: float = 3600.0
    duration_s: float = 900.0
    seed: int = 1
    kinds: tuple[str, ...] = FAULT_KINDS

    def __post_init__(self) -> None:
        if self.every_s <= 0 or self.duration_s <= 0:
            raise ValueError("every_s and duration_s must be > 0")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if not self.kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {self.kinds}")
        self._rng = random.Random(self.seed)
        self._next: datetime | None = None
        self.truth: list[Truth] = []

    def advance(self, now: datetime, gpus: list[tuple[str, str]]) -> None:
        """Start every fault due by ``now``; ``gpus``: (host, uuid) of the fleet's GPUs."""
        if self._next is None:
            self._next = now + timedelta(seconds=self._rng.uniform(0.1, 0.5) * self.every_s)
        while self._next <= now:
            kind = self._rng.choice(self.kinds)
            host, uuid = self._rng.choice(gpus)
            end = self._next + timedelta(seconds=self.duration_s)
            self.truth.append(Truth(kind, uuid, host, self._next, end, _DETAIL[kind]))
            self._next += timedelta(seconds=self.every_s * self._rng.uniform(0.8, 1.2))

    def active(self, uuid: str, now: datetime) -> list[Truth]:
        return [t for t in self.truth if t.entity == uuid and t.start <= now < t.end]


_DETAIL = {
    "fan_failure": "cooling lost: temperature rises, power and utilisation unchanged",
    "throttling": f"hw_slowdown: SM clock at {THROTTLE_CLOCK_SHARE:.0%} of normal",
    "memory_leak": f"memory used grows {LEAK_BYTES_PER_S // 1024**2} MiB/s while a job runs",
    "idle_allocated": f"allocated to a job but utilisation near {IDLE_PERCENT:g} %",
    "underused_job": (
        f"the job uses {UNDERUSED_SHARE:.0%} of GPU memory: batch could grow ~{0.9 / UNDERUSED_SHARE:.1f}x"
    ),
}
