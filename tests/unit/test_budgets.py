"""Budgets: the file format, month periods, utilisation, the linear forecast and the threshold rules,
against hand-computed values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streams.costs.budgets import (
    FORECAST_RULE,
    Budget,
    BudgetBook,
    alert_event,
    crossings,
    elapsed_fraction,
    linear_forecast,
    month_bounds,
    month_label,
    utilization_percent,
)
from streams.costs.pricing import CatalogueError


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_month_bounds_in_utc() -> None:
    assert month_bounds(at(2025, 4, 17, 13)) == (at(2025, 4, 1), at(2025, 5, 1))
    assert month_bounds(at(2025, 12, 31, 23, 59)) == (at(2025, 12, 1), at(2026, 1, 1))
    assert month_bounds(at(2024, 2, 29)) == (at(2024, 2, 1), at(2024, 3, 1))
    assert month_label(at(2025, 4, 17)) == "2025-04"


def test_elapsed_fraction() -> None:
    start = at(2025, 4, 1)  # April: 30 days
    assert elapsed_fraction(start, start) == 0.0
    assert elapsed_fraction(start, at(2025, 4, 16)) == pytest.approx(15 / 30)
    assert elapsed_fraction(start, at(2025, 5, 3)) == 1.0


def test_utilization() -> None:
    assert utilization_percent(250.0, 1000.0) == 25.0
    assert utilization_percent(1500.0, 1000.0) == 150.0


def test_linear_forecast_to_the_months_end() -> None:
    april = at(2025, 4, 1)  # 30 days
    # 300 EUR by the end of the 10th (11th 00:00): 10 of 30 days passed -> 300 / (1/3) = 900
    assert linear_forecast(300.0, april, at(2025, 4, 11)) == pytest.approx(900.0)
    # 300 EUR by the 10th 00:00: 9 of 30 days passed -> 300 / 0.3 = 1000
    assert linear_forecast(300.0, april, at(2025, 4, 10)) == pytest.approx(1000.0)
    # February 2024 (29 days), 58 EUR by the 3rd 00:00: 2 of 29 days -> 58 * 29 / 2 = 841
    assert linear_forecast(58.0, at(2024, 2, 1), at(2024, 2, 3)) == pytest.approx(841.0)
    # after the month's end: what was spent
    assert linear_forecast(300.0, april, at(2025, 5, 2)) == pytest.approx(300.0)


def test_no_forecast_before_the_minimum_elapsed_time() -> None:
    april = at(2025, 4, 1)
    assert linear_forecast(5.0, april, at(2025, 4, 1, 0, 6)) is None
    assert linear_forecast(5.0, april, at(2025, 4, 1, 0, 6), min_elapsed=timedelta(0)) == pytest.approx(
        5.0 * 30 * 24 * 10
    )
    assert linear_forecast(5.0, april, at(2025, 4, 2)) == pytest.approx(150.0)


BUDGET = Budget("newsroom", "gpu", 1000.0)


def rules(found: list) -> list[str]:
    return [c.rule for c in found]


def test_thresholds_fire_once_each() -> None:
    fired: set[str] = set()
    assert crossings(BUDGET, 400.0, 900.0, fired) == []
    first = crossings(BUDGET, 550.0, 950.0, fired)
    assert rules(first) == ["budget_50"]
    assert first[0].severity == "warning" and first[0].value == pytest.approx(55.0)
    fired |= set(rules(first))
    assert crossings(BUDGET, 600.0, 950.0, fired) == []  # 50 % already fired
    jump = crossings(BUDGET, 1100.0, 1500.0, fired)  # several at once
    assert rules(jump) == ["budget_80", "budget_100", FORECAST_RULE]
    assert [c.severity for c in jump] == ["warning", "critical", "critical"]
    assert jump[2].value == 1500.0 and jump[2].threshold_percent is None
    fired |= set(rules(jump))
    assert crossings(BUDGET, 2000.0, 3000.0, fired) == []


def test_forecast_overrun_needs_a_forecast_above_the_budget() -> None:
    assert crossings(BUDGET, 10.0, None, set()) == []
    assert crossings(BUDGET, 10.0, 1000.0, set()) == []  # equal is no overrun
    assert rules(crossings(BUDGET, 10.0, 1000.01, set())) == [FORECAST_RULE]
    quiet = Budget("p", "b", 1000.0, forecast_overrun=False)
    assert crossings(quiet, 10.0, 5000.0, set()) == []


def test_alert_event_fingerprint_is_stable_per_rule_project_budget_month() -> None:
    def event(rule: str = "budget_80", month: str = "2025-04", budget: Budget = BUDGET) -> dict:
        return alert_event(
            budget,
            month,
            rule,
            "warning",
            status="firing",
            starts_at=at(2025, 4, 20),
            event_time=at(2025, 4, 20),
            value=82.0,
            spent_eur=820.0,
            forecast_eur=1230.0,
        )

    first = event()
    assert first["fingerprint"] == event()["fingerprint"]
    assert (
        len(
            {
                first["fingerprint"],
                event(rule="budget_50")["fingerprint"],
                event(month="2025-05")["fingerprint"],
                event(budget=Budget("newsroom", "other", 1000.0))["fingerprint"],
            }
        )
        == 4
    )
    assert first["labels"] == {"project": "newsroom", "budget": "gpu", "month": "2025-04"}
    assert first["annotations"]["spent_eur"] == "820.00"
    assert first["annotations"]["utilization_percent"] == "82.0"
    assert first["annotations"]["forecast_eur"] == "1230.00"
    assert "80 %" in first["annotations"]["summary"]
    assert first["source"] == "stream" and first["ends_at"] is None


def test_budgets_file_with_defaults() -> None:
    book = BudgetBook.parse(
        """
budgets:
  - {project: newsroom, name: gpu, monthly_eur: 5000}
  - {project: newsroom, name: spot, monthly_eur: 800.5, thresholds: [90, 25], forecast_overrun: false,
     channels: [email]}
  - {project: archive, name: gpu, monthly_eur: 100}
"""
    )
    gpu, spot = book.for_project("newsroom")
    assert gpu == Budget("newsroom", "gpu", 5000.0, (50.0, 80.0, 100.0), True, ())
    assert spot == Budget("newsroom", "spot", 800.5, (25.0, 90.0), False, ("email",))
    assert book.for_project("nobody") == ()
    assert BudgetBook.parse("").budgets == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("budget: []", "one key 'budgets'"),
        ("budgets: {a: 1}", "budgets: must be a list"),
        ("budgets: [{project: p, name: b, monthly_eur: 0}]", "monthly_eur: must be a positive number"),
        ("budgets: [{project: p, monthly_eur: 5}]", "budgets[0].name: must be a non-empty string"),
        ("budgets: [{project: p, name: b, monthly_eur: 5, thresholds: [50, 50]}]", "distinct positive"),
        ("budgets: [{project: p, name: b, monthly_eur: 5, thresholds: 50}]", "thresholds"),
        ("budgets: [{project: p, name: b, monthly_eur: 5, forecast_overrun: yes please}]", "true or false"),
        ("budgets: [{project: p, name: b, monthly_eur: 5, limit: 3}]", "limit: unknown key"),
        ("budgets: [{project: p, name: b, monthly_eur: 5}, {project: p, name: b, monthly_eur: 6}]", "twice"),
    ],
)
def test_bad_budget_files_are_rejected(text: str, problem: str) -> None:
    with pytest.raises(CatalogueError) as caught:
        BudgetBook.parse(text, "budgets.yaml")
    assert problem in str(caught.value)
