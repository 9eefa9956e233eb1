"""Project budgets (S2, M26): the budgets file, utilisation, the linear forecast to the month's end, and
the threshold alerts. Pure functions of event time; the cost processor (streams/costs/jobs.py) calls them.

File format::

    budgets:
      - project: newsroom
        name: gpu                 # a project may have several budgets
        monthly_eur: 5000
        thresholds: [50, 80, 100] # percent of monthly_eur; the default
        forecast_overrun: true    # alert when the forecast exceeds the budget; the default
        channels: [email]         # notification channels of its alerts; default none (the notifier decides)

Periods are calendar months in UTC. The forecast is linear: what was spent by ``now`` divided by the share
of the month that has passed (``spent / elapsed_fraction``); before ``min_elapsed`` of the month has passed
there is too little to go on and the forecast is None. Each threshold fires once per budget and month (it
does not fire again when spending dips and rises), and resolves when the month ends.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.costs.pricing import CatalogueError, load_yaml, read_config
from streams.runtime.findings import fingerprint

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FORECAST_RULE",
    "Budget",
    "BudgetBook",
    "Crossing",
    "alert_event",
    "crossings",
    "elapsed_fraction",
    "linear_forecast",
    "month_bounds",
    "month_label",
    "threshold_rule",
    "utilization_percent",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (50.0, 80.0, 100.0)
FORECAST_RULE = "budget_forecast_overrun"
_KEYS = frozenset({"project", "name", "monthly_eur", "thresholds", "forecast_overrun", "channels"})


@dataclass(frozen=True)
class Budget:
    project: str
    name: str
    monthly_eur: float
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    """Percent of ``monthly_eur``, ascending."""
    forecast_overrun: bool = True
    channels: tuple[str, ...] = ()


@dataclass(frozen=True)
class BudgetBook:
    """Every configured budget, by project."""

    budgets: tuple[Budget, ...] = ()
    _by_project: dict[str, tuple[Budget, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_project: dict[str, list[Budget]] = {}
        for budget in self.budgets:
            by_project.setdefault(budget.project, []).append(budget)
        object.__setattr__(self, "_by_project", {p: tuple(b) for p, b in by_project.items()})

    def for_project(self, project: str) -> tuple[Budget, ...]:
        return self._by_project.get(project, ())

    def current(self) -> BudgetBook:
        """A fixed book is its own current version (the same call as
        :class:`~streams.costs.pricing.Reloading`)."""
        return self

    @classmethod
    def load(cls, path: str | Path) -> BudgetBook:
        return cls.parse(read_config(path), str(path))

    @classmethod
    def parse(cls, text: str | bytes, origin: str = "<budgets>") -> BudgetBook:
        data = load_yaml(text, origin)
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) - {"budgets"}:
            raise CatalogueError(origin, ["top level: must be a mapping with the one key 'budgets'"])
        entries = data.get("budgets") or []
        if not isinstance(entries, list):
            raise CatalogueError(origin, ["budgets: must be a list"])
        problems: list[str] = []
        budgets = [b for i, entry in enumerate(entries) if (b := _budget(i, entry, problems)) is not None]
        seen: set[tuple[str, str]] = set()
        for budget in budgets:
            if (budget.project, budget.name) in seen:
                problems.append(f"budgets: {budget.project}/{budget.name} is defined twice")
            seen.add((budget.project, budget.name))
        if problems:
            raise CatalogueError(origin, problems)
        return cls(tuple(budgets))


def _budget(index: int, entry: Any, problems: list[str]) -> Budget | None:
    at = f"budgets[{index}]"
    if not isinstance(entry, Mapping):
        problems.append(f"{at}: must be a mapping")
        return None
    before = len(problems)
    problems += [
        f"{at}.{key}: unknown key (known: {', '.join(sorted(_KEYS))})" for key in entry if key not in _KEYS
    ]
    for key in ("project", "name"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            problems.append(f"{at}.{key}: must be a non-empty string")
    amount = entry.get("monthly_eur")
    if not _number(amount) or amount <= 0:
        problems.append(f"{at}.monthly_eur: must be a positive number, got {amount!r}")
    thresholds = entry.get("thresholds", list(DEFAULT_THRESHOLDS))
    if (
        not isinstance(thresholds, list)
        or not all(_number(t) and t > 0 for t in thresholds)
        or len(set(thresholds)) != len(thresholds)
    ):
        problems.append(
            f"{at}.thresholds: must be a list of distinct positive percentages, got {thresholds!r}"
        )
    overrun = entry.get("forecast_overrun", True)
    if not isinstance(overrun, bool):
        problems.append(f"{at}.forecast_overrun: must be true or false, got {overrun!r}")
    channels = entry.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
        problems.append(f"{at}.channels: must be a list of channel names, got {channels!r}")
    if len(problems) > before:
        return None
    return Budget(
        entry["project"],
        entry["name"],
        float(amount),
        tuple(sorted(float(t) for t in thresholds)),
        overrun,
        tuple(channels),
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


# -- periods and formulas -------------------------------------------------------------------------------


def month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """Start (inclusive) and end (exclusive) of the UTC calendar month holding ``moment``."""
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def month_label(moment: datetime) -> str:
    """``YYYY-MM`` of the UTC month holding ``moment``."""
    return moment.astimezone(UTC).strftime("%Y-%m")


def elapsed_fraction(month_start: datetime, now: datetime) -> float:
    """Share of the month that has passed at ``now``: 0 at its start, 1 at (and after) its end."""
    _, end = month_bounds(month_start)
    passed = (min(max(now, month_start), end) - month_start) / (end - month_start)
    return float(passed)


def utilization_percent(spent_eur: float, budget_eur: float) -> float:
    """Spent as a share of the budget, in percent (may exceed 100)."""
    return spent_eur / budget_eur * 100.0


def linear_forecast(
    spent_eur: float, month_start: datetime, now: datetime, min_elapsed: timedelta = timedelta(days=1)
) -> float | None:
    """What the month will cost at the rate so far: ``spent / elapsed_fraction``; None before
    ``min_elapsed`` of the month has passed. After the month's end, what was spent."""
    if now - month_start < min_elapsed:
        return None
    return spent_eur / elapsed_fraction(month_start, now)


