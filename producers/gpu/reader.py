"""Reads one GPU or MIG instance into a GpuSample value for one interval group.

Two groups, as the catalogue's intervals say: ``fast`` (utilization, memory, memory bandwidth, tensor cores
from GPM; 10 s by default) and ``slow`` (temperature, power, PCIe, energy, clocks, throttle reasons, ECC,
XID events, processes; 30 s by default). Each group's record carries every field of its group: null where
the device does not support it, never an invented 0. Only reads the probe found supported are made.

``nvml`` is the pynvml module or anything shaped like it (tests pass a fake); errors are NVML's own
classes, reached through ``nvml`` so that the module stays injectable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from producers.gpu.probe import Entity

__all__ = [
    "FIELDS",
    "GPM_METRICS",
    "GROUPS",
    "READS",
    "DeviceReadError",
    "Group",
    "Read",
    "is_unsupported",
    "read_group",
    "throttle_names",
]

Group = Literal["fast", "slow"]
GROUPS: tuple[Group, ...] = ("fast", "slow")
Fields = dict[str, Any]

# What each group's record carries; a field belongs to exactly one group.
FIELDS: dict[Group, tuple[str, ...]] = {
    "fast": (
        "utilization_percent",
        "memory_bandwidth_utilization_percent",
        "memory_used_bytes",
        "memory_total_bytes",
        "memory_utilization_percent",
        "tensor_core_utilization_percent",
    ),
    "slow": (
        "temperature_celsius",
        "power_watts",
        "pcie_tx_bytes_per_second",
        "pcie_rx_bytes_per_second",
        "energy_joules",
        "sm_clock_hz",
        "memory_clock_hz",
        "throttle_reasons",
        "ecc_corrected_errors",
        "ecc_uncorrected_errors",
        "xid_errors",
        "processes",
    ),
}

# The NVML answers that mean "this device (or driver) cannot tell": the field stays null. Anything else
# is the device failing, and the caller treats it as such.
_UNSUPPORTED_CODES = frozenset(
    {3, 4, 13, 25}
)  # NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND, ARG_VERSION
_MAX_EVENTS_PER_READ = 256  # an XID storm must not stall a round


class DeviceReadError(Exception):
    """An NVML call on a device failed for a reason other than 'not supported'."""

    def __init__(self, entity: Entity, read: str, cause: BaseException) -> None:
        super().__init__(f"GPU {entity.index} ({entity.uuid}) {read}: {type(cause).__name__}: {cause}")
        self.entity, self.read, self.cause = entity, read, cause


def is_unsupported(nvml: Any, exc: BaseException) -> bool:
    """Whether an exception from NVML means the field is not available (rather than the GPU failing).
    pynvml raises NVMLLibraryMismatchError for an unversioned function the driver lacks."""
    if isinstance(exc, nvml.NVMLError):
        return getattr(exc, "value", None) in _UNSUPPORTED_CODES
    return isinstance(exc, nvml.NVMLLibraryMismatchError)


@dataclass(frozen=True)
class Read:
    group: Group
    fn: Callable[[Any, Entity], Fields]
    physical_only: bool = False
    """Only whole GPUs answer it (board-level values); MIG instances leave it null."""
    fallback_for: str | None = None
    """Probed only when the named read is unsupported (an older driver's name for the same value)."""


# -- fast group ---------------------------------------------------------------------------------------


def _utilization(nvml: Any, e: Entity) -> Fields:
    rates = nvml.nvmlDeviceGetUtilizationRates(e.handle)
    # utilization.memory is memory-controller busy time, not capacity (requirements M3 fix).
    return {
        "utilization_percent": float(rates.gpu),
        "memory_bandwidth_utilization_percent": float(rates.memory),
    }


def _memory(nvml: Any, e: Entity) -> Fields:
    info = nvml.nvmlDeviceGetMemoryInfo(e.handle)
    used, total = int(info.used), int(info.total)
    return {
        "memory_used_bytes": used,
        "memory_total_bytes": total,
        "memory_utilization_percent": used / total * 100.0 if total else None,
    }


def _gpm(nvml: Any, e: Entity) -> Fields:
    """GPM needs two samples: the metrics are computed over the time between them. The previous sample is
    kept per entity and the two buffers swap roles each read.

    SM activity (NVML_GPM_METRIC_SM_UTIL) becomes ``utilization_percent`` only where
    nvmlDeviceGetUtilizationRates is not supported: a MIG instance (GPM per GPU instance,
    nvmlGpmMigSampleGet) and the parent of MIG instances, whose value is GPM on the parent device itself,
    which covers all its SMs, including those of slices no instance holds. Weighting the instances by
    slice count would need each profile's slice count and would say nothing of unassigned slices.
    Elsewhere the utilization read keeps its (sampled kernel-time) meaning."""
    gpm = e.gpm
    if gpm is None:  # the probe enables this read only with GPM state; released meanwhile
        return {"tensor_core_utilization_percent": None}
    if e.gpu_instance_id is None:
        nvml.nvmlGpmSampleGet(e.handle, gpm.current)
    else:
        nvml.nvmlGpmMigSampleGet(e.parent_handle, e.gpu_instance_id, gpm.current)
    query = gpm.query
    query.sample1, query.sample2 = gpm.previous, gpm.current
    nvml.nvmlGpmMetricsGet(query)
    gpm.previous, gpm.current = gpm.current, gpm.previous
    values = [_gpm_value(nvml, query.metrics[slot]) for slot in range(len(GPM_METRICS))]
    fields: Fields = {"tensor_core_utilization_percent": values[0]}
    if "utilization" not in e.reads["fast"]:
        fields["utilization_percent"] = values[1]
    return fields


def _gpm_value(nvml: Any, metric: Any) -> float | None:
    if metric.nvmlReturn != nvml.NVML_SUCCESS:
        return None  # not supported for this metric (or no window yet): null, never 0
    # A ratio of counters can land a hair outside 0-100; such a value is not a reason to lose the sample.
    return min(max(float(metric.value), 0.0), 100.0)


# -- slow group ---------------------------------------------------------------------------------------


def _temperature(nvml: Any, e: Entity) -> Fields:
    return {"temperature_celsius": float(nvml.nvmlDeviceGetTemperature(e.handle, nvml.NVML_TEMPERATURE_GPU))}


def _power(nvml: Any, e: Entity) -> Fields:
    return {"power_watts": nvml.nvmlDeviceGetPowerUsage(e.handle) / 1000.0}  # mW


def _pcie(counter: str, field: str) -> Callable[[Any, Entity], Fields]:
    def read(nvml: Any, e: Entity) -> Fields:
        kilobytes = nvml.nvmlDeviceGetPcieThroughput(e.handle, getattr(nvml, counter))
        return {field: float(kilobytes) * 1024.0}  # NVML says KB/s, in binary units like its memory sizes

    return read


def _energy(nvml: Any, e: Entity) -> Fields:
    return {"energy_joules": nvml.nvmlDeviceGetTotalEnergyConsumption(e.handle) / 1000.0}  # mJ


def _clock(clock: str, field: str) -> Callable[[Any, Entity], Fields]:
    def read(nvml: Any, e: Entity) -> Fields:
        return {field: int(nvml.nvmlDeviceGetClockInfo(e.handle, getattr(nvml, clock))) * 1_000_000}  # MHz

    return read


def _throttle(function: str) -> Callable[[Any, Entity], Fields]:
    def read(nvml: Any, e: Entity) -> Fields:
        return {"throttle_reasons": throttle_names(getattr(nvml, function)(e.handle))}

    return read


def _ecc(error_type: str, field: str) -> Callable[[Any, Entity], Fields]:
    def read(nvml: Any, e: Entity) -> Fields:
        count = nvml.nvmlDeviceGetTotalEccErrors(e.handle, getattr(nvml, error_type), nvml.NVML_VOLATILE_ECC)
        return {field: int(count)}

    return read


def _processes(nvml: Any, e: Entity) -> Fields:
    running = nvml.nvmlDeviceGetComputeRunningProcesses(e.handle)
    names = {}
    processes = []
    for proc in running:
        pid = int(proc.pid)
        names[pid] = e.process_names[pid] if pid in e.process_names else _process_name(nvml, pid)
        used = proc.usedGpuMemory  # pynvml gives None where the driver cannot say
        processes.append(
            {"pid": pid, "name": names[pid], "used_memory_bytes": None if used is None else int(used)}
        )
    e.process_names = names  # forget processes that ended; pids get reused
    return {"processes": processes}


def _process_name(nvml: Any, pid: int) -> str | None:
    try:
        path = nvml.nvmlSystemGetProcessName(pid)
    except nvml.NVMLError:
        return None  # ended meanwhile, or another PID namespace
    # The base name only: a full path can hold a user's home directory (P1, no personal data).
    return os.path.basename(path) or None


def _xids(nvml: Any, e: Entity) -> Fields:
    """XID errors since the last read, in order, each reported once (the event queue is drained)."""
    codes: list[int] = []
    for _ in range(_MAX_EVENTS_PER_READ):
        try:
            data = nvml.nvmlEventSetWait_v2(e.events, 0)  # 0 ms: never block the round
        except nvml.NVMLError_Timeout:
            break
        if data.eventType & nvml.nvmlEventTypeXidCriticalError:
            codes.append(int(data.eventData))
    return {"xid_errors": codes}


# Bit -> name for the clocks event (throttle) reasons, as nvidia-smi words them.
_THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "board_limit"),
    (0x400, "reliability"),
)
_KNOWN_THROTTLE_MASK = sum(bit for bit, _ in _THROTTLE_BITS)


