"""Value checks beyond the Avro types, shared by producers (before sending) and processors (on receipt):
no NaN or infinity, percentages within 0-100, no negative durations, counts or sizes.

The rules follow the field names of the contract, so a new field named ``*_percent`` or ``*_seconds`` is
checked without anyone remembering to add it here."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import polars as pl

from bus import schemas

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
            low, high = bounds(name)
            if low is not None and item < low:
                yield f"{where}: {item} is below {low:g}"
            elif high is not None and item > high:
                yield f"{where}: {item} is above {high:g}"


def bounds(name: str) -> tuple[float | None, float | None]:
    """The (low, high) bounds the rules give a field of this name; None leaves a side open."""
    if name in _EXACT:
        return _EXACT[name]
    for suffix, low, high in _BOUNDS:
        if name.endswith(suffix):
            return low, high
    return None, None


_Check = Callable[[Mapping[str, Any]], bool]
_NUMBERS = {"int": False, "long": False, "float": True, "double": True}  # Avro type -> decoded as float
_PRIMITIVES = {*_NUMBERS, "string", "boolean", "bytes"}


class Validator:
    """:func:`problems` answered fast for valid records, for the hot paths (publisher, stream app). Per
    record schema it checks only the fields the rules can apply to (numbers, nested records, arrays of
    records), with each field's bounds looked up once; a record with a schema shape it does not handle is
    walked field by field instead. Either way a record that breaks a rule goes through :func:`problems`
    itself for the message."""

    def __init__(self) -> None:
        self._bounds: dict[str, tuple[float | None, float | None]] = {}
        self._checks: dict[str, _Check] = {}

    def problems(self, record_name: str, value: Mapping[str, Any]) -> list[str]:
        check = self._checks.get(record_name)
        if check is None:
            try:
                check = self._compile(schemas.load(record_name))
            except (KeyError, TypeError, ValueError):
                check = self._ok
            self._checks[record_name] = check
        return [] if check(value) else problems(value)

    def check(self, record_name: str, value: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidRecord` when ``value`` breaks any rule (as :func:`check` does)."""
        found = self.problems(record_name, value)
        if found:
            raise InvalidRecord(record_name, found)

    def _bound(self, name: str) -> tuple[float | None, float | None]:
        found = self._bounds.get(name)
        if found is None:
            # The rule table problems() applies, looked up once per field name.
            found = self._bounds[name] = bounds(name)
        return found

    def _compile(self, schema: Mapping[str, Any]) -> _Check:
        numbers: list[tuple[str, float | None, float | None, bool]] = []
        records: list[tuple[str, _Check]] = []
        arrays: list[tuple[str, _Check]] = []
        for spec in schema["fields"]:
            name, kind = spec["name"], _field_kind(spec)
            if isinstance(kind, str):
                if kind in _NUMBERS:
                    low, high = self._bound(name)
                    if low is not None or high is not None or _NUMBERS[kind]:
                        numbers.append((name, low, high, _NUMBERS[kind]))
                elif kind not in ("string", "boolean", "bytes", "null"):
                    raise ValueError(f"named type {kind!r}: walked field by field")
            elif kind["type"] == "record":
                records.append((name, self._compile(kind)))
            elif kind["type"] == "array" and isinstance(kind["items"], dict):
                if kind["items"].get("type") != "record":
                    raise ValueError(f"array of {kind['items']!r}: walked field by field")
                arrays.append((name, self._compile(kind["items"])))
            elif kind["type"] == "array" and kind["items"] not in _PRIMITIVES:
                raise ValueError(f"array of {kind['items']!r}: walked field by field")
            elif kind["type"] == "map" and name not in ("labels", "annotations"):
                raise ValueError("a map the rules walk into: walked field by field")

        def check(value: Mapping[str, Any]) -> bool:
            for name, low, high, floating in numbers:
                item = value.get(name)
                if item is None:
                    continue
                if floating and item - item != 0.0:  # NaN or infinity
                    return False
                if (low is not None and item < low) or (high is not None and item > high):
                    return False
            for name, inner in records:
                item = value.get(name)
                if item is not None and not inner(item):
                    return False
            for name, inner in arrays:
                for item in value.get(name) or ():
                    if not inner(item):
                        return False
            return True

        return check

    def _ok(self, value: Mapping[str, Any]) -> bool:
        """The field-by-field walk, for schemas :meth:`_compile` does not handle."""
        for name, item in value.items():
            kind = type(item)
            if kind is float or kind is int:
                if kind is float and not math.isfinite(item):
                    return False
                low, high = self._bound(name)
                if (low is not None and item < low) or (high is not None and item > high):
                    return False
            elif kind is dict and name not in ("labels", "annotations") and not self._ok(item):
                return False
            elif kind is list and item and type(item[0]) is dict:
                # Avro arrays hold one type: records (dicts) are walked, primitives need no walk.
                for element in item:
                    if type(element) is dict and not self._ok(element):
                        return False
        return True