# -- thresholds -----------------------------------------------------------------------------------------


def threshold_rule(threshold: float) -> str:
    """The alert rule name of a threshold: ``budget_80`` (``budget_12.5`` for a fractional one)."""
    return f"budget_{threshold:g}"


@dataclass(frozen=True)
class Crossing:
    rule: str
    severity: str
    """warning below 100 %, critical at 100 % and above and for a forecast overrun."""
    value: float
    """Utilisation in percent for a threshold, the forecast in EUR for an overrun."""
    threshold_percent: float | None


def crossings(
    budget: Budget, spent_eur: float, forecast_eur: float | None, fired: Collection[str]
) -> list[Crossing]:
    """The rules of ``budget`` that hold now and have not fired yet (``fired``: their rule names)."""
    used = utilization_percent(spent_eur, budget.monthly_eur)
    found = [
        Crossing(threshold_rule(t), "critical" if t >= 100 else "warning", used, t)
        for t in budget.thresholds
        if used >= t and threshold_rule(t) not in fired
    ]
    if (
        budget.forecast_overrun
        and forecast_eur is not None
        and forecast_eur > budget.monthly_eur
        and FORECAST_RULE not in fired
    ):
        found.append(Crossing(FORECAST_RULE, "critical", forecast_eur, None))
    return found


def alert_event(
    budget: Budget,
    month: str,
    rule: str,
    severity: str,
    *,
    status: str,
    starts_at: datetime,
    event_time: datetime,
    value: float | None,
    spent_eur: float,
    forecast_eur: float | None,
    ends_at: datetime | None = None,
) -> dict[str, Any]:
    """An AlertEvent value for one budget rule. The fingerprint hashes the rule and the labels (project,
    budget, month), as every alert of the stream app does (streams.runtime.findings.fingerprint)."""
    labels = {"project": budget.project, "budget": budget.name, "month": month}
    used = utilization_percent(spent_eur, budget.monthly_eur)
    forecast = "n/a" if forecast_eur is None else f"{forecast_eur:.2f}"
    if rule == FORECAST_RULE:
        summary = f"Budget {budget.name} of {budget.project} is forecast to overrun in {month}"
        detail = f"forecast {forecast} EUR exceeds the budget of {budget.monthly_eur:.2f} EUR"
    else:
        summary = (
            f"Budget {budget.name} of {budget.project} reached {rule.removeprefix('budget_')} % in {month}"
        )
        detail = f"spent {spent_eur:.2f} EUR of {budget.monthly_eur:.2f} EUR ({used:.1f} %)"
    annotations = {
        "summary": summary,
        "description": f"{detail}; forecast to the month's end {forecast} EUR",
        "spent_eur": f"{spent_eur:.2f}",
        "budget_eur": f"{budget.monthly_eur:.2f}",
        "utilization_percent": f"{used:.1f}",
        "forecast_eur": forecast,
    }
    return {
        "fingerprint": fingerprint(rule, labels),
        "rule": rule,
        "status": status,
        "severity": severity,
        "starts_at": starts_at,
        "ends_at": ends_at,
        "event_time": event_time,
        "value": value,
        "labels": labels,
        "annotations": annotations,
        "channels": list(budget.channels),
        "source": "stream",
    }
