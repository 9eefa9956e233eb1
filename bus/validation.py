"""Value checks beyond the Avro types, shared by every writer (before sending) and every reader (the stream
app, the sink) on receipt: no NaN or infinity, percentages within 0-100, no negative durations, counts or
sizes, label values of at most :data:`MAX_LABEL_LENGTH` characters, a job's ``gpu_uuids`` (when given) as
many distinct, non-empty label values as its ``gpu_count``, and (:class:`EventTimeGuard`) no event time
further ahead of the checking process's clock than the allowed skew.

The rules follow the field names of the contract, so a new field named ``*_percent`` or ``*_seconds``, or a
new label of the metric catalogue, is checked without anyone remembering to add it here."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any

import polars as pl

from bus import schemas
from bus.catalogue import METRICS

MAX_LABEL_LENGTH = 256
"""Most characters a label value may have: a field the metric catalogue names as a label (``host``,
``gpu_uuid``, ``project``, ``disks[].mountpoint``, ...) and every value of a ``labels`` map. A longer value
would make every series, rollup and alert that carries it as large, up to records the broker refuses."""

FUTURE_EVENT_TIME = "FutureEventTime"
"""The dead-letter error type of a record whose event time is too far ahead of the reader's clock."""

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


@cache
def label_names() -> frozenset[str]:
    """Field names the catalogue uses as labels (the leaf of ``disks[].mountpoint`` is ``mountpoint``)."""
    return frozenset(path.rpartition(".")[2] for metric in METRICS for path in metric.label_fields)


def _too_long(value: Any) -> bool:
    return isinstance(value, str) and len(value) > MAX_LABEL_LENGTH


def _length_problem(where: str, value: str) -> str:
    return f"{where}: a label value of {len(value)} characters is longer than {MAX_LABEL_LENGTH}"


GPU_UUIDS = "gpu_uuids"
"""The field naming the GPUs a record's job holds (JobEvent); checked against the record's ``gpu_count``:
the energy a GPU draws is given to the jobs that name it, so a list that names a GPU twice, a blank one or
more or fewer GPUs than the job holds would bill the wrong project."""


def _gpu_uuid_problems(where: str, uuids: list[Any], gpu_count: Any) -> Iterator[str]:
    for index, uuid in enumerate(uuids):
        if not isinstance(uuid, str) or not uuid.strip():
            yield f"{where}[{index}]: a GPU UUID must be a non-empty string, got {uuid!r}"
        elif len(uuid) > MAX_LABEL_LENGTH:
            yield _length_problem(f"{where}[{index}]", uuid)
    if len(set(uuids)) != len(uuids):
        yield f"{where}: names a GPU more than once"
    if isinstance(gpu_count, int) and len(uuids) != gpu_count:
        yield f"{where}: names {len(uuids)} GPU(s) but gpu_count is {gpu_count}"


def _gpu_uuids_ok(value: Mapping[str, Any]) -> bool:
    uuids = value.get(GPU_UUIDS)
    return uuids is None or not any(_gpu_uuid_problems(GPU_UUIDS, uuids, value.get("gpu_count")))


class EventTimeGuard:
    """Rejects event times more than ``max_skew_s`` ahead of this process's ``clock``: a host whose clock
    runs ahead would otherwise move watermarks past buckets that are still filling, and make every correct
    sample after it late. Such records are dead-lettered with :data:`FUTURE_EVENT_TIME` and never move a
    watermark. Records from the past (backfills) pass: lateness is the processors' business."""

    __slots__ = ("_clock", "max_skew_s")

    def __init__(self, max_skew_s: float, clock: Callable[[], float] = time.time) -> None:
        if max_skew_s <= 0:
            raise ValueError(f"the allowed clock skew must be positive, got {max_skew_s}")
        self.max_skew_s = max_skew_s
        self._clock = clock

    def limit_ms(self) -> int:
        """The latest event time (Unix ms) accepted now."""
        return int((self._clock() + self.max_skew_s) * 1000)

    def problem(self, event_time: datetime) -> str | None:
        """Why ``event_time`` is refused, or None when it is not too far ahead."""
        ahead = event_time.timestamp() - self._clock()
        if ahead <= self.max_skew_s:
            return None
        return (
            f"event time {event_time.isoformat()} is {ahead:.0f} s ahead of this process's clock, "
            f"beyond the allowed skew of {self.max_skew_s:g} s (AIMA_MAX_CLOCK_SKEW_S)"
        )

    def columns_ok(self, newest_event_ms: int) -> bool:
        """Whether a batch whose newest event time is ``newest_event_ms`` passes as a whole."""
        return newest_event_ms <= self.limit_ms()

    def check(self, record_name: str, value: Mapping[str, Any]) -> None:
        """Raise :class:`FutureEventTime` when the record's ``time`` (a datetime, or Unix ms as the codec
        also takes) is too far ahead; a record without a time passes (the schema decides whether it may)."""
        event_time = value.get("time")
        if isinstance(event_time, int) and not isinstance(event_time, bool):
            event_time = datetime.fromtimestamp(event_time / 1000, UTC)
        if isinstance(event_time, datetime):
            found = self.problem(event_time)
            if found is not None:
                raise FutureEventTime(record_name, [f"time: {found}"])


