"""The one duration grammar (bus/durations.py) and its callers: the rules, the notifier's configuration, the
command line and the API's parameters."""

from __future__ import annotations

from datetime import timedelta

import click
import pytest

from aima_metrics.pipeline_commands import _duration as cli_duration
from api.errors import ApiError
from api.params import parse_duration as api_duration
from api.params import parse_interval
from bus.durations import InvalidDuration, format_duration, parse_duration
from consumers.notify.config import ConfigError
from consumers.notify.config import parse_duration as notify_duration
from streams.alerts.rules import RuleError, parse_rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1w", timedelta(weeks=1)),
        ("1y", timedelta(days=365)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(minutes=90)),
        ("1y2w3d4h5m6s7ms", timedelta(days=365 + 14 + 3, hours=4, minutes=5, seconds=6, milliseconds=7)),
        ("1h 30m", timedelta(minutes=90)),  # the notifier's configuration accepted spaces between terms
        ("1.5h", timedelta(minutes=90)),
        ("30m1h", timedelta(minutes=90)),
        (" 45s ", timedelta(seconds=45)),
        ("0", timedelta(0)),
        (2.5, timedelta(seconds=2.5)),
    ],
)
def test_grammar(text: str | float, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["1", "1mo", "w", "1 w", "1W", "1h-", "-1h", "99999999999y", "1e3s", -3])
def test_grammar_refuses(text: object) -> None:
    with pytest.raises(InvalidDuration, match="bad duration"):
        parse_duration(text)


def test_format() -> None:
    assert [format_duration(timedelta(seconds=s)) for s in (0, 90, 3600, 604800, 1.5)] == [
        "0s",
        "90s",
        "1h",
        "1w",
        "1.5s",
    ]


def test_one_week_works_everywhere() -> None:
    week = timedelta(weeks=1)
    assert cli_duration("1w") == week
    assert api_duration("1w", "duration") == week
    assert notify_duration("1w", "route.group_interval") == week.total_seconds()
    (rule,) = parse_rules(
        "rules:\n  - {name: Hot, metric: gpu_temperature_celsius, condition: gt, threshold: 85,"
        " severity: critical, for: 1w}\n"
    )
    assert rule.for_ == week


def test_callers_name_what_is_wrong() -> None:
    with pytest.raises(click.BadParameter, match="bad duration '10x'"):
        cli_duration("10x")
    with pytest.raises(ApiError, match="duration: 'soon' is not a duration"):
        api_duration("soon", "duration")
    with pytest.raises(ApiError, match="not a positive duration"):
        api_duration("0s", "duration")
    with pytest.raises(ConfigError, match=r"route\.repeat_interval: '4 h' is not a duration"):
        notify_duration("4 h", "route.repeat_interval")
    with pytest.raises(RuleError, match="field 'for': bad duration '1 w'"):
        parse_rules(
            "rules:\n  - {name: Hot, metric: gpu_temperature_celsius, condition: gt, threshold: 85,"
            " severity: critical, for: 1 w}\n"
        )


@pytest.mark.parametrize(
    ("text", "tier", "step"),
    [
        ("1h", "hour", None),
        ("60m", "hour", None),
        ("24h", "day", None),
        ("1mo", "month", None),
        ("year", "year", None),
        ("1h30m", None, timedelta(minutes=90)),
        ("5m", None, timedelta(minutes=5)),
    ],
)
def test_api_intervals(text: str, tier: str | None, step: timedelta | None) -> None:
    interval = parse_interval(text)
    assert (interval.tier, interval.step) == (tier, step)


@pytest.mark.parametrize("text", ["1w", "500ms", "0m", "3d"])
def test_api_intervals_out_of_range(text: str) -> None:
    with pytest.raises(ApiError, match="out of range"):
        parse_interval(text)
