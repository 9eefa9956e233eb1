"""/recommendations against a real PostgreSQL: hourly cost and budget figures inserted as the sink writes
them (the costs table of consumers/migrations is the contract), the app over TestClient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from aima_metrics.recommend_commands import recommend
from api import auth
from api.app import create_app
from api.config import ApiSettings
from bus.settings import Settings

pytestmark = pytest.mark.integration

HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


@pytest.fixture
def client(settings: Settings, db_schema: str) -> Iterator[TestClient]:
    app = create_app(settings, schema=db_schema, config=ApiSettings.from_environ({}))
    with TestClient(app) as test_client:
        yield test_client


def _gpu_hours(db: psycopg.Connection[Any], project: str, hours_ago: int, gpus: float, idle: float) -> None:
    at = HOUR - timedelta(hours=hours_ago)
    db.execute(
        """INSERT INTO costs (time, period_end, kind, project, gpu_model, provider, pricing, gpu_hours,
                              idle_gpu_hours, cost_estimated_eur, currency, source, emitted_at)
           VALUES (%s, %s, 'gpu_hours', %s, 'H100', 'aws', 'on_demand', %s, %s, %s, 'EUR', 'stream',
                   now())""",
        (at, at + timedelta(hours=1), project, gpus, idle, gpus * 3.0),
    )


def _budget(db: psycopg.Connection[Any], project: str, spent_percent: float, forecast: float) -> None:
    month = HOUR.replace(day=1, hour=0)
    db.execute(
        """INSERT INTO costs (time, period_end, kind, project, budget, budget_eur, budget_utilization_percent,
                              forecast_eur, currency, source, emitted_at)
           VALUES (%s, %s, 'budget', %s, 'monthly', 100, %s, %s, 'EUR', 'stream', now())""",
        (month, month + timedelta(days=31), project, spent_percent, forecast),
    )


def test_idle_gpus_and_budget_overruns_are_recommended_per_project(
    client: TestClient, db: psycopg.Connection[Any], settings: Settings, db_schema: str
) -> None:
    for hours_ago in range(1, 25):
        _gpu_hours(db, "p1", hours_ago, gpus=2.0, idle=1.5)  # 75 % idle: listed
        _gpu_hours(db, "p2", hours_ago, gpus=4.0, idle=0.4)  # 10 % idle: not listed
    _gpu_hours(db, "p1", 30, gpus=2.0, idle=2.0)  # outside the 24 h window
    _budget(db, "p1", 40.0, 80.0)
    _budget(db, "p2", 90.0, 150.0)
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    user = {"Authorization": f"Bearer {auth.create_token(db, 'user', [], ['p1'], name='alice')[1]}"}

    body = client.get("/recommendations", headers=admin).json()
    assert [row["project"] for row in body["idle_gpus"]] == ["p1"]
    idle = body["idle_gpus"][0]
    assert idle["idle_gpu_hours"] == pytest.approx(36.0)
    assert idle["idle_share"] == pytest.approx(0.75)
    assert idle["idle_cost_eur_per_day"] == pytest.approx(36.0 * 3.0)  # 24 h window = 1 day
    assert [(b["project"], b["over_budget"]) for b in body["budgets"]] == [("p2", True), ("p1", False)]
    assert body["budgets"][0]["overrun_eur"] == pytest.approx(50.0)

    mine = client.get("/recommendations", headers=user).json()
    assert [row["project"] for row in mine["idle_gpus"]] == ["p1"]
    assert [b["project"] for b in mine["budgets"]] == ["p1"]
    assert client.get("/recommendations").status_code == 401

    # The CLI reads the same figures straight from the database (the fleet's view, or --project).
    env = {"AIMA_DATABASE_URL": settings.database_dsn()}
    runner = CliRunner()
    report = runner.invoke(recommend, ["--schema", db_schema], env=env)
    assert report.exit_code == 0, report.output
    assert "p1 aws/H100 (on_demand): 36.0 idle GPU h (75%), 108.00 EUR/day wasted" in report.output
    assert "p2/monthly: spent 90.00, forecast 150.00 of 100.00 EUR: OVER by 50.00" in report.output
    as_json = runner.invoke(recommend, ["--schema", db_schema, "--json", "--project", "p2"], env=env)
    assert as_json.exit_code == 0, as_json.output
    only_p2 = json.loads(as_json.output)
    assert only_p2["idle_gpus"] == [] and [b["project"] for b in only_p2["budgets"]] == ["p2"]


def test_nothing_is_recommended_on_an_empty_fleet(client: TestClient, db: psycopg.Connection[Any]) -> None:
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    body = client.get("/recommendations", headers=admin).json()
    assert body["idle_gpus"] == [] and body["budgets"] == []
