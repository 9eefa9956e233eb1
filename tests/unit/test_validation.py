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