def throttle_names(mask: int) -> list[str]:
    """The active reasons of a clocks-event bitmask, in bit order; bits NVML adds later are kept by value."""
    names = [name for bit, name in _THROTTLE_BITS if mask & bit]
    unknown = mask & ~_KNOWN_THROTTLE_MASK
    bit = 1
    while unknown:
        if unknown & bit:
            names.append(f"unknown_0x{bit:x}")
            unknown &= ~bit
        bit <<= 1
    return names


# Probe order is read order. GPM (``tensor_cores``) and XID (``xid``) need setup, which the probe does.
READS: dict[str, Read] = {
    "utilization": Read("fast", _utilization),
    "memory": Read("fast", _memory),
    "tensor_cores": Read("fast", _gpm),
    "temperature": Read("slow", _temperature, physical_only=True),
    "power": Read("slow", _power, physical_only=True),
    "pcie_tx": Read("slow", _pcie("NVML_PCIE_UTIL_TX_BYTES", "pcie_tx_bytes_per_second"), physical_only=True),
    "pcie_rx": Read("slow", _pcie("NVML_PCIE_UTIL_RX_BYTES", "pcie_rx_bytes_per_second"), physical_only=True),
    "energy": Read("slow", _energy, physical_only=True),
    "sm_clock": Read("slow", _clock("NVML_CLOCK_SM", "sm_clock_hz"), physical_only=True),
    "memory_clock": Read("slow", _clock("NVML_CLOCK_MEM", "memory_clock_hz"), physical_only=True),
    "throttle": Read("slow", _throttle("nvmlDeviceGetCurrentClocksEventReasons"), physical_only=True),
    "throttle_legacy": Read(
        "slow",
        _throttle("nvmlDeviceGetCurrentClocksThrottleReasons"),
        physical_only=True,
        fallback_for="throttle",
    ),
    "ecc_corrected": Read(
        "slow", _ecc("NVML_MEMORY_ERROR_TYPE_CORRECTED", "ecc_corrected_errors"), physical_only=True
    ),
    "ecc_uncorrected": Read(
        "slow", _ecc("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "ecc_uncorrected_errors"), physical_only=True
    ),
    "xid": Read("slow", _xids, physical_only=True),
    "processes": Read("slow", _processes),
}
GPM_METRICS = ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "NVML_GPM_METRIC_SM_UTIL")
"""The GPM metrics asked for, in query order (pynvml constant names): tensor_core_utilization_percent, then
SM activity (utilization_percent where the utilization read is not supported)."""
SETUP_READS = frozenset({"tensor_cores", "xid"})
"""Reads whose support the probe establishes by setting them up, not by a trial read."""


def read_group(nvml: Any, entity: Entity, group: Group, host: str, time: datetime) -> dict[str, Any]:
    """One GpuSample value for ``entity``: the group's supported reads filled in, the rest null.
    Raises DeviceReadError when the device fails a read (lost, unknown error, ...)."""
    record: dict[str, Any] = {
        "time": time,
        "host": host,
        "gpu": entity.index,
        "gpu_uuid": entity.uuid,
        "gpu_model": entity.model,
        "mig_instance": entity.mig_instance,
        "parent_gpu_uuid": entity.parent_uuid,
        "source": "nvml",
        "interval_group": group,
    }
    for other in GROUPS:
        record.update(dict.fromkeys(FIELDS[other]))
    for name in entity.reads[group]:
        try:
            record.update(READS[name].fn(nvml, entity))
        except Exception as exc:
            if is_unsupported(nvml, exc):
                continue  # stopped being supported (e.g. a mode change): null this time
            raise DeviceReadError(entity, name, exc) from exc
    return record
