"""Property-based run of the API's own OpenAPI document (schemathesis): examples generated for every
operation but the event stream, valid ones and deliberately invalid ones, sent with an admin token to the
app over a real database schema holding a few rows. No answer may be a 5xx (``not_a_server_error``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from psycopg_pool import ConnectionPool
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api import auth
from api.app import create_app
from api.config import ApiSettings
from bus.settings import Settings

pytestmark = pytest.mark.integration

EXAMPLES_PER_MODE = 50
"""Per operation and generation mode: 12 operations x 2 modes x 50 examples run in about half a minute."""


@pytest.fixture
def pool(database_url: str, db_schema: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(
        database_url,
        min_size=1,
        max_size=4,
        kwargs={"autocommit": True, "options": f"-c search_path={db_schema},public"},
    ) as opened:
        yield opened


@pytest.fixture
def some_rows(db: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    for i in range(20):
        db.execute(
            """INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group,
                                        utilization_percent, power_watts)
               VALUES (%s, 'h1', 0, 'GPU-1', 'H100', 'nvml', '10s', %s, %s)""",
            (now - timedelta(seconds=30 * i), float(i), 100.0 + i),
        )
    db.execute(
        """INSERT INTO alert_history (fingerprint, rule, status, severity, starts_at, event_time, value,
                                      labels, annotations, channels, source)
           VALUES ('f1', 'HotGpu', 'firing', 'critical', %s, %s, 91, '{"host": "h1"}', '{}', '{webhook}',
                   'stream')""",
        (now, now),
    )


def test_no_generated_request_gets_a_server_error(
    settings: Settings,
    db_schema: str,
    db: psycopg.Connection[Any],
    pool: ConnectionPool[Any],
    some_rows: None,
) -> None:
    _, token = auth.create_token(db, "admin", name="schemathesis")
    headers = {"Authorization": f"Bearer {token}"}
    app = create_app(settings, pool=pool, schema=db_schema, config=ApiSettings.from_environ({}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/alerts/stream")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _property(operation, mode, headers)()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without parameters has no invalid input
            except Exception as exc:  # hypothesis raises the shrunk failing example; report every one
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
    statuses = dict(
        db.execute(
            "SELECT status, count(*) FROM audit_log WHERE method IS NOT NULL GROUP BY status"
        ).fetchall()
    )
    print("audited answers by status:", statuses)
    assert statuses.get(200, 0) > 100, statuses  # the token worked: most valid requests got data
    assert not [status for status in statuses if status >= 500], statuses


def _property(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> Any:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def no_server_error(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error], headers=headers)

    return no_server_error