class InvalidRecord(ValueError):
    """A record whose values break the contract's rules; ``problems`` lists each as 'field: why'."""

    def __init__(self, record_name: str, problems: list[str]) -> None:
        super().__init__(f"{record_name}: " + "; ".join(problems))
        self.record_name = record_name
        self.problems = problems

    @property
    def reason(self) -> str:
        return str(self)


class FutureEventTime(InvalidRecord):
    """A record whose event time is too far ahead of the checking process's clock (:class:`EventTimeGuard`);
    its error type on the dead-letter topic is :data:`FUTURE_EVENT_TIME`."""


def problems(value: Mapping[str, Any], path: str = "") -> list[str]:
    """Every rule the record breaks, as 'field: why'; empty when it is valid."""
    return list(_walk(value, path))


def check(record_name: str, value: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRecord` when ``value`` breaks any rule."""
    found = problems(value)
    if found:
        raise InvalidRecord(record_name, found)


def _walk(value: Mapping[str, Any], path: str) -> Iterator[str]:
    labels = label_names()
    for name, item in value.items():
        where = f"{path}{name}"
        if name == GPU_UUIDS and isinstance(item, list):
            yield from _gpu_uuid_problems(where, item, value.get("gpu_count"))
        elif isinstance(item, str):
            if name in labels and len(item) > MAX_LABEL_LENGTH:
                yield _length_problem(where, item)
        elif isinstance(item, Mapping):
            if name == "labels":
                for key, label in item.items():
                    if _too_long(label):
                        yield _length_problem(f"{where}.{key}", label)
            elif name != "annotations":
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
        strings: list[str] = []
        label_maps: list[str] = []
        records: list[tuple[str, _Check]] = []
        arrays: list[tuple[str, _Check]] = []
        labels = label_names()
        uuids = any(spec["name"] == GPU_UUIDS for spec in schema["fields"])
        for spec in schema["fields"]:
            name, kind = spec["name"], _field_kind(spec)
            if isinstance(kind, str):
                if kind in _NUMBERS:
                    low, high = self._bound(name)
                    if low is not None or high is not None or _NUMBERS[kind]:
                        numbers.append((name, low, high, _NUMBERS[kind]))
                elif kind == "string":
                    if name in labels:
                        strings.append(name)
                elif kind not in ("boolean", "bytes", "null"):
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
            elif kind["type"] == "map" and name == "labels":
                label_maps.append(name)

        def check(value: Mapping[str, Any]) -> bool:
            if uuids and not _gpu_uuids_ok(value):
                return False
            for name in strings:
                item = value.get(name)
                if item is not None and len(item) > MAX_LABEL_LENGTH:
                    return False
            for name in label_maps:
                item = value.get(name)
                if item and any(len(label) > MAX_LABEL_LENGTH for label in item.values()):
                    return False
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
        labels = label_names()
        if not _gpu_uuids_ok(value):
            return False
        for name, item in value.items():
            kind = type(item)
            if kind is str:
                if name in labels and len(item) > MAX_LABEL_LENGTH:
                    return False
            elif kind is dict and name == "labels":
                if any(_too_long(label) for label in item.values()):
                    return False
            elif kind is float or kind is int:
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
    labels = label_names()
    for spec in schema["fields"]:
        name, kind = spec["name"], _field_kind(spec)
        column = pl.col(name) if inside is None else inside.struct.field(name)
        if name == GPU_UUIDS:
            if inside is not None:
                raise ValueError(f"{name} inside a record")
            parts.append(_gpu_uuids_check(column))
        elif isinstance(kind, str):
            if kind in _NUMBERS:
                parts.append(_number_check(column, name, _NUMBERS[kind]))
            elif kind == "string" and name in labels:
                parts.append((column.str.len_chars() <= MAX_LABEL_LENGTH).fill_null(True))
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
        elif kind["type"] == "map" and name != "annotations":
            raise ValueError("a map the rules walk into")
    check = pl.all_horizontal(parts)
    return check.all() if inside is None else check


def _gpu_uuids_check(column: pl.Expr) -> pl.Expr:
    """The rule of :func:`_gpu_uuid_problems` as columns: null, or as many distinct non-blank label values
    as the row's gpu_count."""
    names = column.list.eval(
        (pl.element().str.strip_chars().str.len_chars() > 0)
        & (pl.element().str.len_chars() <= MAX_LABEL_LENGTH)
    ).list.all()
    ok = names & (column.list.n_unique() == column.list.len()) & (column.list.len() == pl.col("gpu_count"))
    return (column.is_null() | ok).fill_null(True)


def _number_check(column: pl.Expr, name: str, floating: bool) -> pl.Expr:
    low, high = bounds(name)
    ok = column.is_finite() if floating else pl.lit(True)
    if low is not None:
        ok = ok & (column >= low)
    if high is not None:
        ok = ok & (column <= high)
    return (column.is_null() | ok).fill_null(True)
