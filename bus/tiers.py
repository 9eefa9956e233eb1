"""The rollup tiers (hour -> day -> month -> year: calendar buckets in UTC) and their bucket arithmetic,
shared by the stream processors (streams/runtime/buckets.py) and the API (api/params.py, api/sql.py); ``1h``,
``1d``, ``1mo`` and ``1y`` are the tiers' other names in requests.

Times are integer milliseconds since the Unix epoch (what the Avro records carry), so bucket arithmetic is
exact and cheap; :func:`to_ms` and :func:`from_ms` convert to and from tz-aware datetimes."""

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
    "WORDS",
    "Tier",
    "bucket_end",
    "bucket_start",
    "from_ms",
    "to_ms",
]

Tier = Literal["hour", "day", "month", "year"]
TIERS: tuple[Tier, ...] = ("hour", "day", "month", "year")
PARENT: Mapping[Tier, Tier | None] = {"hour": "day", "day": "month", "month": "year", "year": None}
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WORDS: Mapping[str, Tier] = {
    **{tier: tier for tier in TIERS},
    "1h": "hour",
    "1d": "day",
    "1mo": "month",
    "1y": "year",
}
"""Every name of a tier in a request."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of a tz-aware datetime (naive ones are refused, not guessed)."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: event times must be tz-aware UTC")
    # Float seconds carry milliseconds closely enough that rounding recovers them exactly.
    return round(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


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
