"""The API after its database restarted (a restart, an outage): the pooled connections the server ended are
replaced before a request gets one, so the first request afterwards is answered, not refused with 503."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from api import auth
from api.app import create_app
from api.config import ApiSettings
from consumers.migrate import migrate
from tests.private_stack import PrivateStack

pytestmark = pytest.mark.integration


def test_the_first_request_after_a_database_restart_is_answered(tmp_path: Path) -> None:
    stack = PrivateStack(tmp_path / "private", kafka=False)
    try:
        stack.start()
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            migrate(conn)
            _, token = auth.create_token(conn, "admin", name="admin")
        headers = {"Authorization": f"Bearer {token}"}
        app = create_app(stack.settings(), config=ApiSettings.from_environ({}))
        with TestClient(app) as client:
            assert client.get("/metrics", headers=headers).status_code == 200
            stack.stop_postgres()
            assert client.get("/healthz").status_code == 503
            stack.start_postgres()
            answer = client.get("/metrics", headers=headers)
            assert answer.status_code == 200, answer.text
            aggregated = client.get("/metrics/aggregated/gpu_power_watts?interval=1h", headers=headers)
            assert aggregated.status_code == 200, aggregated.text
    finally:
        stack.close()
