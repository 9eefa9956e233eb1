"""An NVML-shaped fake: pynvml's function names and argument order, its return shapes (the very ctypes
structs pynvml returns, friendly objects for processes), and its own exception classes: a field a device
does not support raises ``pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)``, which pynvml maps to
NVMLError_NotSupported, exactly as the real binding does.

Per device it is configurable: model, UUID, which functions are unsupported (or missing from the driver),
MIG instances, GPM support, processes, XID events, throttle reasons, ECC counts, and vanishing (later calls
raise NVML_ERROR_GPU_IS_LOST). Values are deterministic functions of the injected clock and change with it.

Constants, struct classes and error classes come from pynvml itself; a pynvml *function* the fake does not
implement raises AttributeError instead of reaching for a real driver.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pynvml

__all__ = [
    "MIG_UNSUPPORTED",
    "FakeGpu",
    "FakeMig",
    "FakeNvml",
    "FakeProcess",
    "ManualClock",
    "a100",
    "h100",
    "legacy",
    "mig",
]

GIB = 1 << 30

# What NVML answers NotSupported for on a MIG device handle: board-level values belong to the parent.
MIG_UNSUPPORTED = frozenset(
    {
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetPcieThroughput",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetSupportedEventTypes",
        "nvmlDeviceGetMigMode",
    }
)
# What a GPU in MIG mode answers NotSupported for on its own handle.
_MIG_PARENT_UNSUPPORTED = frozenset({"nvmlDeviceGetUtilizationRates"})


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(eq=False)
class FakeProcess:
    pid: int
    name: str
    used_memory_bytes: int | None
    """None: the driver cannot say (pynvml returns None then)."""


@dataclass(eq=False)
class FakeMig:
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int = 0
    profile: str = "1g.10gb"
    memory_total_bytes: int = 10 * GIB
    slot: int | None = None
    """Index for nvmlDeviceGetMigDeviceHandleByIndex; default: position in the parent's list."""
    processes: list[FakeProcess] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=lambda: set(MIG_UNSUPPORTED))


@dataclass(eq=False)
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    memory_total_bytes: int = 40 * GIB
    unsupported: set[str] = field(default_factory=set)
    """Function names answered NVML_ERROR_NOT_SUPPORTED."""
    missing: set[str] = field(default_factory=set)
    """Function names the driver lacks (NVML_ERROR_FUNCTION_NOT_FOUND)."""
    gpm: bool = False
    mig_mode: bool = False
    migs: list[FakeMig] = field(default_factory=list)
    max_mig_devices: int = 7
    processes: list[FakeProcess] = field(default_factory=list)
    throttle_mask: int = 0
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    supported_events: int = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeSingleBitEccError
    lost: bool = False
    """Every call about it raises NVML_ERROR_GPU_IS_LOST."""
    removed: bool = False
    """NVML no longer counts it (and its handles are lost)."""


