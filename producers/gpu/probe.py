"""What each GPU and MIG instance supports, found once by asking NVML for every field: at start, and again
when a device comes back. A field NVML answers 'not supported' (or 'no permission', or a function the
driver lacks) is never asked for again, so its value stays null rather than becoming an invented 0, and an
old GPU costs no failing calls per round.

A MIG instance is an entity of its own (its own UUID, memory and processes, GPM per GPU instance); the
board-level values (temperature, power, PCIe, energy, clocks, throttle, ECC, XID) belong to its parent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from producers.gpu.reader import GPM_METRICS, GROUPS, READS, DeviceReadError, Group, is_unsupported

__all__ = ["Device", "Entity", "GpmState", "attach", "release"]


@dataclass(eq=False)
class GpmState:
    """Two GPM sample buffers (the metric needs the previous one) and the metrics query, reused every read
    because the query struct is about 20 KB."""

    previous: Any
    current: Any
    query: Any


@dataclass(eq=False)
class Entity:
    """One thing a GpuSample describes: a whole GPU or a MIG instance."""

    index: int
    """NVML index of the physical GPU (a MIG instance's parent)."""
    uuid: str
    model: str
    handle: Any
    mig_instance: str | None = None
    parent_uuid: str | None = None
    parent_handle: Any = None
    gpu_instance_id: int | None = None
    reads: dict[Group, tuple[str, ...]] = field(default_factory=lambda: {group: () for group in GROUPS})
    """The supported reads of each group, in read order."""
    gpm: GpmState | None = None
    events: Any = None
    """NVML event set registered for XID errors (whole GPUs only)."""
    process_names: dict[int, str | None] = field(default_factory=dict)

    @property
    def is_mig(self) -> bool:
        return self.mig_instance is not None

    @property
    def supported(self) -> frozenset[str]:
        return frozenset(name for group in GROUPS for name in self.reads[group])


@dataclass(eq=False)
class Device:
    """A physical GPU and its MIG instances; it is probed, lost and found back as one."""

    gpu: Entity
    migs: list[Entity] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.gpu.index

    @property
    def uuid(self) -> str:
        return self.gpu.uuid

    @property
    def entities(self) -> list[Entity]:
        return [self.gpu, *self.migs]


def attach(nvml: Any, index: int) -> Device:
    """Open and probe the GPU at ``index`` with its MIG instances. Raises whatever NVML raises when the
    device cannot be read at all; nothing stays allocated then."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    gpu = Entity(index, nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle), handle)
    device = Device(gpu)
    try:
        probe_entity(nvml, gpu)
        _attach_migs(nvml, device)
    except BaseException:
        release(nvml, device)
        raise
    return device


def release(nvml: Any, device: Device) -> None:
    """Free what the probe set up (GPM samples, event sets). Errors are ignored: the device may be gone."""
    for entity in device.entities:
        if entity.gpm is not None:
            for sample in (entity.gpm.previous, entity.gpm.current):
                _quietly(nvml.nvmlGpmSampleFree, sample)
            entity.gpm = None
        if entity.events is not None:
            _quietly(nvml.nvmlEventSetFree, entity.events)
            entity.events = None
        entity.reads = {group: () for group in GROUPS}


def probe_entity(nvml: Any, entity: Entity) -> None:
    """Try every read once and keep the ones the device answers. Raises DeviceReadError when a read fails
    for a reason other than 'not supported' (the device is then not usable)."""
    found: set[str] = set()
    for name, read in READS.items():
        if (read.physical_only and entity.is_mig) or read.fallback_for in found:
            continue
        try:
            if name == "tensor_cores":
                entity.gpm = _setup_gpm(nvml, entity)
                supported = entity.gpm is not None
            elif name == "xid":
                entity.events = _setup_xid(nvml, entity)
                supported = entity.events is not None
            else:
                read.fn(nvml, entity)
                supported = True
        except Exception as exc:
            if not is_unsupported(nvml, exc):
                raise DeviceReadError(entity, f"probe {name}", exc) from exc
            supported = False
        if supported:
            found.add(name)
    entity.reads = {
        group: tuple(n for n in READS if n in found and READS[n].group == group) for group in GROUPS
    }


def _attach_migs(nvml: Any, device: Device) -> None:
    gpu = device.gpu
    try:
        current_mode = nvml.nvmlDeviceGetMigMode(gpu.handle)[0]
    except Exception as exc:
        if is_unsupported(nvml, exc):
            return  # not a MIG-capable GPU
        raise
    if current_mode != nvml.NVML_DEVICE_MIG_ENABLE:
        return
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu.handle)):
        try:
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, slot)
        except nvml.NVMLError_NotFound:
            continue  # an empty slot: no instance there
        gi = nvml.nvmlDeviceGetGpuInstanceId(handle)
        ci = nvml.nvmlDeviceGetComputeInstanceId(handle)
        mig = Entity(
            gpu.index,
            nvml.nvmlDeviceGetUUID(handle),
            gpu.model,  # the product, so prices and fleet views group MIG slices with their GPU model
            handle,
            mig_instance=f"gi{gi}/ci{ci}",
            parent_uuid=gpu.uuid,
            parent_handle=gpu.handle,
            gpu_instance_id=gi,
        )
        device.migs.append(mig)  # before probing, so that release() frees whatever the probe set up
        probe_entity(nvml, mig)


def _setup_gpm(nvml: Any, entity: Entity) -> GpmState | None:
    """GPM (Hopper and newer): allocate two samples and take the first, so the first read has a window."""
    physical = entity.parent_handle if entity.is_mig else entity.handle
    if not nvml.nvmlGpmQueryDeviceSupport(physical).isSupportedDevice:
        return None
    samples: list[Any] = []
    try:
        samples.append(nvml.nvmlGpmSampleAlloc())
        samples.append(nvml.nvmlGpmSampleAlloc())
        if entity.gpu_instance_id is None:
            nvml.nvmlGpmSampleGet(entity.handle, samples[0])
        else:
            nvml.nvmlGpmMigSampleGet(physical, entity.gpu_instance_id, samples[0])
    except Exception:
        for sample in samples:
            _quietly(nvml.nvmlGpmSampleFree, sample)
        raise
    query = nvml.c_nvmlGpmMetricsGet_t()
    query.version = nvml.NVML_GPM_METRICS_GET_VERSION
    query.numMetrics = len(GPM_METRICS)
    for slot, name in enumerate(GPM_METRICS):
        query.metrics[slot].metricId = getattr(nvml, name)
    return GpmState(previous=samples[0], current=samples[1], query=query)


def _setup_xid(nvml: Any, entity: Entity) -> Any:
    """An event set of the GPU's own, registered for critical XID errors; None where not supported."""
    if not nvml.nvmlDeviceGetSupportedEventTypes(entity.handle) & nvml.nvmlEventTypeXidCriticalError:
        return None
    events = nvml.nvmlEventSetCreate()
    try:
        nvml.nvmlDeviceRegisterEvents(entity.handle, nvml.nvmlEventTypeXidCriticalError, events)
    except Exception:
        _quietly(nvml.nvmlEventSetFree, events)
        raise
    return events


def _quietly(fn: Any, *args: Any) -> None:
    # Freeing on a lost GPU may fail; there is nothing left to do about it.
    with contextlib.suppress(Exception):
        fn(*args)
