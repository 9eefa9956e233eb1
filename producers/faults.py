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
- ``memory_leak``: memory used grows by ``LEAK_BYTES_PER_S`` while a job holds the GPU, from the fault's
  start (or the job's, for a job that starts during the fault), capped at the total.
- ``idle_allocated``: while a job holds the GPU its utilisation stays near ``IDLE_PERCENT`` (power follows).
- ``underused_job``: while a job holds the GPU its memory used is ``UNDERUSED_SHARE`` of the total, so its
  batch could grow by about ``0.9 / UNDERUSED_SHARE``.
- ``job_slowdown``: the job's frames/s at ``SLOWDOWN_SHARE`` of normal, for a labelled ``cause``: either
  ``throttling`` (the GPU samples show it as the throttling kind does) or ``memory_pressure`` (memory used
  at ``PRESSURE_SHARE`` of the total while a job holds the GPU).

A job on a throttled GPU (kinds throttling, and job_slowdown for that cause) processes frames at the
clock's share: its JobTimings records show fewer frames, batches and kernels per interval, each taking
longer; a job on several GPUs goes at its slowest GPU's pace. The simulator draws its timing samples as
without the fault and rescales them, so the fleet's own draws stay the same.

Faults are per GPU: the job affected is whichever job holds the GPU then (the JobEvent records say which;
``Truth.job_id`` names the one holding it when the fault started). Each GPU's own life (job start/stop, idle
stretches) stays as without faults. ``Fleet.truth`` also lists the first host's hourly cooling fault (kind
``cooling_fault``), which every simulated fleet has, plan or no plan.

``python -m producers.simulator --faults-every-s 3600 [--fault-kinds ...] --truth truth.jsonl`` backfills a
fleet with faults and writes the truth; the live simulator (``aima-metrics collect jobs-sim``) injects every
kind with ``AIMA_SIM_FAULTS_EVERY_S`` set and logs each fault as it starts. Not there yet: faults aimed at a
given job id."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["FAULT_KINDS", "SLOWDOWN_CAUSES", "FaultPlan", "Truth"]

FAULT_KINDS = ("fan_failure", "throttling", "memory_leak", "idle_allocated", "underused_job", "job_slowdown")
SLOWDOWN_CAUSES = ("throttling", "memory_pressure")
SLOWDOWN_SHARE = 0.5
PRESSURE_SHARE = 0.98
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
    cause: str | None = None
    """Why, where the kind has causes: job_slowdown's, one of SLOWDOWN_CAUSES."""
    job_id: str | None = None
    """The job holding the GPU when the fault started (None: idle then)."""


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
        self._live: list[Truth] = []
        """The faults not over at the advance before last: what ``active`` looks through (a long run has
        many)."""
        self._before: datetime | None = None

    def advance(
        self, now: datetime, gpus: list[tuple[str, str]], holders: Mapping[str, str] | None = None
    ) -> None:
        """Start every fault due by ``now``; ``gpus``: (host, uuid) of the fleet's GPUs; ``holders``: the
        job id holding each busy GPU (by uuid)."""
        if self._next is None:
            self._next = now + timedelta(seconds=self._rng.uniform(0.1, 0.5) * self.every_s)
        while self._next <= now:
            kind = self._rng.choice(self.kinds)
            host, uuid = self._rng.choice(gpus)
            end = self._next + timedelta(seconds=self.duration_s)
            cause = self._rng.choice(SLOWDOWN_CAUSES) if kind == "job_slowdown" else None
            detail = _DETAIL[kind] + (f" ({cause})" if cause else "")
            job = (holders or {}).get(uuid)
            self.truth.append(Truth(kind, uuid, host, self._next, end, detail, cause, job))
            self._live.append(self.truth[-1])
            self._next += timedelta(seconds=self.every_s * self._rng.uniform(0.8, 1.2))
        # Kept one advance longer than they last: a step asks about times back to its interval's start.
        if self._before is not None:
            self._live = [t for t in self._live if t.end > self._before]
        self._before = now

    def active(self, uuid: str, now: datetime) -> list[Truth]:
        """The faults of this GPU active at ``now``, a time since the advance before last."""
        return [t for t in self._live if t.entity == uuid and t.start <= now < t.end]

    def speed_share(self, uuid: str, now: datetime) -> float:
        """The share of its normal frames/s a job on this GPU gets now (1.0 without a fault that slows it)."""
        share = 1.0
        for truth in self.active(uuid, now):
            if truth.kind == "throttling":
                share = min(share, THROTTLE_CLOCK_SHARE)
            elif truth.kind == "job_slowdown":
                share = min(share, SLOWDOWN_SHARE)
        return share


_DETAIL = {
    "fan_failure": "cooling lost: temperature rises, power and utilisation unchanged",
    "throttling": f"hw_slowdown: SM clock at {THROTTLE_CLOCK_SHARE:.0%} of normal",
    "memory_leak": f"memory used grows {LEAK_BYTES_PER_S // 1024**2} MiB/s while a job runs",
    "idle_allocated": f"allocated to a job but utilisation near {IDLE_PERCENT:g} %",
    "underused_job": (
        f"the job uses {UNDERUSED_SHARE:.0%} of GPU memory: batch could grow ~{0.9 / UNDERUSED_SHARE:.1f}x"
    ),
    "job_slowdown": f"the job's frames/s at {SLOWDOWN_SHARE:.0%} of normal",
}
