"""Calendar buckets of the rollup tiers for the stream processors (hour -> day -> month -> year, UTC, event
time): the tiers and their arithmetic from bus/tiers.py (shared with the API), the deadline at which a
bucket becomes final, and parsing series ids back into metric and labels.

Times are integer milliseconds since the Unix epoch (what the Avro records carry). Every function here is
pure.
"""

from __future__ import annotations

from bus.tiers import (
    DAY_MS,
    HOUR_MS,
    PARENT,
    TIERS,
    Tier,
    bucket_end,
    bucket_start,
    from_ms,
    to_ms,
)

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


def iso(ms: int) -> str:
    """``2026-01-31T23:00:00Z``, or with milliseconds when the time has any."""
    moment = from_ms(ms)
    spec = "milliseconds" if ms % 1000 else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def deadline(tier: Tier, start: int, lateness_ms: int) -> int:
    """The watermark at which the bucket becomes final: its end plus the allowed lateness. Upper tiers
    close when their last hour does, so the same lateness applies to every tier."""
    return bucket_end(tier, start) + lateness_ms


# -- series ids ---------------------------------------------------------------------------------------------


def parse_series(series: str) -> tuple[str, dict[str, str]]:
    """The inverse of :func:`streams.runtime.series.series_id`: (metric, labels)."""
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
