"""Parsing and validation of request parameters: metric names, label selectors, time ranges, intervals,
page cursors and silence matchers (their grammars: bus/durations.py, bus/matchers.py, bus/tiers.py). Each
function raises :class:`~api.errors.ApiError` (400, or 404 for an unknown metric) whose detail names the
parameter and says what is wrong with it."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from api.errors import ApiError, bad_request
from bus import catalogue, durations
from bus.catalogue import Metric
from bus.matchers import LABEL_NAME as MATCHER_LABEL
from bus.matchers import InvalidMatcher, Matcher, matchers_of
from bus.tiers import WORDS, Tier

__all__ = [
    "Interval",
    "TimeRange",
    "cursor",
    "label_selector",
    "metric",
    "parse_duration",
    "parse_interval",
    "parse_matchers",
    "time_bounds",
    "time_range",
]

LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_LABEL_VALUE = 1024
INTERVAL_HELP = (
    "an interval is 1h, 1d, 1mo or 1y (also hour, day, month, year: read from the rollups) or a duration "
    "shorter than a day such as 30s, 5m or 6h (computed from the raw samples, which are kept 24 h)"
)


def metric(name: str) -> Metric:
    """The catalogue entry; 404 naming the metric and the closest known names."""
    try:
        return catalogue.BY_NAME[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(catalogue.BY_NAME), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; GET /metrics lists the known metrics"
    raise ApiError(404, "unknown_metric", f"unknown metric {name[:200]!r}{hint}")


def label_selector(text: str | None, allowed: Collection[str] | None = None) -> dict[str, str]:
    """``k=v,k2=v2`` as a mapping. A value may be empty (``mig_instance=``): that selects series without
    the label. ``allowed``: the label names that may be used (None: any well-formed name)."""
    if text is None or not text.strip():
        return {}
    selected: dict[str, str] = {}
    for item in text.split(","):
        shown = item.strip()[:100]
        if not item.strip():
            raise bad_request(
                f"labels: empty item in {text[:200]!r}; write k=v pairs separated by single commas"
            )
        if "=" not in item:
            raise bad_request(f"labels: {shown!r} is not of the form k=v (no '=')")
        if item.count("=") > 1:
            raise bad_request(
                f"labels: {shown!r} has more than one '='; write one k=v pair per item, separated by commas"
            )
        name, value = (part.strip() for part in item.split("="))
        if not name:
            raise bad_request(f"labels: {shown!r} has no label name before '='")
        if not LABEL_NAME.fullmatch(name) or (allowed is not None and name not in allowed):
            known = f"; labels of this metric: {', '.join(allowed)}" if allowed is not None else ""
            raise bad_request(f"labels: {name[:100]!r} is not a known label name{known}")
        if name in selected:
            raise bad_request(f"labels: label {name!r} is given twice")
        if len(value) > MAX_LABEL_VALUE or "\x00" in value:
            raise bad_request(f"labels: the value of {name!r} is longer than {MAX_LABEL_VALUE} or has a NUL")
        selected[name] = value
    return selected


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime

    def to_json(self) -> dict[str, str]:
        return {"start_time": self.start.isoformat(), "end_time": self.end.isoformat()}


def to_utc(moment: datetime, name: str) -> datetime:
    """An aware time in UTC; a time without an offset is taken as UTC."""
    try:
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):
        raise bad_request(f"{name}: {moment.isoformat()} lies outside the range of times") from None


def time_range(
    start: datetime | None,
    end: datetime | None,
    *,
    default: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> TimeRange:
    """[start, end); both default so the range is the last ``default`` (A1: the last hour)."""
    now = now or datetime.now(UTC)
    end_utc = to_utc(end, "end_time") if end is not None else None
    start_utc = to_utc(start, "start_time") if start is not None else None
    try:
        if end_utc is None:
            end_utc = now if start_utc is None or start_utc < now else start_utc + default
        if start_utc is None:
            start_utc = end_utc - default
    except OverflowError:
        raise bad_request("start_time/end_time: the range reaches outside the range of times") from None
    if end_utc <= start_utc:
        raise bad_request(
            f"end_time {end_utc.isoformat()} is not after start_time {start_utc.isoformat()}; "
            "the range is [start_time, end_time)"
        )
    return TimeRange(start_utc, end_utc)


def time_bounds(start: datetime | None, end: datetime | None) -> tuple[datetime | None, datetime | None]:
    """[start, end) where either side may be open (None); both given, checked as :func:`time_range` does."""
    if start is not None and end is not None:
        span = time_range(start, end)
        return span.start, span.end
    return (
        to_utc(start, "start_time") if start is not None else None,
        to_utc(end, "end_time") if end is not None else None,
    )


MAX_CURSOR = 2**63 - 1
_CURSOR = re.compile(r"[1-9][0-9]{0,18}")


def cursor(text: str | None) -> int | None:
    """A page cursor, as the previous page's ``next_cursor`` gave it (the id its rows continue below)."""
    if text is None:
        return None
    if not _CURSOR.fullmatch(text) or int(text) > MAX_CURSOR:
        raise bad_request(f"cursor: {text[:50]!r} is not a cursor; pass the next_cursor of the previous page")
    return int(text)


@dataclass(frozen=True)
class Interval:
    text: str
    tier: Tier | None
    """The rollup tier that holds buckets of this interval, or None: computed from raw samples."""
    step: timedelta | None
    """The bucket width when computed from raw samples."""


def parse_duration(text: str, name: str) -> timedelta:
    """A positive duration: ``30s``, ``5m``, ``2h``, ``1d``, ``1w``, ``1h30m``."""
    try:
        value = durations.parse_duration(text)
    except durations.InvalidDuration:
        raise bad_request(f"{name}: {text[:50]!r} is not a duration such as 30s, 5m, 2h, 1d or 1w") from None
    if value <= timedelta(0):
        raise bad_request(f"{name}: {text!r} is not a positive duration")
    return value


def parse_interval(text: str) -> Interval:
    cleaned = text.strip().lower()
    if cleaned in WORDS:
        return Interval(cleaned, WORDS[cleaned], None)
    try:
        step = durations.parse_duration(cleaned)
    except durations.InvalidDuration:
        raise bad_request(f"interval: {text[:50]!r} is not an interval; {INTERVAL_HELP}") from None
    if step == timedelta(hours=1):
        return Interval(cleaned, "hour", None)
    if step == timedelta(days=1):
        return Interval(cleaned, "day", None)
    if step < timedelta(seconds=1) or step > timedelta(days=1):
        raise bad_request(f"interval: {text[:50]!r} is out of range; {INTERVAL_HELP}")
    return Interval(cleaned, None, step)


def parse_matchers(item: str | Mapping[str, Any], where: str) -> tuple[Matcher, ...]:
    """The matchers of one item of a silence's list: a ``{"name", "op", "value"}`` object (op defaults to
    ``=``), one matcher's text such as ``host=~"gpu-.*"``, or a list in braces ``{host="a", gpu="0"}``.
    The grammar is the notifier's (bus/matchers.py); values are limited as label values are here."""
    try:
        matchers = matchers_of([item])
    except InvalidMatcher as exc:
        raise bad_request(f"{where}: {str(exc)[:300]}") from None
    for matcher in matchers:
        if not MATCHER_LABEL.fullmatch(matcher.name):
            raise bad_request(f"{where}: {matcher.name[:100]!r} is not a label name")
        if "\x00" in matcher.value or len(matcher.value) > MAX_LABEL_VALUE:
            raise bad_request(f"{where}: the value is longer than {MAX_LABEL_VALUE} or has a NUL")
    return matchers
