"""Grafana's PostgreSQL query expansion, in Python, so tests can run a dashboard's SQL as Grafana would.

A panel query goes through three steps in Grafana (11.x), reproduced here in the same order:

1. the frontend (``templateSrv.replace`` with the SQL datasources' ``interpolateVariable``,
   packages/grafana-sql/src/datasource/SqlDatasource.ts) replaces template variables: ``$var``,
   ``${var}``, ``${var:format}``, ``[[var]]``; a multi-value or include-all variable's values become
   quoted SQL literals joined by commas (``'a','b'``), a single plain value is inserted with ``'``
   doubled; "All" is every option's value, or the variable's custom ``allValue`` inserted raw. Built-ins:
   ``$__interval``, ``$__interval_ms``, ``$__range``, ``$__range_s``, ``$__range_ms``, ``${__from}``,
   ``${__to}`` (with ``:date``, ``:date:iso``, ``:date:seconds``). Unknown names stay as they are;
   an unknown format fails here (Grafana would silently fall back to ``glob``).
2. the backend's global substitutions (pkg/tsdb/grafana-postgresql-datasource/sqleng/sql_engine.go,
   ``Interpolate``): ``$__interval_ms``, ``$__interval``, ``$__unixEpochFrom()``, ``$__unixEpochTo()``.
3. the PostgreSQL macro engine (.../grafana-postgresql-datasource/macros.go): ``$__time``,
   ``$__timeEpoch``, ``$__timeFilter``, ``$__timeFrom``, ``$__timeTo``, ``$__timeGroup``,
   ``$__timeGroupAlias`` (``time_bucket`` when the datasource says ``timescaledb: true``, else
   ``floor(extract(epoch ...))``), ``$__unixEpochFilter``, ``$__unixEpochNanoFilter``,
   ``$__unixEpochNanoFrom``, ``$__unixEpochNanoTo``, ``$__unixEpochGroup``, ``$__unixEpochGroupAlias``;
   any other ``$name(...)`` is an error, as in Grafana.

``$__interval`` itself comes from the panel: range / max data points, rounded to Grafana's steps
(``rangeutil.roundInterval``) and not below the panel's min interval, default the datasource's
``timeInterval`` (SQL datasources: 1m).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

__all__ = [
    "MacroError",
    "TimeRange",
    "Variable",
    "calculate_interval",
    "expand",
    "expand_macros",
    "interpolate_variables",
    "metric_find_values",
    "parse_grafana_time",
    "parse_interval",
    "round_interval_ms",
    "seconds_to_hms",
]


class MacroError(ValueError):
    """What Grafana answers with "interpolation failed" (or the frontend cannot format)."""


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("time range bounds must be timezone-aware")

    @property
    def ms(self) -> tuple[int, int]:
        return _epoch_ms(self.start), _epoch_ms(self.end)


@dataclass
class Variable:
    """A dashboard variable as the frontend holds it: the options' (text, value) pairs and the current
    selection, ``["$__all"]`` for All."""

    name: str
    options: list[tuple[str, str]]
    current: list[str] = field(default_factory=lambda: ["$__all"])
    multi: bool = False
    include_all: bool = False
    all_value: str | None = None

    @property
    def is_all(self) -> bool:
        return self.current in (["$__all"], "$__all")

    def value(self) -> str | list[str]:
        if self.is_all:
            if self.all_value:
                return self.all_value
            return [value for _, value in self.options]
        return self.current if self.multi else self.current[0]

    def text(self) -> str | list[str]:
        if self.is_all:
            return "All"
        texts = {value: text for text, value in self.options}
        found = [texts.get(value, value) for value in self.current]
        return found if self.multi else found[0]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


# -- time ranges and intervals -------------------------------------------------------------------------

_UNIT_MS = {
    "ms": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
    "M": 2_592_000_000,  # Grafana's frontend: a month is 30 days, a year 365 days
    "y": 31_536_000_000,
}
_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|M|y)")


def parse_interval(text: str) -> timedelta:
    """``10s``, ``1m``, ``1h``, ``7d``, ``1w``, ``500ms`` ... (Grafana's gtime.ParseInterval and the
    frontend's intervalToMs; months and years count 30 and 365 days)."""
    match = _INTERVAL.fullmatch(text.strip())
    if match is None:
        raise MacroError(f"error parsing interval {text}")
    return timedelta(milliseconds=float(match[1]) * _UNIT_MS[match[2]])


_RELATIVE = re.compile(r"now(?:([+-])(\d+)(ms|s|m|h|d|w|M|y))?(?:/(s|m|h|d|w|M|y))?")


def parse_grafana_time(text: str, now: datetime) -> datetime:
    """A dashboard time: ``now``, ``now-6h``, ``now-1d/d`` (rounded to the unit's start, UTC), or an ISO
    time. Times are truncated to milliseconds, as Grafana's are."""
    match = _RELATIVE.fullmatch(text.strip())
    if match is None:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    else:
        moment = now
        if match[1]:
            delta = parse_interval(match[2] + match[3])
            moment = moment - delta if match[1] == "-" else moment + delta
        if match[4]:
            unit = match[4]
            moment = moment.astimezone(UTC)
            if unit == "y":
                moment = moment.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
            elif unit == "M":
                moment = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            elif unit == "w":
                moment = (moment - timedelta(days=moment.weekday())).replace(
                    hour=0, minute=0, second=0, microsecond=0
                )
            else:
                names = {"d": "hour", "h": "minute", "m": "second", "s": "microsecond"}
                cut = ["hour", "minute", "second", "microsecond"]
                moment = moment.replace(**dict.fromkeys(cut[cut.index(names[unit]) :], 0))
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


# (upper bound exclusive, rounded value), both in ms: rangeutil.roundInterval.
_ROUNDING = (
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1_500, 1_000),
    (3_500, 2_000),
    (7_500, 5_000),
    (12_500, 10_000),
    (17_500, 15_000),
    (25_000, 20_000),
    (45_000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (750_000, 600_000),
    (1_050_000, 900_000),
    (1_500_000, 1_200_000),
    (2_700_000, 1_800_000),
    (5_400_000, 3_600_000),
    (9_000_000, 7_200_000),
    (16_200_000, 10_800_000),
    (32_400_000, 21_600_000),
    (86_400_000, 43_200_000),
    (604_800_000, 86_400_000),
    (1_814_400_000, 604_800_000),
    (3_628_800_000, 2_592_000_000),
)


def round_interval_ms(interval_ms: float) -> int:
    for bound, rounded in _ROUNDING:
        if interval_ms < bound:
            return rounded
    return 31_536_000_000


def seconds_to_hms(seconds: float) -> str:
    """rangeutil.secondsToHms: the largest whole unit (``1m``, ``2h``, ``30d``, ``500ms``)."""
    for size, unit in ((31_536_000, "y"), (86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")):
        count = math.floor(seconds / size) if unit == "y" else math.floor((seconds % _MOD[unit]) / size)
        if count:
            return f"{count}{unit}"
    milliseconds = math.floor(seconds * 1000)
    return f"{milliseconds}ms" if milliseconds else "less than a millisecond"


_MOD = {"d": 31_536_000, "h": 86_400, "m": 3_600, "s": 60}


def calculate_interval(
    time_range: TimeRange, max_data_points: int, min_interval: str | None = "1m"
) -> tuple[str, int]:
    """``$__interval`` and ``$__interval_ms`` of a panel (rangeutil.calculateInterval)."""
    start_ms, end_ms = time_range.ms
    interval_ms = round_interval_ms((end_ms - start_ms) / max(max_data_points, 1))
    low_ms = parse_interval(min_interval) // timedelta(milliseconds=1) if min_interval else 1
    interval_ms = max(interval_ms, low_ms)
    return seconds_to_hms(interval_ms / 1000), interval_ms


# -- step 1: template variables (frontend) ---------------------------------------------------------------

_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_default(value: Any, variable: Variable | None) -> str:
    """SqlDatasource.interpolateVariable: the format used where the query names none."""
    if isinstance(value, str):
        if variable is not None and (variable.multi or variable.include_all):
            return _quote_literal(value)
        return value.replace("'", "''")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, list):
        return ",".join(_quote_literal(str(v)) for v in value)
    return str(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _regex_escape(value: str) -> str:
    return re.sub(r"[\\^$*+?.()|{}\[\]/]", lambda m: "\\" + m[0], value)


def _format(value: Any, fmt: str, text: Any, args: Sequence[str]) -> str:
    """The frontend's format registry, the formats that make sense in SQL."""
    values = _as_list(value)
    many = isinstance(value, list)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "sqlstring":
        return ",".join(_quote_literal(v) for v in values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "raw":
        return ",".join(values) if many else str(value)
    if fmt == "json":
        return json.dumps(value, separators=(",", ":")) if many else str(value)
    if fmt == "text":
        return " + ".join(_as_list(text)) if isinstance(text, list) else str(text)
    if fmt == "regex":
        escaped = [_regex_escape(v) for v in values]
        return f"({'|'.join(escaped)})" if many and len(escaped) > 1 else escaped[0] if escaped else ""
    if fmt == "glob":
        return "{" + ",".join(values) + "}" if many and len(values) > 1 else ",".join(values)
    if fmt == "join":
        return (args[0] if args else ",").join(values)
    if fmt == "date":
        milliseconds = int(float(values[0]))
        kind = args[0] if args else "iso"
        if kind == "ms":
            return str(milliseconds)
        if kind == "seconds":
            return str(milliseconds // 1000)
        if kind == "iso":
            moment = _EPOCH + timedelta(milliseconds=milliseconds)
            return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        raise MacroError(f"date format {kind!r} is not supported by this expander")
    raise MacroError(f"unknown variable format {fmt!r}")


def interpolate_variables(
    sql: str,
    variables: Mapping[str, Variable],
    time_range: TimeRange,
    interval: str,
    interval_ms: int,
) -> str:
    """Step 1 (templateSrv.replace with the SQL datasource's default format)."""
    start_ms, end_ms = time_range.ms
    range_ms = end_ms - start_ms
    builtins: dict[str, Any] = {
        "__interval": interval,
        "__interval_ms": interval_ms,
        "__range_ms": range_ms,
        "__range_s": range_ms // 1000,
        "__range": f"{range_ms // 1000}s",
        "__from": start_ms,
        "__to": end_ms,
    }

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2] or match[4]
        fmt_spec = match[3] or match[6]
        fmt, *args = fmt_spec.split(":") if fmt_spec else [None]
        if match[5]:
            raise MacroError(f"field paths (${{{name}.{match[5]}}}) are not supported by this expander")
        if name in builtins:
            value = builtins[name]
            return _format(value, fmt, value, args) if fmt else _sql_default(value, None)
        variable = variables.get(name)
        if variable is None:
            return match[0]  # not a variable: left for the backend (macros) or the database
        value = variable.value()
        if variable.is_all and variable.all_value and fmt not in ("text", "percentencode", "queryparam"):
            return interpolate_variables(variable.all_value, variables, time_range, interval, interval_ms)
        if fmt:
            return _format(value, fmt, variable.text(), args)
        return _sql_default(value, variable)

    return _VARIABLE.sub(replace, sql)


# -- steps 2 and 3: backend ----------------------------------------------------------------------------

_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")


def _rfc3339nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: fraction without trailing zeros, none when zero."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += ("." + f"{moment.microsecond:06d}").rstrip("0")
    return text + "Z"


def _go_float(value: float) -> str:
    """Go's fmt ``%v`` of a float64 (strconv 'g', shortest): ``60``, ``0.5``, ``2.592e+06``."""
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(float(value))).normalize().as_tuple()
    text = "".join(map(str, digits))
    point = len(text) + int(exponent)  # digits before the decimal point
    exp10 = point - 1
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text}"
    if point >= len(text):
        return prefix + text + "0" * (point - len(text))
    return f"{prefix}{text[:point]}.{text[point:]}"


def _global_substitutions(sql: str, time_range: TimeRange, interval: str, interval_ms: int) -> str:
    start_ms, end_ms = time_range.ms
    sql = sql.replace("$__interval_ms", str(interval_ms))
    sql = sql.replace("$__interval", interval)
    sql = sql.replace("$__unixEpochFrom()", str(start_ms // 1000))
    return sql.replace("$__unixEpochTo()", str(end_ms // 1000))


def _fill_mode(value: str) -> None:
    if value.upper() in ("NULL", "PREVIOUS"):
        return
    try:
        float(value)
    except ValueError:
        raise MacroError(f"error parsing fill value {value}") from None


def _macro(name: str, args: list[str], time_range: TimeRange, timescaledb: bool) -> str:
    start, end = time_range.start, time_range.end
    needs_column = {"__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter", "__unixEpochNanoFilter"}
    if name in needs_column and (not args or args[0] == ""):
        raise MacroError(f"missing time column argument for macro {name}")
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{_rfc3339nano(start)}' AND '{_rfc3339nano(end)}'"
    if name == "__timeFrom":
        return f"'{_rfc3339nano(start)}'"
    if name == "__timeTo":
        return f"'{_rfc3339nano(end)}'"
    if name in ("__timeGroup", "__unixEpochGroup"):
        if len(args) < 2:
            raise MacroError(f"macro {name} needs time column and interval and optional fill value")
        seconds = parse_interval(args[1].strip("'")).total_seconds()
        if len(args) == 3:
            _fill_mode(args[2])
        if name == "__unixEpochGroup":
            return f"floor(({args[0]})/{_go_float(seconds)})*{_go_float(seconds)}"
        if timescaledb:
            return f"time_bucket('{seconds:.3f}s',{args[0]})"
        return f"floor(extract(epoch from {args[0]})/{_go_float(seconds)})*{_go_float(seconds)}"
    if name in ("__timeGroupAlias", "__unixEpochGroupAlias"):
        return _macro(name.removesuffix("Alias"), args, time_range, timescaledb) + ' AS "time"'
    if name == "__unixEpochFilter":
        return f"{args[0]} >= {_epoch_ms(start) // 1000} AND {args[0]} <= {_epoch_ms(end) // 1000}"
    if name == "__unixEpochNanoFilter":
        return f"{args[0]} >= {_nanos(start)} AND {args[0]} <= {_nanos(end)}"
    if name == "__unixEpochNanoFrom":
        return str(_nanos(start))
    if name == "__unixEpochNanoTo":
        return str(_nanos(end))
    raise MacroError(f'unknown macro "{name}"')


def _nanos(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def expand_macros(
    sql: str, time_range: TimeRange, interval: str, interval_ms: int, *, timescaledb: bool
) -> str:
    """Steps 2 and 3: the backend's global substitutions, then the PostgreSQL macro engine."""
    sql = _global_substitutions(sql, time_range, interval, interval_ms)
    original = sql

    def replace(match: re.Match[str]) -> str:
        name = match[1]
        # Grafana before 5.3 compatibility: "$__timeGroup(...)," means the aliased form.
        if name == "__timeGroup":
            at = original.find(match[0])
            if at >= 0 and original[at + len(match[0]) : at + len(match[0]) + 1] == ",":
                name = "__timeGroupAlias"
        args = [arg.strip(" ") for arg in match[2].split(",")]
        return _macro(name, args, time_range, timescaledb)

    return _MACRO.sub(replace, sql)


def expand(
    sql: str,
    variables: Mapping[str, Variable],
    time_range: TimeRange,
    *,
    interval: str = "1m",
    interval_ms: int | None = None,
    timescaledb: bool = False,
) -> str:
    """A panel's rawSql as the database receives it from Grafana."""
    if interval_ms is None:
        interval_ms = parse_interval(interval) // timedelta(milliseconds=1)
    sql = interpolate_variables(sql, variables, time_range, interval, interval_ms)
    return expand_macros(sql, time_range, interval, interval_ms, timescaledb=timescaledb)


def metric_find_values(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[tuple[str, str]]:
    """A variable query's options as (text, value), as ResponseParser.transformMetricFindResponse makes
    them: the ``__text``/``__value`` columns when both exist, else every value of every column; unique
    by text, in order."""
    found: list[tuple[str, str]] = []
    if "__text" in columns and "__value" in columns:
        text_at, value_at = columns.index("__text"), columns.index("__value")
        found = [(str(row[text_at]), str(row[value_at])) for row in rows]
    else:
        found = [(str(value), str(value)) for i in range(len(columns)) for value in (row[i] for row in rows)]
    seen: set[str] = set()
    unique = []
    for text, value in found:
        if text not in seen:
            seen.add(text)
            unique.append((text, value))
    return unique
