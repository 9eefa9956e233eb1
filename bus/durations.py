"""Durations, the one grammar of alert rules, the notifier's configuration, the API and the command line:
Prometheus' and Alertmanager's units (``ms s m h d w y``; a year is 365 days, a week 7) in compound terms
such as ``1h30m``, or ``0``.

Kept from this project's earlier parsers, beyond Prometheus: a term may have a fraction (``1.5h``), terms
may come in any order and be separated by white space (``1h 30m``), and a number (from YAML or JSON) is
seconds."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Any

__all__ = ["InvalidDuration", "format_duration", "parse_duration"]

UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_TERM = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)\s*")
EXAMPLES = "0, 30s, 10m, 1h30m, 1d or 1w"


class InvalidDuration(ValueError):
    """A value that is not a duration, or one too long to represent."""


def parse_duration(value: Any) -> timedelta:
    """``0``, ``30s``, ``10m``, ``1h30m``, ``500ms``, ``1d``, ``1w``, ``1y``, or a number of seconds; never
    negative."""
    if isinstance(value, bool):
        raise InvalidDuration(f"bad duration {value!r}: use e.g. {EXAMPLES}")
    try:
        if isinstance(value, int | float):
            if value < 0 or not math.isfinite(value):
                raise InvalidDuration(f"bad duration {value!r}: must be a finite number of seconds >= 0")
            return timedelta(seconds=value)
        if isinstance(value, str):
            text = value.strip()
            if text == "0":
                return timedelta(0)
            terms, end = [], 0
            while end < len(text) and (term := _TERM.match(text, end)):
                terms.append(term)
                end = term.end()
            if terms and end == len(text):
                # Whole seconds and milliseconds apart so that long spans stay exact.
                return sum((_term(term[1], term[2]) for term in terms), timedelta(0))
    except OverflowError:
        raise InvalidDuration(f"bad duration {value!r}: too long") from None
    raise InvalidDuration(f"bad duration {value!r}: use e.g. {EXAMPLES}")


def format_duration(value: timedelta) -> str:
    """The largest unit that divides the duration: ``90s`` -> ``90s``, ``3600s`` -> ``1h``."""
    seconds = value.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        if seconds and seconds % UNIT_S[unit] == 0:
            return f"{int(seconds // UNIT_S[unit])}{unit}"
    return f"{seconds:g}s"


def _term(number: str, unit: str) -> timedelta:
    if unit == "ms":
        return timedelta(milliseconds=float(number))
    if "." in number:
        return timedelta(seconds=float(number) * UNIT_S[unit])
    return timedelta(seconds=int(number) * UNIT_S[unit])
