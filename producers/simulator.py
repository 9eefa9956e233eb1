"""A deterministic synthetic GPU fleet, for demos, tests, benchmarks and replays when no GPUs are at hand.

``Fleet`` models hosts with GPUs, a job queue and a first-fit scheduler. Jobs arrive (Poisson), wait in a
queue, start on free GPUs of one host, process frames and end finished or failed. Each ``step(now, dt_s)``
covers the event-time interval ``(now - dt_s, now]`` and returns the records a real fleet would have
published for it: GpuSample (utilisation follows the job allocation; power follows utilisation; temperature
follows power with a thermal lag), SystemSample per host, JobEvent lifecycles, JobTimings summaries with
sketches, QueueSample per queue, PodStatus per job pod. Every record says ``source="simulator"``.

All randomness comes from one ``random.Random(seed)`` and all time from the caller, so the same seed and
the same sequence of step times give identical records. Users are born pseudonymous (random ``u_`` ids):
no raw user id exists here, so no pseudonymisation key is needed.

Sampling cadence follows the real collectors where the step allows: GPU metrics of the 'fast' group every
step, the 'slow' group (temperature, power, PCIe, clocks, errors) and pod states every 30 s, networks every
30 s and disks every 5 min of event time; a step longer than a cadence emits it every step.

Backfills: :func:`backfill` (and ``python -m producers.simulator --since 40d``) publishes a history up to
now as fast as the broker takes it, step after step, so every partition holds it in event-time order."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import NormalDist
from typing import Any

from prometheus_client import CollectorRegistry

from bus import sketch as sketches
from bus.runtime import Progress, Service
from bus.settings import Settings
from producers import faults as fault_plan
from producers.publisher import Publisher, last_flush_s

__all__ = [
    "GPU_SPECS",
    "HOST_PROFILES",
    "BackfillReport",
    "Fleet",
    "Record",
    "backfill",
    "generate",
    "main",
    "run",
    "write_truth",
]

log = logging.getLogger(__name__)

Record = tuple[str, str, str, dict[str, Any]]
"""(topic_key, message key, record name, value), the arguments of ``Publisher.publish``."""
SOURCE = "simulator"
MIB = 1024**2
GIB = 1024**3
SLOW_S, NETWORK_S, DISK_S = 30.0, 30.0, 300.0
NAMESPACE = "aima-jobs"
SKETCH_POINTS = 24
"""A series with more events than this is summarised by this many points at evenly spaced quantiles of
its log-normal distribution, each weighted up to the true count: the sketch keeps the distribution's
shape, and a long step does not cost one random draw per frame."""
_Z = tuple(NormalDist().inv_cdf((i + 0.5) / SKETCH_POINTS) for i in range(SKETCH_POINTS))


@dataclass(frozen=True)
class GpuSpec:
    memory_bytes: int
    idle_watts: float
    max_watts: float
    sm_clock_max_hz: int
    memory_clock_hz: int
    frames_per_second: float
    """Frames one GPU of this model processes per second for a typical model."""
    gpm: bool
    """Tensor-core utilisation via NVML GPM: Hopper and newer only; absent (None) elsewhere."""


GPU_SPECS: dict[str, GpuSpec] = {
    "NVIDIA H100 80GB HBM3": GpuSpec(81559 * MIB, 70.0, 700.0, 1980_000_000, 2619_000_000, 120.0, True),
    "NVIDIA A100-SXM4-40GB": GpuSpec(40960 * MIB, 55.0, 400.0, 1410_000_000, 1215_000_000, 70.0, False),
    "NVIDIA L4": GpuSpec(23034 * MIB, 16.0, 72.0, 2040_000_000, 6251_000_000, 25.0, False),
}
HOST_PROFILES: tuple[tuple[str, str, str], ...] = (
    ("NVIDIA H100 80GB HBM3", "aws", "on_demand"),
    ("NVIDIA A100-SXM4-40GB", "gcp", "spot"),
    ("NVIDIA L4", "gcp", "on_demand"),
    ("NVIDIA H100 80GB HBM3", "azure", "spot"),
)
"""(GPU model, provider, pricing) of host i is profile i modulo their number."""
SERVICES = {
    "media-analysis": ("yolov8x", "sam-vit-h"),
    "transcription": ("whisper-large-v3",),
    "search-indexing": ("clip-vit-l14",),
}
KERNELS = ("implicit_gemm_fprop", "flash_attention_fwd", "layer_norm_fwd")
ERRORS = (
    ("CUDA error: an illegal memory access was encountered", 31),
    ("torch.OutOfMemoryError: CUDA out of memory", None),
    ("decoder error: corrupt H.264 stream", None),
)
MEDIA_FPS = 25.0


# One GPU of the first host loses cooling for a few minutes each hour of the fleet's event time (from its
# 2nd minute on), so the default temperature alert fires and resolves in a simulated fleet as in a real one.
COOLING_FAULT_MINUTES = range(2, 8)
COOLING_FAULT_C = 92.0
"""What the faulty GPU heads for, busy or idle: above the default 85 °C alert threshold."""


COOLING_DETAIL = f"built-in: cooling lost in minutes 2-7 of each hour, heads for {COOLING_FAULT_C:g} °C"


def _cooling_fault(elapsed: timedelta) -> bool:
    return int(elapsed.total_seconds() // 60) % 60 in COOLING_FAULT_MINUTES


@dataclass
class _Gpu:
    index: int
    uuid: str
    temperature_c: float
    energy_j: float
    ecc_corrected: int = 0
    job: _Job | None = None
    xid: list[int] = field(default_factory=list)


@dataclass
class _Host:
    name: str
    model: str
    spec: GpuSpec
    provider: str
    pricing: str
    gpus: list[_Gpu]
    memory_total_bytes: int
    disk_used_bytes: dict[str, int]


@dataclass
class _Job:
    job_id: str
    project: str
    user: str
    queue: str
    service: str
    model: str
    gpu_count: int
    queued_at: datetime
    start_delay_s: float
    run_s: float
    error: tuple[str, int | None] | None
    intensity: float
    memory_share: float
    batch_size: int
    pid: int
    host: _Host | None = None
    gpus: list[_Gpu] = field(default_factory=list)
    started_at: datetime | None = None
    ends_at: datetime | None = None
    frames: float = 0.0
    announced: bool = False


class Fleet:
    """The simulated fleet; see the module doc. ``start``: event time the fleet begins (default: the
    start of the first step's interval); ``arrivals_per_hour`` defaults to what keeps about 70 % of the
    GPUs busy. ``run_s_scale`` stretches every job's run time (2 to 30 minutes by default; the same draws),
    for jobs long enough to have an hourly history of their own."""

    def __init__(
        self,
        seed: int = 1,
        hosts: int = 2,
        gpus_per_host: int = 4,
        projects: Sequence[str] = ("news", "sports", "archive", "research"),
        start: datetime | None = None,
        *,
        queues: Sequence[str] = ("priority", "default"),
        arrivals_per_hour: float | None = None,
        faults: fault_plan.FaultPlan | None = None,
        run_s_scale: float = 1.0,
    ) -> None:
        if run_s_scale <= 0:
            raise ValueError(f"run_s_scale must be > 0, got {run_s_scale}")
        if hosts < 1 or gpus_per_host < 1 or not projects or not queues:
            raise ValueError("a fleet needs at least one host, one GPU per host, one project and one queue")
        self.seed = seed
        self._rng = random.Random(seed)
        self._gpus_per_host = gpus_per_host
        self._projects = tuple(projects)
        self._queues = tuple(queues)
        # Users are born pseudonymous: a few random 'u_' ids per project.
        self._users = {p: [f"u_{self._rng.getrandbits(64):016x}" for _ in range(4)] for p in self._projects}
        self.hosts = [self._new_host(i) for i in range(hosts)]
        mean_gpus, mean_run_s = 1.6, 900.0 * run_s_scale
        capacity = hosts * gpus_per_host
        self._arrivals_per_s = (arrivals_per_hour or 0.7 * capacity / mean_gpus / mean_run_s * 3600) / 3600
        self._jobs_made = 0
        self._waiting: list[_Job] = []
        self._running: list[_Job] = []
        self._now: datetime | None = None
        self._last: dict[str, datetime] = {}
        self._faults = faults
        self._run_s_scale = run_s_scale
        if start is not None:
            self._begin(_aware(start))

    @property
    def truth(self) -> list[fault_plan.Truth]:
        """Every fault started so far, by start: the fault plan's (none without one; producers/faults.py)
        and the first host's hourly cooling fault (kind ``cooling_fault``), which every fleet has."""
        planned = list(self._faults.truth) if self._faults else []
        return sorted([*planned, *self._cooling_truth()], key=lambda truth: truth.start)

    def _cooling_truth(self) -> list[fault_plan.Truth]:
        if self._now is None:
            return []
        host, gpu = self.hosts[0], self.hosts[0].gpus[0]
        first, last = COOLING_FAULT_MINUTES[0], COOLING_FAULT_MINUTES[-1] + 1
        found = []
        hour = 0
        while (start := self._began + timedelta(hours=hour, minutes=first)) <= self._now:
            end = self._began + timedelta(hours=hour, minutes=last)
            found.append(fault_plan.Truth("cooling_fault", gpu.uuid, host.name, start, end, COOLING_DETAIL))
            hour += 1
        return found

    # -- set-up ------------------------------------------------------------------------------------------

    def _new_host(self, index: int) -> _Host:
        model, provider, pricing = HOST_PROFILES[index % len(HOST_PROFILES)]
        spec = GPU_SPECS[model]
        gpus = [
            _Gpu(i, f"GPU-{self._uuid()}", 30.0 + self._rng.uniform(0, 4), self._rng.uniform(1e8, 5e9))
            for i in range(self._gpus_per_host)
        ]
        memory = (2048 if spec.gpm else 1024 if spec.max_watts > 100 else 256) * GIB
        disks = {
            "/": int(self._rng.uniform(0.2, 0.5) * 500 * GIB),
            "/data": int(self._rng.uniform(1, 4) * 1e12),
        }
        return _Host(f"sim-gpu-{index:02d}", model, spec, provider, pricing, gpus, memory, disks)

    def _uuid(self) -> str:
        h = f"{self._rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _begin(self, start: datetime) -> None:
        """A fleet mid-day: a backlog that fills about 70 % of the GPUs at once, and a few waiting."""
        self._began = start
        self._now = start
        capacity = len(self.hosts) * self._gpus_per_host
        while sum(job.gpu_count for job in self._waiting) < 0.7 * capacity + 2:
            job = self._new_job(start - timedelta(seconds=self._rng.uniform(30, 900)))
            job.start_delay_s = 0.0
            self._waiting.append(job)
        self._waiting.sort(key=lambda job: job.queued_at)

    def _new_job(self, queued_at: datetime) -> _Job:
        rng = self._rng
        self._jobs_made += 1
        project = rng.choice(self._projects)
        service = rng.choice(tuple(SERVICES))
        error = rng.choice(ERRORS) if rng.random() < 0.05 else None
        return _Job(
            job_id=f"sim-{self.seed}-{self._jobs_made:06d}",
            project=project,
            user=rng.choice(self._users[project]),
            queue=rng.choice(self._queues),
            service=service,
            model=rng.choice(SERVICES[service]),
            gpu_count=min(rng.choice((1, 1, 1, 2, 2, 4)), self._gpus_per_host),
            queued_at=queued_at,
            start_delay_s=rng.uniform(2.0, 20.0),
            run_s=rng.uniform(120.0, 1800.0) * self._run_s_scale,
            error=error,
            intensity=rng.uniform(0.7, 0.98),
            memory_share=rng.uniform(0.3, 0.92),
            batch_size=rng.choice((8, 16, 32)),
            pid=rng.randint(1000, 60000),
        )

    # -- one step ----------------------------------------------------------------------------------------

    def step(self, now: datetime, dt_s: float) -> list[Record]:
        """The records of the event-time interval ``(now - dt_s, now]``. Steps must move forward."""
        now = _aware(now)
        if dt_s <= 0:
            raise ValueError(f"dt_s must be > 0, got {dt_s}")
        t0 = now - timedelta(seconds=dt_s)
        if self._now is None:
            self._begin(t0)
        elif now <= self._now:
            raise ValueError(
                f"steps must move forward: {now.isoformat()} is not after {self._now.isoformat()}"
            )
        self._now = now
        for gpu in self._all_gpus():
            gpu.xid = []
        if self._faults is not None:
            holders = {g.uuid: g.job.job_id for g in self._all_gpus() if g.job is not None}
            self._faults.advance(now, [(h.name, g.uuid) for h in self.hosts for g in h.gpus], holders)
        events: list[tuple[datetime, int, dict[str, Any]]] = []
        timings: list[dict[str, Any]] = []
        ended: list[_Job] = []
        self._arrive(t0, dt_s)
        for job in self._waiting:
            if not job.announced and job.queued_at <= now:
                job.announced = True
                events.append((job.queued_at, len(events), self._event(job, "queued", job.queued_at)))
        for job in self._schedule(t0, now):
            wait = (job.started_at - job.queued_at).total_seconds()
            events.append((job.started_at, len(events), self._event(job, "started", job.started_at, wait)))
        for job in list(self._running):
            timings.extend(self._timings(job, max(t0, job.started_at), min(now, job.ends_at)))
            if job.ends_at <= now:
                ended.append(job)
                events.append((job.ends_at, len(events), self._end(job)))
        events.sort(key=lambda item: (item[0], item[1]))
        records: list[Record] = [("job.events", v["job_id"], "JobEvent", v) for _, _, v in events]
        records += [("job.timings", v["job_id"], "JobTimings", v) for v in timings]
        slow = self._due("slow", now, SLOW_S)
        for host in self.hosts:
            for gpu in host.gpus:
                records += self._gpu_samples(host, gpu, now, dt_s, slow)
            records.append(("system.samples", host.name, "SystemSample", self._system(host, now, dt_s)))
        for queue in self._queues:
            length = sum(1 for job in self._waiting if job.queue == queue and job.queued_at <= now)
            value = {"time": now, "queue": queue, "length_jobs": length, "source": SOURCE}
            records.append(("queue.samples", queue, "QueueSample", value))
        pods = self._waiting + self._running if slow else []
        for job in [*(j for j in pods if j.queued_at <= now), *ended]:
            records.append(("k8s.pods", f"{NAMESPACE}/{job.job_id}", "PodStatus", self._pod(job, now)))
        return records

    def _arrive(self, t0: datetime, dt_s: float) -> None:
        for _ in range(_poisson(self._rng, self._arrivals_per_s * dt_s)):
            self._waiting.append(self._new_job(t0 + timedelta(seconds=self._rng.uniform(0, dt_s))))
        self._waiting.sort(key=lambda job: (self._queues.index(job.queue), job.queued_at))

    def _schedule(self, t0: datetime, now: datetime) -> list[_Job]:
        """First fit, queues in priority order, later jobs may backfill GPUs an earlier one cannot use."""
        started = []
        for job in list(self._waiting):
            start = max(t0, job.queued_at + timedelta(seconds=job.start_delay_s))
            if start >= now:
                continue
            host = next((h for h in self.hosts if sum(g.job is None for g in h.gpus) >= job.gpu_count), None)
            if host is None:
                continue
            job.host, job.started_at = host, start
            job.gpus = [g for g in host.gpus if g.job is None][: job.gpu_count]
            for gpu in job.gpus:
                gpu.job = job
            # A failing job stops part-way; spot capacity fails no differently here, for simplicity.
            share = self._rng.uniform(0.05, 0.9) if job.error else 1.0
            job.ends_at = start + timedelta(seconds=job.run_s * share)
            self._waiting.remove(job)
            self._running.append(job)
            started.append(job)
        return started

    def _end(self, job: _Job) -> dict[str, Any]:
        self._running.remove(job)
        for gpu in job.gpus:
            gpu.job = None
        media = round(job.frames / MEDIA_FPS / 60.0, 3)
        if job.error is None:
            return self._event(job, "finished", job.ends_at, media_minutes=media)
        message, xid = job.error
        if xid is not None:
            job.gpus[0].xid.append(xid)
        return self._event(job, "failed", job.ends_at, media_minutes=media, error=message)

    def _event(
        self, job: _Job, event: str, at: datetime, wait_s: float | None = None, **extra: Any
    ) -> dict[str, Any]:
        host = job.host if event != "queued" else None
        value = {
            "time": at, "job_id": job.job_id, "event": event, "project": job.project, "user": job.user,
            "service": job.service, "queue": job.queue, "model": job.model,
            "host": host.name if host else None, "gpu_count": job.gpu_count,
            "gpu_uuids": [g.uuid for g in job.gpus] if host else None,
            "gpu_model": host.model if host else None, "provider": host.provider if host else None,
            "pricing": host.pricing if host else None, "media_minutes": None, "queue_wait_seconds": wait_s,
            "error": None, "source": SOURCE,
        }  # fmt: skip
        value.update(extra)
        return value

    # -- job timings -------------------------------------------------------------------------------------

    def _timings(self, job: _Job, start: datetime, end: datetime) -> list[dict[str, Any]]:
        seconds = (end - start).total_seconds()
        if seconds <= 0 or job.host is None:
            return []
        rng, spec = self._rng, job.host.spec
        fps = spec.frames_per_second * job.gpu_count * job.intensity
        frames = int(fps * seconds)
        # A slowed job (producers/faults.py) goes at its slowest GPU's pace: fewer events, each longer. The
        # draws are made as for a healthy job and rescaled, so the fleet's random sequence is unchanged.
        share = (
            min((self._faults.speed_share(g.uuid, end) for g in job.gpus), default=1.0)
            if self._faults
            else 1.0
        )
        job.frames += int(frames * share) if share < 1.0 else frames
        batches = frames // job.batch_size
        batch_s = job.batch_size / fps
        h2d_bytes = job.batch_size * 1920 * 1080 * 3
        series: list[tuple[str, str | None, str | None, int, float, float, int | None]] = [
            ("frame", None, None, frames, batch_s, 0.3, None),
            ("batch", None, None, batches, batch_s, 0.15, None),
            ("inference", None, None, batches, batch_s * 0.65, 0.15, None),
            ("data_transfer", None, "h2d", batches, h2d_bytes / 20e9, 0.2, batches * h2d_bytes),
            ("data_transfer", None, "d2h", batches, 0.0004, 0.3, batches * job.batch_size * 65536),
        ]
        series += [("cuda_kernel", k, None, batches * 24, batch_s / 80, 0.5, None) for k in KERNELS]
        if start == job.started_at:
            series.insert(0, ("model_load", None, None, 1, 25.0 if spec.gpm else 12.0, 0.4, None))
        records = []
        for kind, kernel, direction, count, median_s, sigma, nbytes in series:
            if count <= 0:
                continue
            if count <= SKETCH_POINTS:
                draws = [median_s * rng.lognormvariate(0.0, sigma) for _ in range(count)]
            else:
                # The median itself drifts a little from interval to interval.
                centre = median_s * rng.lognormvariate(0.0, 0.05)
                draws = [centre * math.exp(sigma * z) for z in _Z]
            if share < 1.0 and kind != "model_load":
                count = int(count * share)
                if kind == "data_transfer":
                    nbytes = int(nbytes * share) if nbytes is not None else None  # as fast, less often
                else:
                    draws = [d / share for d in draws]
                if count <= 0:
                    continue
                draws = draws[:count]
            weight = count / len(draws)
            records.append(
                {
                    "time": end, "interval_start": start, "job_id": job.job_id, "project": job.project,
                    "model": job.model, "host": job.host.name, "kind": kind, "kernel": kernel,
                    "direction": direction, "bytes": nbytes, "count": count,
                    "sum_seconds": sum(draws) * weight, "min_seconds": min(draws), "max_seconds": max(draws),
                    "sketch": sketches.avro_of(draws, weight), "source": SOURCE,
                }
            )  # fmt: skip
        return records

    # -- samples -----------------------------------------------------------------------------------------

    def _gpu_samples(self, host: _Host, gpu: _Gpu, now: datetime, dt_s: float, slow: bool) -> list[Record]:
        rng, spec, job = self._rng, host.spec, gpu.job
        busy = job is not None
        util = (
            _clip(job.intensity * 100 + rng.gauss(0, 3), 0, 100)
            if job
            else _clip(rng.gauss(0.3, 0.5), 0, 100)
        )
        reserved = 512 * MIB
        used = int(spec.memory_bytes * job.memory_share * rng.uniform(0.97, 1.0)) if job else reserved
        kinds = {t.kind: t for t in self._faults.active(gpu.uuid, now)} if self._faults else {}
        # Faults rescale what was drawn rather than draw again, so the fleet's other records stay as they are.
        if job and "idle_allocated" in kinds:
            util *= fault_plan.IDLE_PERCENT / (job.intensity * 100)
        if job and "underused_job" in kinds:
            used = int(used * fault_plan.UNDERUSED_SHARE / job.memory_share)
        slowdown = kinds.get("job_slowdown")
        if job and slowdown is not None and slowdown.cause == "memory_pressure":
            used = int(spec.memory_bytes * fault_plan.PRESSURE_SHARE)
        power = spec.idle_watts + (spec.max_watts - spec.idle_watts) * util / 100 * rng.uniform(0.85, 1.0)
        power = min(power + rng.gauss(0, spec.max_watts * 0.01), spec.max_watts * 1.02)
        power = max(power, spec.idle_watts * 0.8)
        # Temperature follows power through a first-order thermal lag of about 90 s.
        target_c = 32.0 + 50.0 * power / spec.max_watts
        if host is self.hosts[0] and gpu.index == 0 and _cooling_fault(now - self._began):
            target_c = max(target_c, COOLING_FAULT_C)
        if "fan_failure" in kinds:
            target_c += fault_plan.FAN_RISE_C
        if "memory_leak" in kinds and job:
            # The job leaks from the fault's start, or from its own start when it began during the fault.
            since = max(kinds["memory_leak"].start, job.started_at or now)
            leaked = (now - since).total_seconds() * fault_plan.LEAK_BYTES_PER_S
            used = min(spec.memory_bytes, used + int(leaked))
        gpu.temperature_c += (target_c - gpu.temperature_c) * (1 - math.exp(-dt_s / 90.0))
        gpu.energy_j += power * dt_s
        if rng.random() < 0.001:
            gpu.ecc_corrected += 1
        key = f"{host.name}/{gpu.uuid}"
        base = {
            "time": now, "host": host.name, "gpu": gpu.index, "gpu_uuid": gpu.uuid, "gpu_model": host.model,
            "mig_instance": None, "parent_gpu_uuid": None, "source": SOURCE,
        }  # fmt: skip
        fast = {
            **base,
            "interval_group": "fast",
            "utilization_percent": round(util, 2),
            "memory_used_bytes": used,
            "memory_total_bytes": spec.memory_bytes,
            "memory_utilization_percent": round(100.0 * used / spec.memory_bytes, 2),
            "memory_bandwidth_utilization_percent": round(_clip(util * 0.6 + rng.gauss(0, 2), 0, 100), 2),
            "tensor_core_utilization_percent": (round(util * 0.55, 2) if busy else 0.0) if spec.gpm else None,
            "processes": (
                [{"pid": job.pid, "name": "python3", "used_memory_bytes": used - reserved}] if job else []
            ),
        }
        records: list[Record] = [("gpu.samples", key, "GpuSample", fast)]
        if slow:
            rx = spec.frames_per_second * job.intensity * 1920 * 1080 * 3 if job else 0.0
            capped = power >= spec.max_watts * 0.97
            sm_hz = int(spec.sm_clock_max_hz * (0.97 if capped else 1.0)) if busy else 345_000_000
            throttle = ["sw_power_cap"] if capped else []
            if "throttling" in kinds or (slowdown is not None and slowdown.cause == "throttling"):
                sm_hz = int(sm_hz * fault_plan.THROTTLE_CLOCK_SHARE)
                throttle.append("hw_slowdown")
            slow_value = {
                **base,
                "interval_group": "slow",
                "temperature_celsius": round(gpu.temperature_c + rng.gauss(0, 0.3), 1),
                "power_watts": round(power, 1),
                "pcie_tx_bytes_per_second": round(rx * 0.01 + rng.uniform(0, 1e5), 1),
                "pcie_rx_bytes_per_second": round(rx * rng.uniform(0.9, 1.1) + rng.uniform(0, 1e5), 1),
                "energy_joules": round(gpu.energy_j, 1),
                "sm_clock_hz": sm_hz,
                "memory_clock_hz": spec.memory_clock_hz if busy else spec.memory_clock_hz // 6,
                "throttle_reasons": throttle,
                "ecc_corrected_errors": gpu.ecc_corrected,
                "ecc_uncorrected_errors": 0,
                "xid_errors": list(gpu.xid),
            }
            records.append(("gpu.samples", key, "GpuSample", slow_value))
        return records

    def _system(self, host: _Host, now: datetime, dt_s: float) -> dict[str, Any]:
        rng = self._rng
        jobs = [job for job in self._running if job.host is host]
        busy_gpus = sum(job.gpu_count for job in jobs)
        used = int(24 * GIB + sum(job.gpu_count * 48 * GIB for job in jobs) + rng.uniform(0, 2 * GIB))
        value: dict[str, Any] = {
            "time": now,
            "host": host.name,
            "source": SOURCE,
            "cpu_utilization_percent": round(_clip(4 + 14 * busy_gpus + rng.gauss(0, 2), 0, 100), 2),
            "memory_used_bytes": min(used, host.memory_total_bytes),
            "memory_total_bytes": host.memory_total_bytes,
            "disks": None,
            "networks": None,
            "containers_running": 5 + len(jobs),
        }
        # Media lands on /data while jobs read it; results are small.
        host.disk_used_bytes["/data"] += int(busy_gpus * 2e6 * dt_s)
        if self._due(f"net:{host.name}", now, NETWORK_S):
            ingest = sum(job.host.spec.frames_per_second * job.gpu_count * 2e5 for job in jobs if job.host)
            value["networks"] = [
                {
                    "interface": "eth0",
                    "receive_bytes_per_second": round(
                        ingest * rng.uniform(0.8, 1.2) + rng.uniform(1e4, 1e5), 1
                    ),
                    "transmit_bytes_per_second": round(ingest * 0.02 + rng.uniform(1e4, 1e5), 1),
                }
            ]
        if self._due(f"disk:{host.name}", now, DISK_S):
            totals = {"/": 500 * GIB, "/data": int(8e12)}
            value["disks"] = [
                {"mountpoint": m, "used_bytes": min(u, totals[m]), "total_bytes": totals[m]}
                for m, u in host.disk_used_bytes.items()
            ]
        return value

    def _pod(self, job: _Job, now: datetime) -> dict[str, Any]:
        if job.started_at is None:
            phase, ready = "Pending", False
        elif job.ends_at is not None and job.ends_at <= now:
            phase, ready = ("Succeeded" if job.error is None else "Failed"), False
        else:
            phase, ready = "Running", True
        # What the Metrics Server would report for a running job's pod: a feeder core per GPU at the job's
        # intensity, host memory in step with its GPU memory share; nothing for a pod that does not run.
        running = phase == "Running"
        cpu = round(0.25 + job.gpu_count * job.intensity, 3) if running else None
        memory = int((2 + 14 * job.memory_share) * job.gpu_count * 2**30) if running else None
        return {
            "time": now, "namespace": NAMESPACE, "pod": job.job_id,
            "host": job.host.name if job.host else None, "phase": phase, "ready": ready,
            "restarts": 0, "source": SOURCE,
            "cpu_usage_cores": cpu, "memory_usage_bytes": memory,
        }  # fmt: skip

    def _due(self, what: str, now: datetime, every_s: float) -> bool:
        """Whether a sample on a cadence of ``every_s`` is due; the first one always is."""
        last = self._last.get(what)
        if last is not None and (now - last).total_seconds() < every_s:
            return False
        self._last[what] = now
        return True

    def _all_gpus(self) -> Iterator[_Gpu]:
        for host in self.hosts:
            yield from host.gpus


def generate(fleet: Fleet, start: datetime, end: datetime, step_s: float) -> Iterator[Record]:
    """Every record of the steps ending at start + step_s, start + 2 step_s, ... up to ``end``, without
    waiting: event time advances as fast as the caller consumes (benchmarks, replays, backfills)."""
    if step_s <= 0:
        raise ValueError(f"step_s must be > 0, got {step_s}")
    start, end = _aware(start), _aware(end)
    k = 1
    # Multiples of step_s from start, so that float steps do not accumulate drift.
    while (now := start + timedelta(seconds=k * step_s)) <= end:
        yield from fleet.step(now, step_s)
        k += 1


@dataclass(frozen=True)
class BackfillReport:
    records: int
    """Records handed to the publisher."""
    rejected: int
    """Refused by the publisher (invalid, dead-lettered with the reason, or dropped): 0 in a good run."""
    pending: int
    """Not acknowledged by the broker when the last flush gave up: 0 in a good run."""
    truth: tuple[fault_plan.Truth, ...] = ()
    """The faults the fleet had (``Fleet.truth``), by start."""


def backfill(
    settings: Settings,
    start: datetime,
    end: datetime | None = None,
    *,
    step_s: float = 60.0,
    hosts: int = 2,
    gpus_per_host: int = 4,
    seed: int = 1,
    arrivals_per_hour: float | None = None,
    topics: Collection[str] | None = None,
    publisher: Publisher | None = None,
    service: Service | None = None,
    flush_every: int = 20_000,
    faults: fault_plan.FaultPlan | None = None,
) -> BackfillReport:
    """Publish the fleet's history from ``start`` to ``end`` (default: now) as fast as the broker takes it,
    in event-time order: a step's records go out before the next step's, so every partition holds its
    records in time order, as a fleet that had been publishing all along would have left them.

    ``topics``: only records of these catalogue topics (default: every one). Every ``flush_every``
    records the publisher is flushed, so its buffer never overflows (an overflowing buffer drops). Stops
    early when ``service.stopping`` is set. ``faults``: labelled faults to inject (producers/faults.py); the
    report lists them."""
    end = datetime.now(UTC) if end is None else _aware(end)
    start = _aware(start)
    if start >= end:
        raise ValueError(f"the backfill start {start.isoformat()} is not before its end {end.isoformat()}")
    if publisher is None:
        registry = service.registry if service is not None else CollectorRegistry()
        publisher = Publisher(settings, source=SOURCE, registry=registry)
    fleet = Fleet(
        seed=seed,
        hosts=hosts,
        gpus_per_host=gpus_per_host,
        start=start,
        arrivals_per_hour=arrivals_per_hour,
        faults=faults,
    )
    wanted = None if topics is None else frozenset(topics)
    progress = Progress("simulator backfill records")
    sent = rejected = since_flush = 0
    stopping = service.stopping if service is not None else threading.Event()
    for record in generate(fleet, start, end, step_s):
        if wanted is not None and record[0] not in wanted:
            continue
        if not publisher.publish(*record):
            rejected += 1
        sent += 1
        since_flush += 1
        if since_flush >= flush_every:
            publisher.flush(service.time_left_s() if service is not None else 60.0)
            progress.advance(since_flush)
            since_flush = 0
            if stopping.is_set():
                break
    pending = publisher.flush(service.time_left_s() if service is not None else 60.0)
    progress.advance(since_flush)
    return BackfillReport(sent, rejected, pending, tuple(fleet.truth))


def run(
    settings: Settings,
    *,
    once: bool = False,
    service: Service | None = None,
    publisher: Publisher | None = None,
    rate_hz: float = 1.0,
    hosts: int = 2,
    gpus_per_host: int = 4,
    seed: int = 1,
    speedup: float = 1.0,
    faults: fault_plan.FaultPlan | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Publish the simulated fleet. Each step covers ``speedup / rate_hz`` seconds of event time and
    steps come ``1 / rate_hz`` seconds apart on the wall clock, starting now.

    ``once``: publish one step, flush, and return its (record name, value) pairs. Otherwise step until
    ``service.stopping`` is set (or forever without a service), log progress, flush, and return an empty
    list (a long run keeps no records). ``faults``: labelled faults to inject; each is logged as it starts."""
    if rate_hz <= 0 or speedup <= 0:
        raise ValueError("rate_hz and speedup must be > 0")
    if publisher is None:
        # The service's registry makes the publisher's counters part of its /metrics; without a service a
        # private one, so that repeated runs in one process do not register the same metrics twice.
        registry = service.registry if service is not None else CollectorRegistry()
        publisher = Publisher(settings, source=SOURCE, registry=registry)
    period_s = 1.0 / rate_hz
    dt_s = period_s * speedup
    fleet = Fleet(seed=seed, hosts=hosts, gpus_per_host=gpus_per_host, faults=faults)
    started = datetime.now(UTC)
    if once:
        records = fleet.step(started, dt_s)
        for record in records:
            publisher.publish(*record)
        publisher.flush()
        return [(name, value) for _, _, name, value in records]

    stopping = service.stopping if service is not None else threading.Event()
    progress = Progress("simulator records")
    wall0 = time.monotonic()
    k = logged = 0
    try:
        while True:
            k += 1
            # Step k covers the k-th period and is published when that period is over, so event time
            # never runs ahead of the wall clock at speedup 1. Deadlines count from the start, so the
            # time a step takes does not slow the rate down.
            if stopping.wait(max(0.0, wall0 + k * period_s - time.monotonic())):
                break
            records = fleet.step(started + timedelta(seconds=k * dt_s), dt_s)
            for record in records:
                publisher.publish(*record)
            progress.advance(len(records))
            if faults is not None and len(faults.truth) > logged:
                for fault in faults.truth[logged:]:
                    log.info("simulator fault injected", extra={"fault": _logged(fault)})
                logged = len(faults.truth)
    finally:
        # Within what the stop bound leaves: with the broker away, what is not acknowledged by then is lost
        # (it was never on the topic), rather than the bound ending the process mid-flush.
        publisher.flush(last_flush_s(service, settings))
    return []


def write_truth(path: str, truth: Iterable[fault_plan.Truth]) -> None:
    """The faults, one JSON object a line (times in ISO 8601), for whoever checks a detector against them."""
    with open(path, "w", encoding="utf-8") as out:
        for fault in truth:
            out.write(json.dumps(_logged(fault)) + "\n")


def _logged(fault: fault_plan.Truth) -> dict[str, Any]:
    return {**dataclasses.asdict(fault), "start": fault.start.isoformat(), "end": fault.end.isoformat()}


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method; a normal approximation for large means)."""
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"times must be timezone-aware (UTC), got {at!r}")
    return at.astimezone(UTC)


def _when(text: str, now: datetime) -> datetime:
    """``40d``, ``12h``, ``90m`` before ``now``, or an ISO 8601 time with a zone."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    if text and text[-1] in units:
        try:
            return now - timedelta(seconds=float(text[:-1]) * units[text[-1]])
        except ValueError:
            pass
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is neither a span such as 40d or 12h nor an ISO time with a zone"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m producers.simulator --since 40d``: publish a simulated fleet's history up to now, as
    fast as the broker takes it, in event-time order, and exit (0 when every record was acknowledged).
    Broker and topic settings come from the environment (bus/settings.py)."""
    import argparse

    from bus import logs

    parser = argparse.ArgumentParser(
        prog="python -m producers.simulator",
        description="Publish the simulated fleet's history in event-time order, as fast as possible.",
    )
    parser.add_argument("--since", required=True, help="start: a span before now (40d, 12h) or an ISO time")
    parser.add_argument("--until", help="end: a span before now or an ISO time (default: now)")
    parser.add_argument("--step-s", type=float, default=60.0, help="event time per step (default 60)")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--gpus-per-host", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs-per-hour", type=float, help="job arrivals (default: ~70 %% of the GPUs busy)")
    parser.add_argument("--topics", help="comma-separated catalogue topics to publish (default: all)")
    parser.add_argument(
        "--faults-every-s",
        type=float,
        help="inject a labelled fault about this often (event time; default: none, producers/faults.py)",
    )
    parser.add_argument("--fault-duration-s", type=float, default=900.0, help="each fault's length (900)")
    parser.add_argument(
        "--fault-kinds", help=f"comma-separated kinds (default: all of {', '.join(fault_plan.FAULT_KINDS)})"
    )
    parser.add_argument("--fault-seed", type=int, default=1, help="seed of the fault plan (1)")
    parser.add_argument("--truth", help="write the faults the fleet had to this file, one JSON object a line")
    args = parser.parse_args(argv)
    logs.configure("INFO")
    now = datetime.now(UTC)
    try:
        start = _when(args.since, now)
        end = _when(args.until, now) if args.until else now
    except ValueError as exc:
        parser.error(str(exc))
    topics = [t.strip() for t in args.topics.split(",") if t.strip()] if args.topics else None
    plan = None
    if args.faults_every_s is not None:
        kinds = (
            tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip()) if args.fault_kinds else None
        )
        try:
            plan = fault_plan.FaultPlan(
                every_s=args.faults_every_s,
                duration_s=args.fault_duration_s,
                seed=args.fault_seed,
                kinds=kinds or fault_plan.FAULT_KINDS,
            )
        except ValueError as exc:
            parser.error(str(exc))
    elif args.fault_kinds:
        parser.error("--fault-kinds needs --faults-every-s")
    report = backfill(
        Settings(),
        start,
        end,
        step_s=args.step_s,
        hosts=args.hosts,
        gpus_per_host=args.gpus_per_host,
        seed=args.seed,
        arrivals_per_hour=args.jobs_per_hour,
        topics=topics,
        faults=plan,
    )
    if args.truth:
        write_truth(args.truth, report.truth)
    print(
        f"published {report.records} records from {start.isoformat()} to {end.isoformat()}: "
        f"{report.rejected} rejected, {report.pending} not acknowledged, {len(report.truth)} faults"
    )
    return 0 if report.rejected == 0 and report.pending == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
