"""The value rules every producer and processor applies beyond the Avro types."""

from __future__ import annotations

import math

import pytest

from bus.validation import InvalidRecord, check, problems


def test_a_valid_record_has_no_problems() -> None:
    value = {
        "utilization_percent": 99.5,
        "memory_used_bytes": 0,
        "temperature_celsius": -5.0,  # no rule on temperatures: a cold room is not an error
        "processes": [{"pid": 1, "used_memory_bytes": 10}],
        "labels": {"note_percent": "500"},
    }
    assert problems(value) == []


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("utilization_percent", 100.01, "above 100"),
        ("utilization_percent", -0.5, "below 0"),
        ("sum_seconds", -1.0, "below 0"),
        ("pcie_tx_bytes_per_second", -3, "below 0"),
        ("power_watts", math.nan, "not a finite number"),
        ("energy_joules", math.inf, "not a finite number"),
        ("count", -1, "below 0"),
    ],
)
def test_each_rule_names_field_and_reason(field: str, value: float, why: str) -> None:
    found = problems({field: value})
    assert len(found) == 1
    assert found[0].startswith(f"{field}: ") and why in found[0]


def test_nested_items_are_named_by_their_path() -> None:
    found = problems({"disks": [{"used_bytes": 1}, {"used_bytes": -1}]})
    assert found == ["disks[1].used_bytes: -1 is below 0"]


def test_budget_use_may_exceed_100_percent() -> None:
    assert problems({"budget_utilization_percent": 180.0}) == []
    assert problems({"budget_utilization_percent": -1.0}) != []


def test_booleans_are_not_numbers() -> None:
    assert problems({"ready": True, "count": False}) == []


def test_check_raises_with_every_problem() -> None:
    with pytest.raises(InvalidRecord) as raised:
        check("GpuSample", {"utilization_percent": 120.0, "power_watts": -1.0})
    assert raised.value.problems == [
        "utilization_percent: 120.0 is above 100",
        "power_watts: -1.0 is below 0",
    ]
    assert "GpuSample" in raised.value.reason


def test_label_values_have_a_bounded_length() -> None:
    from bus.validation import MAX_LABEL_LENGTH, Validator

    fine = {"host": "h" * MAX_LABEL_LENGTH, "reason": "r" * 10_000, "labels": {"a": "x" * MAX_LABEL_LENGTH}}
    assert problems(fine) == []
    long_host = problems({"host": "h" * (MAX_LABEL_LENGTH + 1)})
    assert long_host == [f"host: a label value of 257 characters is longer than {MAX_LABEL_LENGTH}"]
    assert problems({"labels": {"job": "j" * 1_000_000}})[0].startswith(
        "labels.job: a label value of 1000000"
    )
    assert problems({"disks": [{"mountpoint": "/" * 300}]})[0].startswith("disks[0].mountpoint:")
    validator = Validator()
    gpu = {"time": 0, "host": "h", "gpu": 0, "gpu_uuid": "u", "gpu_model": "m", "source": "s"}
    assert validator.problems("GpuSample", gpu) == []
    assert validator.problems("GpuSample", dict(gpu, gpu_uuid="u" * 300)) != []
    rollup = {"series": "s", "metric": "m", "labels": {"host": "h" * 300}}
    assert validator.problems("Rollup", rollup) == [
        "labels.host: a label value of 300 characters is longer than 256"
    ]


def test_event_times_too_far_ahead_are_refused_and_the_past_is_not() -> None:
    from datetime import UTC, datetime, timedelta

    from bus.validation import EventTimeGuard

    now = datetime(2026, 12, 2, 12, tzinfo=UTC)
    guard = EventTimeGuard(300.0, clock=now.timestamp)
    assert guard.problem(now + timedelta(seconds=300)) is None
    assert guard.problem(now - timedelta(days=400)) is None
    reason = guard.problem(now + timedelta(days=365))
    assert reason is not None and "ahead of this process's clock" in reason and "300 s" in reason
    assert guard.columns_ok(int((now.timestamp() + 300) * 1000))
    assert not guard.columns_ok(int((now.timestamp() + 301) * 1000))
    with pytest.raises(ValueError):
        EventTimeGuard(0)
