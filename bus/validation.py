"""Value checks beyond the Avro types, shared by producers (before sending) and processors (on receipt):
no NaN or infinity, percentages within 0-100, no negative durations, counts or sizes.

The rules follow the field names of the contract, so a new field named ``*_percent`` or ``*_seconds`` is
checked without anyone remembering to add it here."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

# Fields whose name alone would mislead: a budget can be used beyond 100 %.
_EXACT: dict[str, tuple[float | None, float | None]] = {"budget_utilization_percent": (0.0, None)}
# Field-name suffix -> (low, high) bounds, inclusive; None leaves that side open.
_BOUNDS: tuple[tuple[str, float | None, float | None], ...] = (
    ("_percent", 0.0, 100.0),
    ("_seconds", 0.0, None),
    ("_bytes", 0.0, None),
    ("_bytes_per_second", 0.0, None),
    ("_watts", 0.0, None),
    ("_joules", 0.0, None),
    ("_hz", 0.0, None),
    ("_hours", 0.0, None),
    ("_jobs", 0.0, None),
    ("_errors", 0.0, None),
    ("_minutes", 0.0, None),
    ("count", 0.0, None),
    ("restarts", 0.0, None),
    ("gpu_count", 0.0, None),
    ("containers_running", 0.0, None),
)


class InvalidRecord(ValueError):
    """A record whose values break the contract's rules; ``problems`` lists each as 'field: why'."""

    def __init__(self, record_name: str, problems: list[str]) -> None:
        super().__init__(f"{record_name}: " + "; ".join(problems))
        self.record_name = record_name
        self.problems = problems

    @property
    def reason(self) -> str:
        return str(self)


def problems(value: Mapping[str, Any], path: str = "") -> list[str]:
    """Every rule the record breaks, as 'field: why'; empty when it is valid."""
    return list(_walk(value, path))


def check(record_name: str, value: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRecord` when ``value`` breaks any rule."""
    found = problems(value)
    if found:
        raise InvalidRecord(record_name, found)


def _walk(value: Mapping[str, Any], path: str) -> Iterator[str]:
    for name, item in value.items():
        where = f"{path}{name}"
        if isinstance(item, Mapping):
            if name not in ("labels", "annotations"):
                yield from _walk(item, f"{where}.")
        elif isinstance(item, list):
            for index, element in enumerate(item):
                if isinstance(element, Mapping):
                    yield from _walk(element, f"{where}[{index}].")
        elif isinstance(item, float | int) and not isinstance(item, bool):
            if isinstance(item, float) and not math.isfinite(item):
                yield f"{where}: {item} is not a finite number"
                continue
            low, high = _bounds(name)
            if low is not None and item < low:
                yield f"{where}: {item} is below {low:g}"
            elif high is not None and item > high:
                yield f"{where}: {item} is above {high:g}"


def _bounds(name: str) -> tuple[float | None, float | None]:
    if name in _EXACT:
        return _EXACT[name]
    for suffix, low, high in _BOUNDS:
        if name.endswith(suffix):
            return low, high
    return None, None
