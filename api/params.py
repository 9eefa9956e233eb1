"""Parsing and validation of request parameters: metric names, label selectors, time ranges, intervals and
silence matchers. Each function raises :class:`~api.errors.ApiError` (400, or 404 for an unknown metric)
whose detail names the parameter and says what is wrong with it."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from api.errors import ApiError, bad_request
from bus import catalogue
from bus.catalogue import Metric

__all__ = [
    "Interval",
    "TimeRange",
    "label_selector",
    "metric",
    "parse_duration",
    "parse_interval",
    "parse_matcher",
    "time_range",
]

Tier = Literal["hour", "day", "month", "year"]
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_LABEL_VALUE = 1024
_DURATION = re.compile(r"(?P<n>\d{1,9})(?P<unit>s|m|h|d|w)")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TIER_WORDS: dict[str, Tier] = {
    "hour": "hour",
    "1h": "hour",
    "day": "day",
    "1d": "day",
    "month": "month",
    "1mo": "month",
    "year": "year",
    "1y": "year",
}
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


@dataclass(frozen=True)
class Interval:
    text: str
    tier: Tier | None
    """The rollup tier that holds buckets of this interval, or None: computed from raw samples."""
    step: timedelta | None
    """The bucket width when computed from raw samples."""


def parse_duration(text: str, name: str) -> timedelta:
    """``30s``, ``5m``, ``2h``, ``1d``, ``1w``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise bad_request(f"{name}: {text[:50]!r} is not a duration such as 30s, 5m, 2h, 1d or 1w")
    seconds = int(match["n"]) * _SECONDS[match["unit"]]
    if seconds <= 0:
        raise bad_request(f"{name}: {text!r} is not a positive duration")
    return timedelta(seconds=seconds)


def parse_interval(text: str) -> Interval:
    cleaned = text.strip().lower()
    if cleaned in _TIER_WORDS:
        return Interval(cleaned, _TIER_WORDS[cleaned], None)
    match = _DURATION.fullmatch(cleaned)
    if match is None:
        raise bad_request(f"interval: {text[:50]!r} is not an interval; {INTERVAL_HELP}")
    step = timedelta(seconds=int(match["n"]) * _SECONDS[match["unit"]])
    if step == timedelta(hours=1):
        return Interval(cleaned, "hour", None)
    if step == timedelta(days=1):
        return Interval(cleaned, "day", None)
    if step <= timedelta(0) or step > timedelta(days=1):
        raise bad_request(f"interval: {text[:50]!r} is out of range; {INTERVAL_HELP}")
    return Interval(cleaned, None, step)


_MATCHER = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>.*?)\s*$")
MATCHER_OPS = ("=", "!=", "=~", "!~")


def parse_matcher(item: str | Mapping[str, Any], where: str) -> dict[str, str]:
    """A silence matcher as stored: ``{"name", "op", "value"}``, from that form or the text form
    ``host=~"gpu-.*"``. The same rules as the notifier's (consumers/notify/matchers.py): a label name, one of
    =, !=, =~, !~, and a regular expression (Python syntax, anchored at both ends) for =~ and !~."""
    if isinstance(item, str):
        match = _MATCHER.match(item)
        if match is None:
            raise bad_request(f"{where}: {item[:100]!r} is not of the form name=value, name!=value, =~ or !~")
        name, op, value = match["name"], match["op"], match["value"]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
    else:
        name, op, value = str(item.get("name", "")), str(item.get("op", "=")), str(item.get("value", ""))
    if not LABEL_NAME.fullmatch(name):
        raise bad_request(f"{where}: {name[:100]!r} is not a label name")
    if op not in MATCHER_OPS:
        raise bad_request(f"{where}: operator {op[:10]!r} is not one of {', '.join(MATCHER_OPS)}")
    if "\x00" in value or len(value) > MAX_LABEL_VALUE:
        raise bad_request(f"{where}: the value is longer than {MAX_LABEL_VALUE} or has a NUL")
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise bad_request(f"{where}: {value[:100]!r} is not a regular expression: {exc}") from None
    return {"name": name, "op": op, "value": value}


def matches_empty(matcher: Mapping[str, str]) -> bool:
    """Whether a matcher matches an alert that lacks its label (a silence of only such matchers mutes
    everything)."""
    op, value = matcher["op"], matcher["value"]
    if op == "=":
        return value == ""
    if op == "!=":
        return value != ""
    found = re.fullmatch(value, "") is not None
    return found if op == "=~" else not found
