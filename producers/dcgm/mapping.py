"""dcgm-exporter's Prometheus text -> GpuSample values, one per GPU and MIG instance and interval group.

An exposition is parsed with prometheus_client's text parser and grouped into :class:`Series`, one per
entity dcgm-exporter labels: a whole GPU (``gpu``, ``UUID``, ``modelName``) or a GPU instance of a GPU in
MIG mode (the same labels plus ``GPU_I_ID`` and ``GPU_I_PROFILE``; dcgm-exporter gives a MIG instance its
parent's ``UUID`` and no UUID of its own). Each GpuSample field is then computed from the DCGM fields in
:data:`FIELD_MAP`; a field whose DCGM fields the endpoint does not export stays null, never 0.

MIG instances are entities of their own, as the NVML collector makes them: ``gpu_uuid`` is
``MIG-<parent UUID>/<GPU instance id>`` (the form NVIDIA's drivers used before R470, without the compute
instance dcgm-exporter does not name), ``mig_instance`` is ``<profile>:gi<id>``, ``parent_gpu_uuid`` the
GPU's UUID, ``gpu`` and ``gpu_model`` the GPU's. Board-level values (temperature, power, energy, clocks,
PCIe, throttle, ECC, XID) belong to the physical GPU, never to an instance: on a GPU in MIG mode whose
exporter labels them with a GPU instance, they go to the GPU's own record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from producers.gpu.reader import FIELDS, GROUPS, Group, throttle_names

__all__ = [
    "DCGM_FIELDS",
    "FIELD_MAP",
    "Exposition",
    "ExpositionError",
    "Series",
    "XidTracker",
    "parse",
    "samples",
]

MIB = 1024 * 1024
MHZ = 1_000_000
SOURCE = "dcgm"
Level = Literal["instance", "board"]
Values = Mapping[str, float]


class ExpositionError(ValueError):
    """The endpoint's answer is not Prometheus text exposition."""


@dataclass(frozen=True)
class FieldRule:
    level: Level
    """``instance``: a GPU's or a MIG instance's own value; ``board``: the physical GPU's only."""
    dcgm: tuple[str, ...]
    """The DCGM fields it is computed from, the preferred first (README: dcgm-exporter)."""
    value: Callable[[Values], Any]


def _scaled(name: str, factor: float, cast: Callable[[float], Any] = float) -> Callable[[Values], Any]:
    def value(values: Values) -> Any:
        found = values.get(name)
        return None if found is None else cast(found * factor)

    return value


def _ratio_percent(name: str) -> Callable[[Values], float | None]:
    def value(values: Values) -> float | None:
        found = values.get(name)
        # A ratio of profiling counters can land a hair outside 0-1; that is no reason to lose the sample.
        return None if found is None else min(max(found * 100.0, 0.0), 100.0)

    return value


def _first(*rules: Callable[[Values], Any]) -> Callable[[Values], Any]:
    def value(values: Values) -> Any:
        return next((found for rule in rules if (found := rule(values)) is not None), None)

    return value


def _memory_total(values: Values) -> int | None:
    used, free = values.get("DCGM_FI_DEV_FB_USED"), values.get("DCGM_FI_DEV_FB_FREE")
    return None if used is None or free is None else int((used + free) * MIB)


def _memory_percent(values: Values) -> float | None:
    used, free = values.get("DCGM_FI_DEV_FB_USED"), values.get("DCGM_FI_DEV_FB_FREE")
    if used is None or free is None or used + free <= 0:
        return None
    return used / (used + free) * 100.0


def _throttle(values: Values) -> list[str] | None:
    mask = values.get("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", values.get("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"))
    return None if mask is None else throttle_names(int(mask))


def _none(values: Values) -> None:
    return None


