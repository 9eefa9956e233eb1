"""api/errors.py: a database error is answered by its SQLSTATE class, not its text: bad input 400, a
database away 503 (retry), a schema behind the code 503 naming the migration, a query the code got wrong
500; every answer in the one error shape."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.errors import install

CASES = [
    (psycopg.errors.lookup("22007")("bad time"), 400, "invalid_value"),
    (psycopg.errors.lookup("57014")("statement timeout"), 503, "query_timeout"),
    (psycopg.OperationalError("connection lost"), 503, "database_unavailable"),
    (psycopg.errors.lookup("08006")("connection failure"), 503, "database_unavailable"),
    (psycopg.errors.lookup("57P01")("terminating connection"), 503, "database_unavailable"),
    (psycopg.errors.lookup("53300")("too many connections"), 503, "database_unavailable"),
    (psycopg_pool.PoolTimeout("no connection"), 503, "database_unavailable"),
    (psycopg.errors.lookup("42P01")("relation does not exist"), 503, "schema_not_migrated"),
    (psycopg.errors.lookup("42601")("syntax error"), 500, "internal_error"),
    (psycopg.errors.lookup("23505")("duplicate key"), 500, "internal_error"),
]


@pytest.mark.parametrize(("error", "status", "code"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_a_database_error_is_answered_by_its_sqlstate(error: Exception, status: int, code: str) -> None:
    app = FastAPI()
    install(app)

    @app.get("/fails")
    def fails() -> None:
        raise error

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/fails")
    assert response.status_code == status
    assert response.json()["error"] == code and response.json()["detail"]