def h100(n: int, **overrides: Any) -> FakeGpu:
    """A Hopper GPU: everything supported, GPM included."""
    config = {"name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * GIB, "gpm": True}
    return FakeGpu(uuid=_uuid("GPU", n), **(config | overrides))


def a100(n: int, **overrides: Any) -> FakeGpu:
    """An Ampere GPU: no GPM (NVML says isSupportedDevice=0 and NotSupported for samples)."""
    return FakeGpu(uuid=_uuid("GPU", n), **({"name": "NVIDIA A100-SXM4-40GB"} | overrides))


def legacy(n: int, **overrides: Any) -> FakeGpu:
    """A Kepler-era board on an older driver: no energy counter, PCIe counters, ECC, MIG or GPM, and no
    nvmlDeviceGetCurrentClocksEventReasons (only the older ...ThrottleReasons)."""
    config: dict[str, Any] = {
        "name": "Tesla K80",
        "memory_total_bytes": 12 * GIB,
        "unsupported": {
            "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceGetPcieThroughput",
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetMigMode",
            "nvmlGpmQueryDeviceSupport",
        },
        "missing": {"nvmlDeviceGetCurrentClocksEventReasons"},
    }
    return FakeGpu(uuid=_uuid("GPU", n), **(config | overrides))


def mig(parent: int, gi: int, ci: int = 0, **overrides: Any) -> FakeMig:
    return FakeMig(
        uuid=_uuid("MIG", parent * 100 + gi * 10 + ci),
        gpu_instance_id=gi,
        compute_instance_id=ci,
        **overrides,
    )


def _uuid(kind: str, n: int) -> str:
    return f"{kind}-{n:08x}-0000-4000-8000-{n:012x}"


@dataclass(frozen=True, eq=False)
class FakeHandle:
    gpu: FakeGpu
    mig: FakeMig | None = None


@dataclass(eq=False)
class FakeEventSet:
    gpus: list[FakeGpu] = field(default_factory=list)
    queue: deque[tuple[FakeGpu, int, int]] = field(default_factory=deque)
    freed: bool = False


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its subclass, e.g. NVMLError_NotSupported


class FakeNvml:
    """Pass where the collector takes ``nvml``. ``gpus`` in NVML index order (removed ones are skipped)."""

    def __init__(
        self,
        gpus: Iterable[FakeGpu],
        *,
        clock: Callable[[], float] = time.monotonic,
        init_error: int | None = None,
    ) -> None:
        self.gpus = list(gpus)
        self.clock = clock
        self.init_error = init_error
        """An NVML_ERROR_* code nvmlInit raises (LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, ...)."""
        self.initialized = 0
        self.calls: Counter[str] = Counter()
        self._samples: dict[int, list[Any]] = {}  # address -> [buffer, (gpu, gi, t, tensor integral)]
        self._event_sets: list[FakeEventSet] = []

    def __getattr__(self, name: str) -> Any:
        value = getattr(pynvml, name)
        if inspect.isfunction(value):
            raise AttributeError(f"the NVML fake does not implement {name}")
        return value

    # -- test controls -------------------------------------------------------------------------------------

    def vanish(self, n: int) -> None:
        self.gpus[n].lost = True

    def restore(self, n: int) -> None:
        self.gpus[n].lost = self.gpus[n].removed = False

    def remove(self, n: int) -> None:
        self.gpus[n].removed = True

    def inject_xid(self, n: int, code: int, gpu_instance_id: int = 0xFFFFFFFF) -> None:
        """An XID error happens on GPU ``n``: every event set registered for it will report it once."""
        for events in self._event_sets:
            if self.gpus[n] in events.gpus and not events.freed:
                events.queue.append((self.gpus[n], code, gpu_instance_id))

    # -- plumbing ------------------------------------------------------------------------------------------

    def _enter(self, name: str, handle: FakeHandle | None = None) -> None:
        self.calls[name] += 1
        if not self.initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return
        if not isinstance(handle, FakeHandle):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = handle.gpu
        if gpu.lost or gpu.removed:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.missing:
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        unsupported = handle.mig.unsupported if handle.mig else gpu.unsupported
        if name in unsupported or (handle.mig is None and gpu.mig_mode and name in _MIG_PARENT_UNSUPPORTED):
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def _visible(self) -> list[FakeGpu]:
        return [gpu for gpu in self.gpus if not gpu.removed]

    def _wave(self, handle: FakeHandle, period_s: float, low: float, high: float) -> float:
        """A deterministic value between low and high that moves with the clock, phased per device."""
        phase = self.gpus.index(handle.gpu) + (handle.mig.gpu_instance_id / 7 if handle.mig else 0.0)
        return low + (high - low) * (0.5 + 0.5 * math.sin(self.clock() / period_s + phase))

    # -- init and enumeration ------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise _error(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self._visible())

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        visible = self._visible()
        if not 0 <= index < len(visible):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if visible[index].lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return FakeHandle(visible[index])

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetIndex", handle)
        return self._visible().index(handle.gpu)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        return handle.mig.uuid if handle.mig else handle.gpu.uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetName", handle)
        return f"{handle.gpu.name} MIG {handle.mig.profile}" if handle.mig else handle.gpu.name

    # -- fast group ------------------------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> pynvml.c_nvmlUtilization_t:
        self._enter("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(
            gpu=round(self._wave(handle, 30, 5, 100)), memory=round(self._wave(handle, 45, 0, 80))
        )

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo", handle)
        total = handle.mig.memory_total_bytes if handle.mig else handle.gpu.memory_total_bytes
        used = int(total * self._wave(handle, 60, 0.1, 0.9))
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    # -- slow group ------------------------------------------------------------------------------------------

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return round(self._wave(handle, 90, 35, 80))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        return round(self._wave(handle, 30, 60_000, 450_000))  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        # mJ since "driver load": a steady 200 W plus a wave, so it only ever grows.
        t = self.clock()
        phase = self.gpus.index(handle.gpu)
        return int(5_000_000_000 + 200_000 * t + 3_000_000 * (1 - math.cos(t / 30 + phase)))

    def nvmlDeviceGetPcieThroughput(self, handle: FakeHandle, counter: int) -> int:
        self._enter("nvmlDeviceGetPcieThroughput", handle)
        if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES:
            return round(self._wave(handle, 20, 1_000, 2_000_000))  # KB/s
        if counter == pynvml.NVML_PCIE_UTIL_RX_BYTES:
            return round(self._wave(handle, 25, 1_000, 8_000_000))
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        self._enter("nvmlDeviceGetClockInfo", handle)
        if clock_type == pynvml.NVML_CLOCK_SM:
            return round(self._wave(handle, 40, 345, 1980))  # MHz
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return 2619
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return handle.gpu.throttle_mask

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return handle.gpu.throttle_mask

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        self._enter("nvmlDeviceGetTotalEccErrors", handle)
        if counter_type not in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return handle.gpu.ecc_corrected
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return handle.gpu.ecc_uncorrected
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        if handle.mig:
            owned = [(proc, handle.mig) for proc in handle.mig.processes]
        else:  # a GPU's own processes and, in MIG mode, those of its instances, as NVML lists them
            owned = [(proc, None) for proc in handle.gpu.processes]
            owned += [(proc, m) for m in handle.gpu.migs for proc in m.processes]
        not_available = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
        result = []
        for proc, instance in owned:
            struct = pynvml.c_nvmlProcessInfo_t(
                pid=proc.pid,
                usedGpuMemory=not_available if proc.used_memory_bytes is None else proc.used_memory_bytes,
                gpuInstanceId=instance.gpu_instance_id if instance else 0xFFFFFFFF,
                computeInstanceId=instance.compute_instance_id if instance else 0xFFFFFFFF,
            )
            obj = pynvml.nvmlStructToFriendlyObject(struct)
            if obj.usedGpuMemory == not_available:  # what pynvml itself does
                obj.usedGpuMemory = None
            result.append(obj)
        return result

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        self._enter("nvmlSystemGetProcessName")
        for gpu in self.gpus:
            for proc in [*gpu.processes, *(p for m in gpu.migs for p in m.processes)]:
                if proc.pid == pid:
                    return proc.name
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    # -- events (XID) ----------------------------------------------------------------------------------------

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetSupportedEventTypes", handle)
        return handle.gpu.supported_events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        events = FakeEventSet()
        self._event_sets.append(events)
        return events

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, events: FakeEventSet) -> None:
        self._enter("nvmlDeviceRegisterEvents", handle)
        if event_types & ~handle.gpu.supported_events:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        events.gpus.append(handle.gpu)

    def nvmlEventSetWait_v2(self, events: FakeEventSet, timeout_ms: int) -> pynvml.c_nvmlEventData_t:
        self._enter("nvmlEventSetWait_v2")
        if events.freed:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if any(gpu.lost for gpu in events.gpus):
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if not events.queue:
            raise _error(pynvml.NVML_ERROR_TIMEOUT)  # the fake never waits: time is the clock's
        _gpu, code, gi = events.queue.popleft()
        return pynvml.c_nvmlEventData_t(
            eventType=pynvml.nvmlEventTypeXidCriticalError,
            eventData=code,
            gpuInstanceId=gi,
            computeInstanceId=0xFFFFFFFF,
        )

    def nvmlEventSetWait(self, events: FakeEventSet, timeout_ms: int) -> pynvml.c_nvmlEventData_t:
        return self.nvmlEventSetWait_v2(events, timeout_ms)

    def nvmlEventSetFree(self, events: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        events.freed = True
        if events in self._event_sets:
            self._event_sets.remove(events)

    # -- MIG -------------------------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        self._enter("nvmlDeviceGetMigMode", handle)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if handle.gpu.mig_mode else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        return handle.gpu.max_mig_devices if handle.gpu.mig_mode else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if handle.mig or not handle.gpu.mig_mode or not 0 <= index < handle.gpu.max_mig_devices:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for position, instance in enumerate(handle.gpu.migs):
            if (position if instance.slot is None else instance.slot) == index:
                return FakeHandle(handle.gpu, instance)
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceIsMigDeviceHandle(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceIsMigDeviceHandle", handle)
        return int(handle.mig is not None)

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetGpuInstanceId", handle)
        if handle.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetComputeInstanceId", handle)
        if handle.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig.compute_instance_id

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: FakeHandle) -> FakeHandle:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        if handle.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(handle.gpu)

    # -- GPM (Hopper and newer) ------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: FakeHandle) -> pynvml.c_nvmlGpmSupport_t:
        self._enter("nvmlGpmQueryDeviceSupport", handle)
        return pynvml.c_nvmlGpmSupport_t(
            version=pynvml.NVML_GPM_SUPPORT_VERSION, isSupportedDevice=int(handle.gpu.gpm)
        )

    def nvmlGpmSampleAlloc(self) -> Any:
        """A real ``c_nvmlGpmSample_t`` pointer, so it fits the real c_nvmlGpmMetricsGet_t."""
        self._enter("nvmlGpmSampleAlloc")
        buffer = pynvml.struct_c_nvmlGpmSample_t()
        self._samples[ctypes.addressof(buffer)] = [buffer, None]
        return ctypes.pointer(buffer)

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self._enter("nvmlGpmSampleFree")
        if self._samples.pop(_address(sample), None) is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlGpmSampleGet(self, handle: FakeHandle, sample: Any) -> Any:
        self._enter("nvmlGpmSampleGet", handle)
        return self._take_sample(handle, sample)

    def nvmlGpmMigSampleGet(self, handle: FakeHandle, gpu_instance_id: int, sample: Any) -> Any:
        self._enter("nvmlGpmMigSampleGet", handle)
        instance = next((m for m in handle.gpu.migs if m.gpu_instance_id == gpu_instance_id), None)
        if handle.mig is not None or instance is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._take_sample(FakeHandle(handle.gpu, instance), sample)

    def _take_sample(self, handle: FakeHandle, sample: Any) -> Any:
        if not handle.gpu.gpm:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        slot = self._samples.get(_address(sample))
        if slot is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        t = self.clock()
        integrals = (self._tensor_integral(handle, t), self._sm_integral(handle, t))
        slot[1] = (handle.gpu, handle.mig, t, integrals)
        return sample

    def _tensor_integral(self, handle: FakeHandle, t: float) -> float:
        # Tensor activity a(t) = 50 + 40 sin(t/20 + phase) percent; GPM reports its mean between samples.
        phase = self.gpus.index(handle.gpu) + (handle.mig.gpu_instance_id if handle.mig else 0)
        return 50 * t - 800 * math.cos(t / 20 + phase)

    def _sm_integral(self, handle: FakeHandle, t: float) -> float:
        # SM activity s(t) = 60 + 30 sin(t/30 + phase) percent (the parent: all its SMs, phase of its own).
        phase = self.gpus.index(handle.gpu) + (handle.mig.gpu_instance_id / 3 if handle.mig else 0.5)
        return 60 * t - 900 * math.cos(t / 30 + phase)

    def nvmlGpmMetricsGet(self, query: Any) -> Any:
        self._enter("nvmlGpmMetricsGet")
        first = self._samples.get(_address(query.sample1) or -1)
        second = self._samples.get(_address(query.sample2) or -1)
        if first is None or second is None or first[1] is None or second[1] is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        (gpu1, mig1, t1, f1), (gpu2, mig2, t2, f2) = first[1], second[1]
        for i in range(query.numMetrics):
            metric = query.metrics[i]
            if (gpu1, mig1) != (gpu2, mig2) or t2 <= t1:
                metric.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
            elif metric.metricId == pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL:
                metric.nvmlReturn = pynvml.NVML_SUCCESS
                metric.value = (f2[0] - f1[0]) / (t2 - t1)
            elif metric.metricId == pynvml.NVML_GPM_METRIC_SM_UTIL:
                metric.nvmlReturn = pynvml.NVML_SUCCESS
                metric.value = (f2[1] - f1[1]) / (t2 - t1)
            else:
                metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return query


def _address(pointer: Any) -> int | None:
    return ctypes.cast(pointer, ctypes.c_void_p).value
