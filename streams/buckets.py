"""Calendar buckets of the rollup tiers (hour -> day -> month -> year, UTC, event time), and parsing series
ids back into metric and labels.

Times are integer milliseconds since the Unix epoch (what the Avro records carry), so bucket arithmetic is
exact and cheap; :func:`to_ms` and :func:`from_ms` convert to and from tz-aware datetimes. Every function
here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "PARENT",
    "TIERS",
    "Tier",
    "bucket_end",
    "bucket_start",
    "deadline",
    "from_ms",
    "iso",
    "parse_series",
    "to_ms",
]

Tier = Literal["hour", "day", "month", "year"]
TIERS: tuple[Tier, ...] = ("hour", "day", "month", "year")
PARENT: Mapping[Tier, Tier | None] = {"hour": "day", "day": "month", "month": "year", "year": None}
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of a tz-aware datetime (naive ones are refused, not guessed)."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: event times must be tz-aware UTC")
    # Float seconds carry milliseconds closely enough that rounding recovers them exactly.
    return round(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def iso(ms: int) -> str:
    """``2026-01-31T23:00:00Z``, or with milliseconds when the time has any."""
    moment = from_ms(ms)
    spec = "milliseconds" if ms % 1000 else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def bucket_start(tier: Tier, ms: int) -> int:
    """Start (inclusive) of the ``tier`` bucket that holds the instant ``ms``."""
    if tier == "hour":
        return ms - ms % HOUR_MS
    if tier == "day":
        return ms - ms % DAY_MS
    day = ms - ms % DAY_MS
    if tier == "month":
        return _month_start(day)
    if tier == "year":
        return _year_start(day)
    raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")


def bucket_end(tier: Tier, start: int) -> int:
    """End (exclusive) of the ``tier`` bucket that starts at ``start``."""
    if tier == "hour":
        return start + HOUR_MS
    if tier == "day":
        return start + DAY_MS
    if tier == "month":
        return _next_month(start)
    if tier == "year":
        return _next_year(start)
    raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")


def deadline(tier: Tier, start: int, lateness_ms: int) -> int:
    """The watermark at which the bucket becomes final: its end plus the allowed lateness. Upper tiers
    close when their last hour does, so the same lateness applies to every tier."""
    return bucket_end(tier, start) + lateness_ms


@lru_cache(maxsize=4096)
def _month_start(day_start: int) -> int:
    moment = from_ms(day_start)
    return to_ms(moment.replace(day=1))


@lru_cache(maxsize=512)
def _year_start(day_start: int) -> int:
    moment = from_ms(day_start)
    return to_ms(moment.replace(month=1, day=1))


@lru_cache(maxsize=4096)
def _next_month(start: int) -> int:
    moment = from_ms(start)
    if moment.month == 12:
        return to_ms(moment.replace(year=moment.year + 1, month=1))
    return to_ms(moment.replace(month=moment.month + 1))


@lru_cache(maxsize=512)
def _next_year(start: int) -> int:
    return to_ms(from_ms(start).replace(year=from_ms(start).year + 1))


# -- series ids ---------------------------------------------------------------------------------------------


def parse_series(series: str) -> tuple[str, dict[str, str]]:
    """The inverse of :func:`streams.series.series_id`: (metric, labels)."""
    brace = series.find("{")
    if brace < 0:
        return series, {}
    if not series.endswith("}"):
        raise ValueError(f"not a series id: {series!r}")
    metric, body = series[:brace], series[brace + 1 : -1]
    labels: dict[str, str] = {}
    index = 0
    while index < len(body):
        equals = body.index("=", index)
        name = body[index:equals]
        if body[equals + 1] != '"':
            raise ValueError(f"not a series id: {series!r}")
        value: list[str] = []
        cursor = equals + 2
        while body[cursor] != '"':
            char = body[cursor]
            if char == "\\":
                cursor += 1
                char = "\n" if body[cursor] == "n" else body[cursor]
            value.append(char)
            cursor += 1
        labels[name] = "".join(value)
        index = cursor + 2  # past the closing quote and the comma
    return metric, labels
