"""Calendar bucket arithmetic of the rollup tiers, and series ids, against hand-computed values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streams.runtime.buckets import (
    DAY_MS,
    HOUR_MS,
    PARENT,
    TIERS,
    bucket_end,
    bucket_start,
    deadline,
    from_ms,
    iso,
    parse_series,
    to_ms,
)
from streams.runtime.series import series_id


def ms(*args: int) -> int:
    return to_ms(datetime(*args, tzinfo=UTC))


def test_ms_round_trip_and_iso() -> None:
    moment = datetime(2026, 3, 2, 13, 45, 7, 123000, tzinfo=UTC)
    assert to_ms(moment) == 1772459107123
    assert from_ms(1772459107123) == moment
    assert iso(ms(2026, 1, 31, 23)) == "2026-01-31T23:00:00Z"
    assert iso(1772459107123) == "2026-03-02T13:45:07.123Z"
    assert to_ms(datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)) == -1


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        to_ms(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("tier", "instant", "start", "end"),
    [
        ("hour", (2026, 3, 2, 13, 59, 59), (2026, 3, 2, 13), (2026, 3, 2, 14)),
        ("hour", (2026, 12, 31, 23, 30), (2026, 12, 31, 23), (2027, 1, 1)),
        ("day", (2026, 3, 2, 0, 0, 0), (2026, 3, 2), (2026, 3, 3)),
        ("day", (2026, 2, 28, 23, 59), (2026, 2, 28), (2026, 3, 1)),
        ("month", (2026, 1, 31, 23, 59, 59), (2026, 1, 1), (2026, 2, 1)),
        ("month", (2026, 2, 14), (2026, 2, 1), (2026, 3, 1)),
        ("month", (2028, 2, 29, 12), (2028, 2, 1), (2028, 3, 1)),  # leap year
        ("month", (2026, 12, 31, 23), (2026, 12, 1), (2027, 1, 1)),
        ("year", (2026, 12, 31, 23, 59, 59), (2026, 1, 1), (2027, 1, 1)),
        ("year", (2028, 7, 1), (2028, 1, 1), (2029, 1, 1)),
    ],
)
def test_bucket_start_and_end(
    tier: str, instant: tuple[int, ...], start: tuple[int, ...], end: tuple[int, ...]
) -> None:
    begins = bucket_start(tier, ms(*instant))  # type: ignore[arg-type]
    assert begins == ms(*start)
    assert bucket_end(tier, begins) == ms(*end)  # type: ignore[arg-type]


def test_bucket_lengths_follow_the_calendar() -> None:
    assert bucket_end("month", ms(2026, 2, 1)) - ms(2026, 2, 1) == 28 * DAY_MS
    assert bucket_end("month", ms(2028, 2, 1)) - ms(2028, 2, 1) == 29 * DAY_MS
    assert bucket_end("year", ms(2028, 1, 1)) - ms(2028, 1, 1) == 366 * DAY_MS
    assert bucket_end("hour", ms(2026, 3, 29, 1)) - ms(2026, 3, 29, 1) == HOUR_MS  # UTC: no DST


def test_every_bucket_holds_its_start_and_not_its_end() -> None:
    for tier in TIERS:
        start = bucket_start(tier, ms(2026, 5, 17, 9, 30))
        end = bucket_end(tier, start)
        assert bucket_start(tier, start) == start
        assert bucket_start(tier, end - 1) == start
        assert bucket_start(tier, end) == end
        parent = PARENT[tier]
        if parent is not None:  # a child bucket never straddles its parent's edge
            assert bucket_start(parent, start) == bucket_start(parent, end - 1)


def test_deadline_is_end_plus_lateness_for_every_tier() -> None:
    ten_minutes = int(timedelta(minutes=10).total_seconds() * 1000)
    assert deadline("hour", ms(2026, 1, 1, 5), ten_minutes) == ms(2026, 1, 1, 6, 10)
    assert deadline("day", ms(2026, 1, 31), ten_minutes) == ms(2026, 2, 1, 0, 10)
    assert deadline("year", ms(2026, 1, 1), ten_minutes) == ms(2027, 1, 1, 0, 10)


def test_unknown_tier() -> None:
    with pytest.raises(ValueError, match="unknown tier"):
        bucket_start("week", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "labels",
    [
        {"host": "a", "gpu": "0", "gpu_uuid": "GPU-1"},
        {"mountpoint": "/data", "host": "h"},
        {"kernel": 'gemm<"f16">\\x', "job_id": "j\n1"},
        {"host": "a,b=c{d}"},
        {},
    ],
)
def test_parse_series_inverts_series_id(labels: dict[str, str]) -> None:
    series = series_id("gpu_power_watts", labels)
    assert parse_series(series) == ("gpu_power_watts", labels)


def test_series_id_format() -> None:
    assert series_id("gpu_power_watts", {"host": "a", "gpu": "0"}) == 'gpu_power_watts{gpu="0",host="a"}'