_ENERGY_MJ = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
# Every GpuSample metric field, in the groups of producers/gpu/reader.py's FIELDS.
FIELD_MAP: Mapping[str, FieldRule] = {
    "utilization_percent": FieldRule(
        "instance", ("DCGM_FI_DEV_GPU_UTIL",), _scaled("DCGM_FI_DEV_GPU_UTIL", 1)
    ),
    "memory_bandwidth_utilization_percent": FieldRule(
        "instance",
        ("DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_DEV_MEM_COPY_UTIL"),
        _first(_ratio_percent("DCGM_FI_PROF_DRAM_ACTIVE"), _scaled("DCGM_FI_DEV_MEM_COPY_UTIL", 1)),
    ),
    "memory_used_bytes": FieldRule(
        "instance", ("DCGM_FI_DEV_FB_USED",), _scaled("DCGM_FI_DEV_FB_USED", MIB, int)
    ),
    "memory_total_bytes": FieldRule(
        "instance", ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"), _memory_total
    ),
    "memory_utilization_percent": FieldRule(
        "instance", ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"), _memory_percent
    ),
    "tensor_core_utilization_percent": FieldRule(
        "instance", ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",), _ratio_percent("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")
    ),
    "temperature_celsius": FieldRule("board", ("DCGM_FI_DEV_GPU_TEMP",), _scaled("DCGM_FI_DEV_GPU_TEMP", 1)),
    "power_watts": FieldRule("board", ("DCGM_FI_DEV_POWER_USAGE",), _scaled("DCGM_FI_DEV_POWER_USAGE", 1)),
    "pcie_tx_bytes_per_second": FieldRule(
        "board", ("DCGM_FI_PROF_PCIE_TX_BYTES",), _scaled("DCGM_FI_PROF_PCIE_TX_BYTES", 1)
    ),
    "pcie_rx_bytes_per_second": FieldRule(
        "board", ("DCGM_FI_PROF_PCIE_RX_BYTES",), _scaled("DCGM_FI_PROF_PCIE_RX_BYTES", 1)
    ),
    "energy_joules": FieldRule("board", (_ENERGY_MJ,), _scaled(_ENERGY_MJ, 1 / 1000)),
    "sm_clock_hz": FieldRule("board", ("DCGM_FI_DEV_SM_CLOCK",), _scaled("DCGM_FI_DEV_SM_CLOCK", MHZ, round)),
    "memory_clock_hz": FieldRule(
        "board", ("DCGM_FI_DEV_MEM_CLOCK",), _scaled("DCGM_FI_DEV_MEM_CLOCK", MHZ, round)
    ),
    "throttle_reasons": FieldRule(
        "board", ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"), _throttle
    ),
    "ecc_corrected_errors": FieldRule(
        "board", ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",), _scaled("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 1, int)
    ),
    "ecc_uncorrected_errors": FieldRule(
        "board", ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",), _scaled("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 1, int)
    ),
    "xid_errors": FieldRule("board", ("DCGM_FI_DEV_XID_ERRORS",), _none),  # stateful: XidTracker
    "processes": FieldRule("instance", (), _none),  # dcgm-exporter does not list processes
}
DCGM_FIELDS = frozenset(name for rule in FIELD_MAP.values() for name in rule.dcgm)
"""The DCGM fields read; every other metric of the exposition is ignored."""


@dataclass
class Series:
    """What the exposition says about one entity: its identity labels and its DCGM field values."""

    gpu: int
    uuid: str
    model: str
    hostname: str | None
    gpu_instance_id: int | None = None
    profile: str | None = None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int | None]:
        return self.uuid, self.gpu_instance_id


@dataclass
class Exposition:
    series: list[Series]
    unlabelled: int = 0
    """Samples of a read DCGM field without the labels that name a GPU (``gpu``, ``UUID``, ``modelName``)."""