def _field_kind(spec: Mapping[str, Any]) -> Any:
    """A field's type without its null branch, a plain number type by name; ValueError for unions of more
    than null and one type (the record is then walked field by field)."""
    kind = spec["type"]
    if isinstance(kind, list):
        branches = [branch for branch in kind if branch != "null"]
        if len(branches) != 1:
            raise ValueError(f"union {kind!r}: walked field by field")
        kind = branches[0]
    if isinstance(kind, dict) and "logicalType" not in kind and kind["type"] in _NUMBERS:
        kind = kind["type"]
    return kind


class ColumnValidator:
    """:func:`problems` for a whole batch of decoded columns (``bus.frames``) at once: whether every row
    passes. A batch that does not is checked record by record for the messages; a schema shape it does not
    handle (named types other than records, unions beyond null and one type) answers None."""

    def __init__(self) -> None:
        self._checks: dict[str, pl.Expr | None] = {}

    def all_valid(self, record_name: str, frame: pl.DataFrame) -> bool | None:
        if record_name not in self._checks:
            try:
                self._checks[record_name] = _frame_check(schemas.load(record_name), None)
            except (KeyError, TypeError, ValueError):
                self._checks[record_name] = None
        check = self._checks[record_name]
        if check is None:
            return None
        if frame.height == 0:
            return True
        try:
            return bool(frame.select(check).item())
        except pl.exceptions.PolarsError:
            return None


def _frame_check(schema: Mapping[str, Any], inside: pl.Expr | None) -> pl.Expr:
    """One boolean expression: every numeric field of every row (and of nested records and arrays of
    records) within the bounds of :func:`bounds` and finite. ``inside`` is the struct expression the
    fields belong to (None: the frame's own columns)."""
    parts: list[pl.Expr] = [pl.lit(True)]
    for spec in schema["fields"]:
        name, kind = spec["name"], _field_kind(spec)
        column = pl.col(name) if inside is None else inside.struct.field(name)
        if isinstance(kind, str):
            if kind in _NUMBERS:
                parts.append(_number_check(column, name, _NUMBERS[kind]))
            elif kind not in _PRIMITIVES and kind != "null":
                raise ValueError(f"named type {kind!r}")
        elif kind["type"] == "record":
            parts.append(column.is_null() | _frame_check(kind, column))
        elif kind["type"] == "array" and isinstance(kind["items"], dict):
            if kind["items"].get("type") != "record":
                raise ValueError(f"array of {kind['items']!r}")
            items = _frame_check(kind["items"], pl.element())
            parts.append(column.list.eval(items).list.all().fill_null(True))
        elif kind["type"] == "array" and kind["items"] not in _PRIMITIVES:
            raise ValueError(f"array of {kind['items']!r}")
        elif kind["type"] == "map" and name not in ("labels", "annotations"):
            raise ValueError("a map the rules walk into")
    check = pl.all_horizontal(parts)
    return check.all() if inside is None else check


def _number_check(column: pl.Expr, name: str, floating: bool) -> pl.Expr:
    low, high = bounds(name)
    ok = column.is_finite() if floating else pl.lit(True)
    if low is not None:
        ok = ok & (column >= low)
    if high is not None:
        ok = ok & (column <= high)
    return (column.is_null() | ok).fill_null(True)
