"""Audit completeness (A3, issue 14 item 4) against a real PostgreSQL: token creation and revocation, silence
changes (API and command line) and failed authentications each leave exactly their row in ``audit_log``,
no row holds a token's secret, and admins read the trail through ``GET /audit`` (paged, filtered), others
get 403, bad parameters a 4xx naming them. The app runs over TestClient as in test_api.py."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from aima_metrics.pipeline_commands import silence
from api import auth
from api.app import create_app
from api.audit import AUDITED_PREFIXES
from api.audit_log import Origin
from api.cli import create_token_cmd, revoke_token
from api.config import ApiSettings
from bus.settings import Settings

pytestmark = pytest.mark.integration

COLUMNS = """action, outcome, reason, actor, token_id::text, role, method, endpoint, target, status"""
LOCAL = Origin.local()


@pytest.fixture
def client(settings: Settings, db_schema: str) -> Iterator[TestClient]:
    app = create_app(settings, schema=db_schema, config=ApiSettings.from_environ({}))
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def tokens(db: psycopg.Connection[Any]) -> dict[str, tuple[str, str]]:
    """role name -> (token id, plaintext); their token.create rows are deleted, so each test sees its own."""
    made = {
        "admin": auth.create_token(db, "admin", name="root"),
        "finance": auth.create_token(db, "finance", name="money"),
        "user": auth.create_token(db, "user", ["metrics:read:gpu_utilization_percent"], ["p1"], name="alice"),
    }
    db.execute("DELETE FROM audit_log")
    return made


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rows(db: psycopg.Connection[Any], where: str = "true", *args: Any) -> list[tuple[Any, ...]]:
    return db.execute(f"SELECT {COLUMNS} FROM audit_log WHERE {where} ORDER BY id", args).fetchall()


def no_secret_anywhere(db: psycopg.Connection[Any], *tokens: str) -> None:
    with db.cursor(row_factory=dict_row) as cur:
        dumped = json.dumps(cur.execute("SELECT * FROM audit_log").fetchall(), default=str)
    for token in tokens:
        secret = token.split("_", 2)[2]
        assert secret not in dumped and token not in dumped


# -- tokens -------------------------------------------------------------------------------------------------


def test_token_creation_and_revocation_leave_one_row_each(
    settings: Settings, db_schema: str, db: psycopg.Connection[Any]
) -> None:
    expires = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    token = create_token_cmd(
        settings,
        "user",
        ["metrics:read:*"],
        ["p1", "p2"],
        "ci",
        schema=db_schema,
        by="ops",
        expires_at=expires,
    )
    token_id = str(db.execute("SELECT id FROM api_tokens WHERE name = 'ci'").fetchone()[0])
    assert rows(db) == [
        (
            "token.create",
            "allowed",
            None,
            "cli:ops",
            None,
            None,
            None,
            "aima-metrics token create",
            token_id,
            None,
        )
    ]
    parameters, client = db.execute("SELECT parameters, client FROM audit_log").fetchone()
    assert parameters == {
        "name": "ci",
        "role": "user",
        "scopes": ["metrics:read:*"],
        "projects": ["p1", "p2"],
        "expires_at": expires.isoformat(),
    }
    assert client == LOCAL.client and re.fullmatch(r".+@.+", client)

    assert revoke_token(settings, token_id, schema=db_schema) is True
    assert revoke_token(settings, token_id, schema=db_schema, by="ops") is False  # already revoked
    absent = str(uuid.uuid4())
    assert revoke_token(settings, absent, schema=db_schema) is False
    with pytest.raises(ValueError, match="UUID"):
        revoke_token(settings, "not-an-id", schema=db_schema)  # refused before the database: no row
    revoke = "aima-metrics token revoke"
    assert rows(db, "action = 'token.revoke'") == [
        ("token.revoke", "allowed", None, LOCAL.actor, None, None, None, revoke, token_id, None),
        ("token.revoke", "invalid", "no_active_token", "cli:ops", None, None, None, revoke, token_id, None),
        ("token.revoke", "invalid", "no_active_token", LOCAL.actor, None, None, None, revoke, absent, None),
    ]
    no_secret_anywhere(db, token)


def test_a_token_is_not_created_when_its_audit_row_cannot_be_written(
    settings: Settings, db_schema: str, db: psycopg.Connection[Any]
) -> None:
    db.execute("ALTER TABLE audit_log ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
    try:
        with pytest.raises(psycopg.errors.CheckViolation):
            create_token_cmd(settings, "admin", [], [], "unaudited", schema=db_schema)
    finally:
        db.execute("ALTER TABLE audit_log DROP CONSTRAINT refuse_all")
    assert db.execute("SELECT count(*) FROM api_tokens WHERE name = 'unaudited'").fetchone() == (0,)


# -- silences -----------------------------------------------------------------------------------------------


def test_silence_changes_through_the_api_are_audited(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    admin_id, admin = tokens["admin"]
    user_id, user = tokens["user"]
    body = {"matchers": ["host=gpu-1"], "duration": "1h", "comment": "maintenance"}
    created = client.post("/silences", json=body, headers=bearer(admin))
    assert created.status_code == 201, created.text
    silence_id = created.json()["id"]
    assert client.delete(f"/silences/{silence_id}", headers=bearer(admin)).status_code == 204
    assert client.delete(f"/silences/{silence_id}", headers=bearer(admin)).status_code == 404
    assert client.post("/silences", json=body, headers=bearer(user)).status_code == 403
    assert client.post("/silences", json=body).status_code == 401
    assert (
        client.post("/silences", json={**body, "duration": "soon"}, headers=bearer(admin)).status_code == 400
    )
    assert client.get("/silences", headers=bearer(admin)).status_code == 200
    path, create, expire = f"/silences/{silence_id}", "silence.create", "silence.expire"
    root, alice = ("api:root", admin_id, "admin"), ("api:alice", user_id, "user")
    assert rows(db) == [
        (create, "allowed", None, *root, "POST", "/silences", silence_id, 201),
        (expire, "allowed", None, *root, "DELETE", path, silence_id, 204),
        (expire, "invalid", "not_found", *root, "DELETE", path, silence_id, 404),
        (create, "denied", "insufficient_role", *alice, "POST", "/silences", None, 403),
        (create, "unauthenticated", "missing_token", None, None, None, "POST", "/silences", None, 401),
        (create, "invalid", "invalid_parameter", *root, "POST", "/silences", None, 400),
        ("read", "allowed", None, *root, "GET", "/silences", None, 200),
    ]


def test_a_silence_is_not_created_when_its_audit_row_cannot_be_written(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    db.execute("ALTER TABLE audit_log ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
    try:
        response = client.post(
            "/silences", json={"matchers": ["host=a"], "duration": "1h"}, headers=bearer(tokens["admin"][1])
        )
        assert response.status_code == 503 and response.json()["error"] == "audit_unavailable"
    finally:
        db.execute("ALTER TABLE audit_log DROP CONSTRAINT refuse_all")
    assert db.execute("SELECT count(*) FROM silences").fetchone() == (0,)


def test_silence_commands_are_audited(database_url: str, db_schema: str, db: psycopg.Connection[Any]) -> None:
    env = {"AIMA_DATABASE_URL": make_conninfo(database_url, options=f"-c search_path={db_schema},public")}
    runner = CliRunner()
    added = runner.invoke(silence, ["add", "host=gpu-7", "--duration", "30m", "--by", "oncall"], env=env)
    assert added.exit_code == 0, added.output
    silence_id = re.search(r"silence (\S+) active", added.output)[1]
    assert runner.invoke(silence, ["rm", silence_id], env=env).exit_code == 0
    again = runner.invoke(silence, ["rm", silence_id, "--by", "oncall"], env=env)
    assert again.exit_code == 1 and "no silence" in again.output
    assert runner.invoke(silence, ["rm", "nope"], env=env).exit_code == 2  # not an id: nothing to record
    add, rm = ("aima-metrics silence add", silence_id, None), ("aima-metrics silence rm", silence_id, None)
    assert rows(db) == [
        ("silence.create", "allowed", None, "cli:oncall", None, None, None, *add),
        ("silence.expire", "allowed", None, LOCAL.actor, None, None, None, *rm),
        ("silence.expire", "invalid", "no_active_silence", "cli:oncall", None, None, None, *rm),
    ]
    parameters = db.execute("SELECT parameters FROM audit_log WHERE action = 'silence.create'").fetchone()[0]
    assert parameters == {"matchers": ['host="gpu-7"'], "duration": "30m"}


# -- failed authentications -------------------------------------------------------------------------------


def test_each_failed_authentication_leaves_a_row_with_its_reason(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    revoked_id, revoked = auth.create_token(db, "admin", name="old")
    auth.revoke_token(db, revoked_id)
    expired_id, expired = auth.create_token(
        db, "admin", name="late", expires_at=datetime.now(UTC) - timedelta(minutes=1)
    )
    db.execute("DELETE FROM audit_log")
    user_id, user = tokens["user"]
    forged = f"aima_{uuid.uuid4().hex[:12]}_{'x' * 43}"
    url = "/metrics/raw/gpu_utilization_percent"
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer nope"},
        bearer(forged),
        bearer(revoked),
        bearer(expired),
    ):
        assert client.get(url, headers=headers).status_code == 401
    assert client.get("/metrics/raw/gpu_power_watts", headers=bearer(user)).status_code == 403
    assert client.get("/costs", params={"project": "p2"}, headers=bearer(user)).status_code == 403
    assert client.get("/audit", headers=bearer(user)).status_code == 403
    metric, alice = "gpu_utilization_percent", ("api:alice", user_id, "user")
    refused = ("read", "unauthenticated")
    assert rows(db) == [
        (*refused, "missing_token", None, None, None, "GET", url, None, 401),
        (*refused, "missing_token", None, None, None, "GET", url, None, 401),
        (*refused, "malformed_token", None, None, None, "GET", url, None, 401),
        (*refused, "unknown_token", None, None, None, "GET", url, None, 401),
        (*refused, "revoked_token", "api:old", revoked_id, None, "GET", url, None, 401),
        (*refused, "expired_token", "api:late", expired_id, None, "GET", url, None, 401),
        ("read", "denied", "insufficient_scope", *alice, "GET", "/metrics/raw/gpu_power_watts", None, 403),
        ("read", "denied", "project_not_allowed", *alice, "GET", "/costs", None, 403),
        ("read", "denied", "insufficient_role", *alice, "GET", "/audit", None, 403),
    ]
    assert db.execute("SELECT metric FROM audit_log ORDER BY id LIMIT 1").fetchone() == (metric,)
    no_secret_anywhere(db, forged, revoked, expired)


def test_a_token_sent_as_a_query_parameter_is_not_stored(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    admin = tokens["admin"][1]
    assert client.get("/costs", params={"token": admin, "labels": f"x={admin}"}).status_code == 401
    parameters = db.execute("SELECT parameters FROM audit_log").fetchone()[0]
    prefix = "_".join(admin.split("_", 2)[:2])  # aima_<12 hex digits of its id>: no secret in it
    assert parameters == {"token": f"{prefix}_<redacted>", "labels": f"x={prefix}_<redacted>"}
    no_secret_anywhere(db, admin)


def test_every_authenticated_route_is_audited(settings: Settings, db_schema: str) -> None:
    """Failed authentications are recorded by the audit middleware, which sees only the audited paths: a
    route taking a token (its OpenAPI operation asks for the bearer scheme) outside them would let refusals
    go unrecorded."""
    app = create_app(settings, schema=db_schema, config=ApiSettings.from_environ({}))
    guarded = [
        path
        for path, operations in app.openapi()["paths"].items()
        if any("security" in operation for operation in operations.values())
    ]
    assert len(guarded) >= 10 and "/audit" in guarded
    unaudited = [p for p in guarded if not any(p == a or p.startswith(a + "/") for a in AUDITED_PREFIXES)]
    assert unaudited == []


# -- the trail through the API ------------------------------------------------------------------------------


@pytest.fixture
def trail(settings: Settings, db_schema: str, db: psycopg.Connection[Any]) -> dict[str, Any]:
    """Five rows of the command line: 4 token creations (by three actors) and a revocation."""
    made = {}
    for name, by in (("t1", "ops"), ("t2", "ops"), ("t3", "sec")):
        create_token_cmd(settings, "user", [], ["p1"], name, schema=db_schema, by=by)
        made[name] = str(db.execute("SELECT id FROM api_tokens WHERE name = %s", (name,)).fetchone()[0])
    revoke_token(settings, made["t3"], schema=db_schema, by="sec")
    made["admin"], made["admin_token"] = auth.create_token(
        db, "admin", name="root", origin=Origin("cli:boot", "x")
    )
    return made


def _get(client: TestClient, token: str, **params: Any) -> dict[str, Any]:
    response = client.get("/audit", params=params, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def test_admins_page_through_the_whole_trail_newest_first(
    client: TestClient, trail: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    admin = trail["admin_token"]
    for _ in range(3):
        assert client.get("/costs").status_code == 401
    stored = [r[0] for r in db.execute("SELECT id FROM audit_log ORDER BY id DESC").fetchall()]
    assert len(stored) == 8
    seen: list[int] = []
    pages = 0
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = _get(client, admin, **params)
        pages += 1
        assert page["limit"] == 3 and len(page["entries"]) <= 3
        seen.extend(entry["id"] for entry in page["entries"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # rows written meanwhile (this very request's own row) do not shift the next page
    assert seen == stored and pages == 3  # 3 + 3 + 2, each row once, newest first
    entry = _get(client, admin, limit=1, action="token.revoke")["entries"][0]
    assert {
        k: entry[k] for k in ("action", "outcome", "actor", "target", "method", "status", "endpoint")
    } == {
        "action": "token.revoke",
        "outcome": "allowed",
        "actor": "cli:sec",
        "target": trail["t3"],
        "method": None,
        "status": None,
        "endpoint": "aima-metrics token revoke",
    }
    assert datetime.fromisoformat(entry["time"]).tzinfo is not None
    # reading the trail is itself audited, one row per page
    reads = db.execute("SELECT count(*) FROM audit_log WHERE endpoint = '/audit' AND status = 200").fetchone()
    assert reads == (pages + 1,)


def test_the_trail_filters_by_actor_token_action_outcome_and_time(
    client: TestClient, trail: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    admin = trail["admin_token"]
    assert client.get("/costs").status_code == 401
    assert client.get("/costs", headers=bearer(admin)).status_code == 200
    db.execute("UPDATE audit_log SET time = now() - interval '2 days' WHERE target = %s", (trail["t1"],))

    def targets(**params: Any) -> list[Any]:
        return [e["target"] for e in _get(client, admin, **params)["entries"]]

    def endpoints(**params: Any) -> list[str]:
        return [e["endpoint"] for e in _get(client, admin, **params)["entries"]]

    assert targets(actor="cli:ops") == [trail["t2"], trail["t1"]]
    assert targets(actor="cli:sec") == [trail["t3"], trail["t3"]]
    assert targets(action="token.create", actor="cli:sec") == [trail["t3"]]
    assert targets(action="token.create") == [trail["admin"], trail["t3"], trail["t2"], trail["t1"]]
    assert endpoints(outcome="unauthenticated") == ["/costs"]
    assert endpoints(token_id=trail["admin"]) == ["/audit"] * 5 + ["/costs"]  # its reads of the trail so far
    assert targets(token_id=str(uuid.uuid4())) == []
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert targets(action="token.create", end_time=yesterday) == [trail["t1"]]
    assert targets(action="token.create", start_time=yesterday) == [trail["admin"], trail["t3"], trail["t2"]]
    assert targets(action="token.create", start_time=yesterday, end_time=datetime.now(UTC).isoformat()) == [
        trail["admin"],
        trail["t3"],
        trail["t2"],
    ]
    # a row older than migration 0013 (no outcome) is filtered by its status' outcome
    db.execute("INSERT INTO audit_log (endpoint, status) VALUES ('/legacy', 403)")
    legacy = _get(client, admin, outcome="denied")["entries"]
    assert [(e["endpoint"], e["action"], e["outcome"]) for e in legacy] == [("/legacy", "read", "denied")]


def test_only_admins_read_the_trail(client: TestClient, tokens: dict[str, tuple[str, str]]) -> None:
    for role in ("finance", "user"):
        response = client.get("/audit", headers=bearer(tokens[role][1]))
        assert response.status_code == 403 and response.json()["error"] == "forbidden"
        assert "admin" in response.json()["detail"]
    assert client.get("/audit").status_code == 401
    assert client.get("/audit", headers=bearer(tokens["admin"][1])).status_code == 200


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "0"}, "cursor"),
        ({"cursor": "-5"}, "cursor"),
        ({"cursor": "99999999999999999999"}, "cursor"),
        ({"cursor": "x" * 41}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"token_id": "nope"}, "token_id"),
        ({"action": "token.steal"}, "action"),
        ({"outcome": "maybe"}, "outcome"),
        ({"actor": "a" * 501}, "actor"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"end_time": "2026-13-01T00:00:00Z"}, "end_time"),
        ({"start_time": "2026-01-02T00:00:00Z", "end_time": "2026-01-01T00:00:00Z"}, "end_time"),
        ({"start_time": "9999-12-31T23:59:59-12:00"}, "start_time"),
    ],
)
def test_bad_trail_parameters_get_a_4xx_naming_them(
    client: TestClient, tokens: dict[str, tuple[str, str]], params: dict[str, str], named: str
) -> None:
    response = client.get("/audit", params=params, headers=bearer(tokens["admin"][1]))
    assert 400 <= response.status_code < 500, response.text
    assert named in response.json()["detail"], response.json()