def parse(text: str) -> Exposition:
    """Group the exposition's samples of :data:`DCGM_FIELDS` by entity; NaN values (no reading) are left
    out. Raises :class:`ExpositionError` when the text is not exposition format."""
    by_key: dict[tuple[str, int | None], Series] = {}
    unlabelled = 0
    try:
        # By the family's name: the parser appends "_total" to the samples of a counter that lacks it
        # (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION), and dcgm-exporter's fields have no other suffix.
        seen = [(family.name, s) for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:  # the parser's only complaint about malformed text
        raise ExpositionError(f"not Prometheus text exposition: {exc}") from exc
    for name, sample in seen:
        if name not in DCGM_FIELDS or sample.name not in (name, f"{name}_total"):
            continue
        series = _series(sample.labels)
        if series is None:
            unlabelled += 1
            continue
        known = by_key.setdefault(series.key, series)
        # Several rows for one entity (one per pod sharing the GPU) carry the same reading: keep the first.
        if not math.isnan(sample.value):
            known.values.setdefault(name, float(sample.value))
    return Exposition(list(by_key.values()), unlabelled)


def _series(labels: Mapping[str, str]) -> Series | None:
    uuid = labels.get("UUID") or labels.get("uuid")  # "uuid" with dcgm-exporter's old label names
    model, gpu, gi = labels.get("modelName"), labels.get("gpu", ""), labels.get("GPU_I_ID", "")
    if not uuid or not model or not gpu.isdigit() or (gi and not gi.isdigit()):
        return None
    return Series(
        int(gpu),
        uuid,
        model,
        labels.get("Hostname") or None,
        int(gi) if gi else None,
        labels.get("GPU_I_PROFILE") or None,
    )


class XidTracker:
    """DCGM_FI_DEV_XID_ERRORS is the last XID a GPU reported (0: none), not a list of events: a new one
    is seen as a change of that value. The first value seen for a GPU is its baseline, reported as no new
    XID (it may be hours old); the same XID twice in a row is seen once."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def new(self, uuid: str, code: float | None) -> list[int] | None:
        """The XIDs since the previous call for ``uuid``; None when the endpoint does not export it."""
        if code is None:
            return None
        current = int(code)
        previous = self._last.get(uuid)
        self._last[uuid] = current
        return [current] if previous is not None and current != previous and current != 0 else []


def samples(
    exposition: Exposition,
    groups: Iterable[Group],
    *,
    time: datetime,
    host: str | None,
    xids: XidTracker,
    fallback_host: str,
) -> list[dict[str, Any]]:
    """One GpuSample value per entity and group; an entity for which a group has no value at all is left
    out of that group. ``host``: wins over the exposition's ``Hostname`` label, which wins over
    ``fallback_host`` (the endpoint's host)."""
    groups = tuple(g for g in GROUPS if g in set(groups))
    records: list[dict[str, Any]] = []
    for gpu, migs in _physical(exposition.series):
        board = _board_values(gpu, migs)
        xid = xids.new(gpu.uuid, board.get("DCGM_FI_DEV_XID_ERRORS")) if "slow" in groups else None
        where = host or gpu.hostname or fallback_host
        entities = [(gpu, _merged(gpu.values, board), None), *((mig, mig.values, gpu) for mig in migs)]
        for entity, values, parent in entities:
            for group in groups:
                record = _record(entity, parent, values, group, time, where)
                if group == "slow" and parent is None:
                    record["xid_errors"] = xid
                if any(record[name] is not None for name in FIELDS[group]):
                    records.append(record)
    return records


def _physical(series: list[Series]) -> list[tuple[Series, list[Series]]]:
    """Each physical GPU with its MIG instances, in GPU index order. A GPU whose exporter labels every
    row with a GPU instance gets an entity without values of its own, for its board-level ones."""
    gpus: dict[str, Series] = {}
    migs: dict[str, list[Series]] = {}
    for one in series:
        if one.gpu_instance_id is None:
            gpus[one.uuid] = one
        else:
            migs.setdefault(one.uuid, []).append(one)
            gpus.setdefault(one.uuid, Series(one.gpu, one.uuid, one.model, one.hostname))
    return [
        (gpu, sorted(migs.get(uuid, []), key=lambda m: m.gpu_instance_id or 0))
        for uuid, gpu in sorted(gpus.items(), key=lambda item: (item[1].gpu, item[0]))
    ]


_BOARD_DCGM = frozenset(name for rule in FIELD_MAP.values() if rule.level == "board" for name in rule.dcgm)


def _board_values(gpu: Series, migs: list[Series]) -> dict[str, float]:
    """The GPU's board-level readings: its own, else those its instances' rows carry (the same reading)."""
    board: dict[str, float] = {}
    for mig in migs:
        for name in _BOARD_DCGM & mig.values.keys():
            board.setdefault(name, mig.values[name])
    board.update({name: gpu.values[name] for name in _BOARD_DCGM & gpu.values.keys()})
    return board


def _merged(own: Mapping[str, float], board: Mapping[str, float]) -> dict[str, float]:
    return {**own, **board}


def _record(
    entity: Series, parent: Series | None, values: Values, group: Group, time: datetime, host: str
) -> dict[str, Any]:
    mig = parent is not None
    record: dict[str, Any] = {
        "time": time,
        "host": host,
        "gpu": entity.gpu,
        "gpu_uuid": f"MIG-{entity.uuid}/{entity.gpu_instance_id}" if mig else entity.uuid,
        "gpu_model": entity.model,
        "mig_instance": _mig_name(entity) if mig else None,
        "parent_gpu_uuid": entity.uuid if mig else None,
        "source": SOURCE,
        "interval_group": group,
    }
    for other in GROUPS:
        record.update(dict.fromkeys(FIELDS[other]))
    for name in FIELDS[group]:
        rule = FIELD_MAP[name]
        if not (mig and rule.level == "board"):
            record[name] = rule.value(values)
    return record


def _mig_name(entity: Series) -> str:
    gi = f"gi{entity.gpu_instance_id}"
    return f"{entity.profile}:{gi}" if entity.profile else gi
