"""The REST API (A1-A3) against a real PostgreSQL: a fresh migrated schema per test, rows inserted with SQL
as the sink would write them (the tables and views of consumers/migrations are the contract), tokens of each
role, and the app over TestClient, or under a real uvicorn for the event stream."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from api import auth
from api.app import create_app
from api.cli import create_token_cmd, list_tokens, revoke_token
from api.config import ApiSettings
from api.main import server
from bus.settings import REPO_ROOT, Settings

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
# A 5-minute-aligned moment half an hour ago: inside the default range (the last hour) and the raw
# retention, on a bucket boundary for 5m buckets.
BASE = NOW.replace(minute=NOW.minute - NOW.minute % 5, second=0, microsecond=0) - timedelta(minutes=30)
HOUR = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
H1_VALUES = [12.0, 50.0, 31.0, 77.0, 64.0, 99.0, 5.0, 42.0, 88.0, 70.0]  # 30 s apart from BASE
H1_NEXT = [10.0, 20.0]  # at BASE + 5m and + 5m30s


# -- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
def tokens(db: psycopg.Connection[Any]) -> dict[str, tuple[str, str]]:
    """role name -> (token id, plaintext)."""
    return {
        "admin": auth.create_token(db, "admin", name="admin"),
        "finance": auth.create_token(db, "finance", name="finance"),
        "user": auth.create_token(
            db,
            "user",
            [
                "metrics:read:gpu_utilization_percent",
                "metrics:read:job_frame_processing_seconds",
                "metrics:read:cuda_kernel_duration_seconds",
                "metrics:read:job_cost_eur",
            ],
            ["p1"],
            name="alice",
        ),
        "nothing": auth.create_token(db, "user", [], ["p1"], name="no-scopes"),
    }


@pytest.fixture
def client(settings: Settings, db_schema: str) -> Iterator[TestClient]:
    app = create_app(settings, schema=db_schema, config=ApiSettings.from_environ({}))
    with TestClient(app) as test_client:
        yield test_client


def bearer(tokens: dict[str, tuple[str, str]], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[role][1]}"}


def _gpu(db: psycopg.Connection[Any], at: datetime, host: str, uuid_: str, util: float, power: float) -> None:
    db.execute(
        """INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group,
                                    utilization_percent, power_watts)
           VALUES (%s, %s, 0, %s, 'H100', 'nvml', '10s', %s, %s)""",
        (at, host, uuid_, util, power),
    )


@pytest.fixture
def gpu_rows(db: psycopg.Connection[Any]) -> None:
    for i, value in enumerate(H1_VALUES):
        _gpu(db, BASE + timedelta(seconds=30 * i), "h1", "GPU-1", value, 100 + value)
    for i, value in enumerate(H1_NEXT):
        _gpu(db, BASE + timedelta(minutes=5, seconds=30 * i), "h1", "GPU-1", value, 100 + value)
    for i in range(5):
        _gpu(db, BASE + timedelta(seconds=30 * i), "h2", "GPU-2", 1000.0 + i, 1.0)


@pytest.fixture
def job_rows(db: psycopg.Connection[Any]) -> None:
    for job, project in (("j1", "p1"), ("j2", "p2")):
        for kind, kernel in (("frame", ""), ("cuda_kernel", "gemm")):
            db.execute(
                """INSERT INTO job_timings (time, interval_start, job_id, project, model, kind, kernel, count,
                                            sum_seconds, min_seconds, max_seconds, sketch, source)
                   VALUES (%s, %s, %s, %s, 'yolo', %s, %s, 10, %s, 0.01, 0.2, '{}', 'sdk')""",
                (
                    BASE,
                    BASE - timedelta(seconds=10),
                    job,
                    project,
                    kind,
                    kernel,
                    1.5 if project == "p1" else 2.5,
                ),
            )
        db.execute(
            """INSERT INTO job_events (time, job_id, event, project, user_pseudonym, service, gpu_count,
                                       source)
               VALUES (%s, %s, 'started', %s, %s, %s, 1, 'sdk')""",
            (BASE - timedelta(hours=2), job, project, f"u-{project}", f"svc-{project}"),
        )


@pytest.fixture
def cost_rows(db: psycopg.Connection[Any]) -> None:
    day = NOW.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    for project, provider, eur in (("p1", "aws", 10.0), ("p1", "aws", 5.0), ("p2", "gcp", 7.0)):
        hour = day + timedelta(hours=int(eur))
        db.execute(
            """INSERT INTO costs (time, period_end, kind, project, gpu_model, provider, pricing, gpu_hours,
                                  cost_estimated_eur, currency, source, emitted_at)
               VALUES (%s, %s, 'gpu_hours', %s, 'H100', %s, 'on_demand', %s, %s, 'EUR', 'stream', now())""",
            (hour, hour + timedelta(hours=1), project, provider, eur / 2, eur),
        )
    for job, project, eur in (("j1", "p1", 3.0), ("j2", "p2", 4.0)):
        db.execute(
            """INSERT INTO costs (time, period_end, kind, project, job_id, job_cost_eur, currency, source,
                                  emitted_at)
               VALUES (%s, %s, 'job_cost', %s, %s, %s, 'EUR', 'stream', now())""",
            (day, day + timedelta(hours=1), project, job, eur),
        )
    month = day.replace(day=1)
    for project, spent in (("p1", 40.0), ("p2", 90.0)):
        db.execute(
            """INSERT INTO costs (time, period_end, kind, project, budget, budget_eur,
                                  budget_utilization_percent, forecast_eur, currency, source, emitted_at)
               VALUES (%s, %s, 'budget', %s, 'monthly', 100, %s, %s, 'EUR', 'stream', now())""",
            (month, month + timedelta(days=31), project, spent, spent * 2),
        )


def _alert(
    db: psycopg.Connection[Any], fingerprint: str, status: str, starts: datetime, at: datetime, **labels: str
) -> None:
    db.execute(
        """INSERT INTO alert_history (fingerprint, rule, status, severity, starts_at, ends_at, event_time,
                                      value, labels, annotations, channels, source)
           VALUES (%s, %s, %s, 'critical', %s, %s, %s, 97.5, %s, %s, %s, 'stream')""",
        (
            fingerprint,
            f"rule-{fingerprint}",
            status,
            starts,
            at if status == "resolved" else None,
            at,
            Jsonb({"host": "h1", **labels}),
            Jsonb({"summary": "hot"}),
            ["webhook"],
        ),
    )


# -- authentication and roles ------------------------------------------------------------------------------


def test_requests_without_a_valid_token_get_401(
    client: TestClient, tokens: dict[str, tuple[str, str]]
) -> None:
    for headers in ({}, {"Authorization": "Bearer aima_0123456789ab_nope"}, {"Authorization": "Basic abc"}):
        response = client.get("/metrics/raw/gpu_utilization_percent", headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # 401 comes before parameter validation: nothing is revealed to a caller without a token
    assert client.get("/metrics/raw/gpu_utilization_percent?limit=0").status_code == 401
    assert client.get("/healthz").status_code == 200


def test_scopes_and_roles_are_enforced(client: TestClient, tokens: dict[str, tuple[str, str]]) -> None:
    def status(role: str, url: str) -> int:
        return client.get(url, headers=bearer(tokens, role)).status_code

    assert status("user", "/metrics/raw/gpu_utilization_percent") == 200
    assert status("user", "/metrics/raw/gpu_power_watts") == 403
    assert status("nothing", "/metrics/raw/gpu_utilization_percent") == 403
    assert status("finance", "/metrics/raw/cost_estimated_eur") == 200
    assert status("finance", "/metrics/aggregated/budget_utilization_percent?interval=1d") == 200
    assert status("finance", "/metrics/raw/gpu_utilization_percent") == 403
    for role in ("admin", "finance", "user"):
        assert status(role, "/costs") == 200
        assert status(role, "/budgets") == 200
    for role in ("finance", "user"):
        assert status(role, "/alerts") == 403
        assert status(role, "/alerts/stream") == 403
        assert status(role, "/silences") == 403
    assert status("admin", "/metrics/raw/gpu_power_watts") == 200
    denied = client.get("/metrics/raw/gpu_power_watts", headers=bearer(tokens, "user")).json()
    assert denied["error"] == "forbidden" and "metrics:read:gpu_power_watts" in denied["detail"]

    catalogue = client.get("/metrics", headers=bearer(tokens, "user")).json()["metrics"]
    readable = {m["name"] for m in catalogue if m["readable"]}
    assert readable == {
        "gpu_utilization_percent",
        "job_frame_processing_seconds",
        "cuda_kernel_duration_seconds",
        "job_cost_eur",
    }


def test_token_commands_create_list_and_revoke(
    client: TestClient, settings: Settings, db_schema: str
) -> None:
    token = create_token_cmd(settings, "user", ["metrics:read:*"], ["p1"], "cli", schema=db_schema)
    assert token.startswith("aima_") and len(token) > 40
    listed = {row["name"]: row for row in list_tokens(settings, schema=db_schema)}
    assert listed["cli"]["role"] == "user" and listed["cli"]["scopes"] == ["metrics:read:*"]
    assert token not in json.dumps(listed, default=str)  # only the hash is stored
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/metrics/raw/gpu_power_watts", headers=headers).status_code == 200
    assert revoke_token(settings, listed["cli"]["id"], schema=db_schema) is True
    assert client.get("/metrics/raw/gpu_power_watts", headers=headers).status_code == 401
    with pytest.raises(ValueError, match="no metric"):
        create_token_cmd(settings, "user", ["metrics:read:nope"], [], "bad", schema=db_schema)
    with pytest.raises(ValueError, match="role"):
        create_token_cmd(settings, "root", [], [], "bad", schema=db_schema)


def test_a_peppered_token_needs_the_same_pepper(
    settings: Settings, db_schema: str, db: psycopg.Connection[Any]
) -> None:
    _, token = auth.create_token(db, "admin", name="peppered", pepper="s3cret")
    stored = db.execute("SELECT token_hash FROM api_tokens WHERE name = 'peppered'").fetchone()
    assert stored is not None and stored[0] == auth.hash_token(token, "s3cret") != auth.hash_token(
        token, None
    )
    headers = {"Authorization": f"Bearer {token}"}
    for pepper, expected in (("s3cret", 200), ("other", 401), (None, 401)):
        app = create_app(settings, schema=db_schema, config=ApiSettings.from_environ({}, token_pepper=pepper))
        with TestClient(app) as test_client:
            assert test_client.get("/metrics", headers=headers).status_code == expected


# -- metric data -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("gpu_rows")
def test_raw_returns_the_inserted_samples_filtered_by_labels(
    client: TestClient, tokens: dict[str, tuple[str, str]]
) -> None:
    response = client.get(
        "/metrics/raw/gpu_utilization_percent", params={"labels": "host=h1"}, headers=bearer(tokens, "admin")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["labels"] == {"host": "h1"} and body["truncated"] is False
    assert [s["value"] for s in body["samples"]] == H1_VALUES + H1_NEXT
    first = body["samples"][0]
    assert datetime.fromisoformat(first["time"]) == BASE
    assert first["labels"] == {"host": "h1", "gpu": "0", "gpu_uuid": "GPU-1", "gpu_model": "H100"}

    both = client.get(
        "/metrics/raw/gpu_utilization_percent", params={"limit": 3}, headers=bearer(tokens, "admin")
    ).json()
    assert len(both["samples"]) == 3 and both["truncated"] is True
    none = client.get(
        "/metrics/raw/gpu_utilization_percent",
        params={"labels": "host=h1,gpu_uuid=GPU-2"},
        headers=bearer(tokens, "admin"),
    ).json()
    assert none["samples"] == []
    # an empty value selects the series without the label (no MIG instance here: all of them)
    whole = client.get(
        "/metrics/raw/gpu_utilization_percent",
        params={"labels": "host=h2,mig_instance="},
        headers=bearer(tokens, "admin"),
    ).json()
    assert [s["value"] for s in whole["samples"]] == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]
    # an explicit range outside the data
    early = client.get(
        "/metrics/raw/gpu_utilization_percent",
        params={"start_time": (BASE - timedelta(hours=3)).isoformat(), "end_time": BASE.isoformat()},
        headers=bearer(tokens, "admin"),
    ).json()
    assert early["samples"] == []


def _p95(values: list[float]) -> float:
    """PostgreSQL's percentile_cont(0.95): linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = 0.95 * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@pytest.mark.usefixtures("gpu_rows")
def test_aggregated_5m_is_computed_from_raw_samples(
    client: TestClient, tokens: dict[str, tuple[str, str]]
) -> None:
    response = client.get(
        "/metrics/aggregated/gpu_utilization_percent",
        params={
            "interval": "5m",
            "labels": "host=h1",
            "start_time": BASE.isoformat(),
            "end_time": (BASE + timedelta(minutes=10)).isoformat(),
        },
        headers=bearer(tokens, "admin"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "raw" and body["interval"] == "5m"
    buckets = body["buckets"]
    assert [datetime.fromisoformat(b["bucket_start"]) for b in buckets] == [BASE, BASE + timedelta(minutes=5)]
    for bucket, values in zip(buckets, (H1_VALUES, H1_NEXT), strict=True):
        assert bucket["count"] == len(values)
        assert bucket["min"] == min(values) and bucket["max"] == max(values)
        assert bucket["avg"] == pytest.approx(sum(values) / len(values))
        assert bucket["p95"] == pytest.approx(_p95(values))
        assert datetime.fromisoformat(bucket["bucket_end"]) - datetime.fromisoformat(
            bucket["bucket_start"]
        ) == timedelta(minutes=5)
        assert bucket["labels"]["host"] == "h1"
    assert buckets[0]["p95"] == pytest.approx(94.05)  # rank 0.95 * 9 = 8.55: 88 + 0.55 * (99 - 88)


def test_aggregated_1h_reads_the_rollups(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    labels = {"host": "h1", "gpu": "0", "gpu_uuid": "GPU-1", "gpu_model": "H100"}
    series = 'gpu_power_watts{gpu="0",gpu_model="H100",gpu_uuid="GPU-1",host="h1"}'
    rows = [
        ("hour", HOUR, HOUR + timedelta(hours=1), 360, 101.0, 250.0, 180.5, 240.25),
        ("hour", HOUR + timedelta(hours=1), HOUR + timedelta(hours=2), 360, 99.0, 260.0, 170.0, 230.0),
        (
            "day",
            HOUR.replace(hour=0),
            HOUR.replace(hour=0) + timedelta(days=1),
            8640,
            1.0,
            999.0,
            500.0,
            900.0,
        ),
    ]
    for tier, start, end, count, low, high, avg, p95 in rows:
        db.execute(
            """INSERT INTO rollups (series, metric, labels, tier, bucket_start, bucket_end, count, min, max,
                                    sum, avg, p95, sketch, final, watermark, source, emitted_at)
               VALUES (%s, 'gpu_power_watts', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '{}', true, %s,
                       'stream', now())""",
            (series, Jsonb(labels), tier, start, end, count, low, high, avg * count, avg, p95, end),
        )
    response = client.get(
        "/metrics/aggregated/gpu_power_watts",
        params={
            "interval": "1h",
            "labels": "host=h1",
            "start_time": HOUR.isoformat(),
            "end_time": (HOUR + timedelta(hours=2)).isoformat(),
        },
        headers=bearer(tokens, "admin"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "rollups"
    got = [(b["count"], b["min"], b["max"], b["avg"], b["p95"]) for b in body["buckets"]]
    assert got == [(count, low, high, avg, p95) for _, _, _, count, low, high, avg, p95 in rows[:2]]
    assert body["buckets"][0]["labels"] == labels
    day = client.get(
        "/metrics/aggregated/gpu_power_watts",
        params={
            "interval": "day",
            "start_time": HOUR.isoformat(),
            "end_time": (HOUR + timedelta(hours=1)).isoformat(),
        },
        headers=bearer(tokens, "admin"),
    ).json()
    assert [b["p95"] for b in day["buckets"]] == [900.0]
    other_host = client.get(
        "/metrics/aggregated/gpu_power_watts",
        params={"interval": "1h", "labels": "host=h9", "start_time": HOUR.isoformat()},
        headers=bearer(tokens, "admin"),
    ).json()
    assert other_host["buckets"] == []


# (url, query parameters, what the answer's detail must contain to name the problem)
BAD_PARAMETERS: list[tuple[str, dict[str, Any], str]] = [
    ("/metrics/raw/gpu_utilization_percent", {"labels": "a=b=c"}, "'a=b=c'"),
    ("/metrics/raw/gpu_utilization_percent", {"labels": "a"}, "'a'"),
    ("/metrics/raw/gpu_utilization_percent", {"labels": "=v"}, "'=v'"),
    ("/metrics/raw/gpu_utilization_percent", {"labels": "host=h1,,gpu=0"}, "empty item"),
    ("/metrics/raw/gpu_utilization_percent", {"labels": "colour=red"}, "'colour'"),
    ("/metrics/raw/gpu_utilization_percent", {"labels": "host=a,host=b"}, "'host' is given twice"),
    ("/metrics/raw/gpu_utilisation_percent", {}, "did you mean gpu_utilization_percent"),
    (
        "/metrics/raw/gpu_utilization_percent",
        {"start_time": "2024-02-01T00:00:00Z", "end_time": "2024-01-01T00:00:00Z"},
        "end_time",
    ),
    ("/metrics/raw/gpu_utilization_percent", {"start_time": "yesterday"}, "'start_time'"),
    ("/metrics/raw/gpu_utilization_percent", {"limit": 0}, "'limit'"),
    ("/metrics/raw/gpu_utilization_percent", {"limit": 10**9}, "'limit'"),
    ("/metrics/raw/gpu_utilization_percent", {"limit": "many"}, "'limit'"),
    ("/metrics/aggregated/gpu_utilization_percent", {"interval": "7x"}, "'7x'"),
    ("/metrics/aggregated/gpu_utilization_percent", {"interval": "0m"}, "'0m'"),
    ("/metrics/aggregated/gpu_utilization_percent", {"interval": "3d"}, "'3d'"),
    ("/metrics/aggregated/gpu_utilization_percent", {"labels": "a"}, "'a'"),
    ("/costs", {"group_by": "colour"}, "'group_by'"),
    ("/costs", {"period": "fortnight"}, "'period'"),
    ("/alerts", {"state": "later"}, "'state'"),
    ("/silences/not-a-uuid", {}, "'silence_id'"),
]


def test_every_bad_parameter_gets_a_4xx_naming_it(
    client: TestClient, tokens: dict[str, tuple[str, str]]
) -> None:
    wrong = []
    for url, params, names in BAD_PARAMETERS:
        response = client.get(url, params=params, headers=bearer(tokens, "admin"))
        body = response.json()
        if not (
            400 <= response.status_code < 500 and set(body) == {"error", "detail"} and names in body["detail"]
        ):
            wrong.append(f"{url} {params}: {response.status_code} {body}")
    assert not wrong, "\n".join(wrong)


def test_user_sees_only_its_own_projects(
    client: TestClient,
    tokens: dict[str, tuple[str, str]],
    job_rows: None,
    cost_rows: None,
) -> None:
    user, admin, finance = bearer(tokens, "user"), bearer(tokens, "admin"), bearer(tokens, "finance")
    start = {"start_time": (BASE - timedelta(minutes=1)).isoformat()}

    frames = client.get("/metrics/raw/job_frame_processing_seconds", params=start, headers=user).json()
    assert {s["labels"]["project"] for s in frames["samples"]} == {"p1"}
    assert (
        len(
            client.get("/metrics/raw/job_frame_processing_seconds", params=start, headers=admin).json()[
                "samples"
            ]
        )
        == 2
    )
    # a metric labelled with the job only: restricted through the job's project
    kernels = client.get("/metrics/raw/cuda_kernel_duration_seconds", params=start, headers=user).json()
    assert [s["labels"]["job_id"] for s in kernels["samples"]] == ["j1"]
    aggregated = client.get(
        "/metrics/aggregated/job_frame_processing_seconds", params={**start, "interval": "5m"}, headers=user
    ).json()
    assert {b["labels"]["project"] for b in aggregated["buckets"]} == {"p1"}
    denied = client.get(
        "/metrics/raw/job_frame_processing_seconds", params={**start, "labels": "project=p2"}, headers=user
    )
    assert denied.status_code == 403 and "'p2'" in denied.json()["detail"]

    by_project = client.get("/costs", params={"group_by": "project", "period": "total"}, headers=user).json()
    assert [(r["project"], r["cost_eur"]) for r in by_project["rows"]] == [("p1", 15.0)]
    everyone = client.get("/costs", params={"group_by": "project", "period": "total"}, headers=finance).json()
    assert [(r["project"], r["cost_eur"], r["gpu_hours"]) for r in everyone["rows"]] == [
        ("p1", 15.0, 7.5),
        ("p2", 7.0, 3.5),
    ]
    by_day = client.get("/costs", params={"group_by": "provider", "period": "day"}, headers=admin).json()
    assert {(r["provider"], r["cost_eur"]) for r in by_day["rows"]} == {("aws", 15.0), ("gcp", 7.0)}
    by_user = client.get("/costs", params={"group_by": "user", "period": "total"}, headers=admin).json()
    assert by_user["source"] == "job_cost"
    assert [(r["user"], r["cost_eur"], r["jobs"]) for r in by_user["rows"]] == [
        ("u-p1", 3.0, 1),
        ("u-p2", 4.0, 1),
    ]
    by_service = client.get("/costs", params={"group_by": "service", "period": "total"}, headers=user).json()
    assert [(r["service"], r["cost_eur"]) for r in by_service["rows"]] == [("svc-p1", 3.0)]
    assert client.get("/costs", params={"project": "p2"}, headers=user).status_code == 403

    budgets = client.get("/budgets", headers=user).json()["budgets"]
    assert [(b["project"], b["budget_utilization_percent"], b["spent_eur"]) for b in budgets] == [
        ("p1", 40.0, 40.0)
    ]
    assert len(client.get("/budgets", headers=finance).json()["budgets"]) == 2
    job_costs = client.get(
        "/metrics/raw/job_cost_eur", params={"start_time": "2000-01-01T00:00:00Z"}, headers=user
    )
    assert [s["labels"]["project"] for s in job_costs.json()["samples"]] == ["p1"]


# -- audit -------------------------------------------------------------------------------------------------


def test_every_data_access_is_audited(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    client.get(
        "/metrics/raw/gpu_utilization_percent", params={"labels": "host=h1"}, headers=bearer(tokens, "user")
    )
    client.get("/metrics/raw/gpu_power_watts", headers=bearer(tokens, "user"))
    client.get("/metrics/raw/gpu_utilization_percent", params={"limit": 0}, headers=bearer(tokens, "admin"))
    client.get("/costs")
    client.get("/healthz")
    rows = db.execute(
        """SELECT token_id::text, role, method, endpoint, metric, parameters, status, row_count
             FROM audit_log WHERE action = 'read' ORDER BY id"""
    ).fetchall()
    user_id, admin_id = tokens["user"][0], tokens["admin"][0]
    assert rows == [
        (
            user_id,
            "user",
            "GET",
            "/metrics/raw/gpu_utilization_percent",
            "gpu_utilization_percent",
            {"labels": "host=h1"},
            200,
            0,
        ),
        (user_id, "user", "GET", "/metrics/raw/gpu_power_watts", "gpu_power_watts", {}, 403, None),
        (
            admin_id,
            "admin",
            "GET",
            "/metrics/raw/gpu_utilization_percent",
            "gpu_utilization_percent",
            {"limit": "0"},
            422,
            None,
        ),
        (None, None, "GET", "/costs", None, {}, 401, None),
    ]
    times = db.execute(
        "SELECT bool_and(time > now() - interval '1 minute'), bool_and(duration_ms >= 0) FROM audit_log"
    ).fetchone()
    assert times == (True, True)


def test_audit_failure_withholds_the_data(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    # every new audit row is refused from now on
    db.execute("ALTER TABLE audit_log ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
    try:
        response = client.get("/metrics/raw/gpu_utilization_percent", headers=bearer(tokens, "admin"))
        assert response.status_code == 503
        assert response.json()["error"] == "audit_unavailable"
    finally:
        db.execute("ALTER TABLE audit_log DROP CONSTRAINT refuse_all")
    assert (
        client.get("/metrics/raw/gpu_utilization_percent", headers=bearer(tokens, "admin")).status_code == 200
    )


# -- silences and alerts -----------------------------------------------------------------------------------


def test_silences_round_trip(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    admin = bearer(tokens, "admin")
    created = client.post(
        "/silences",
        json={
            "matchers": [{"name": "host", "op": "=~", "value": "gpu-.*"}, 'rule="HotGpu"'],
            "duration": "2h",
            "comment": "maintenance",
        },
        headers=admin,
    )
    assert created.status_code == 201, created.text
    silence = created.json()
    assert silence["state"] == "active" and silence["created_by"] == "api:admin"
    assert silence["matchers"] == [
        {"name": "host", "op": "=~", "value": "gpu-.*"},
        {"name": "rule", "op": "=", "value": "HotGpu"},
    ]
    # stored as the notifier reads it
    stored = db.execute(
        "SELECT matchers, ends_at - starts_at FROM silences WHERE id = %s", (silence["id"],)
    ).fetchone()
    assert stored == (silence["matchers"], timedelta(hours=2))
    listed = client.get("/silences", params={"state": "active"}, headers=admin).json()["silences"]
    assert [s["id"] for s in listed] == [silence["id"]]
    assert client.get(f"/silences/{silence['id']}", headers=admin).json()["comment"] == "maintenance"
    assert client.delete(f"/silences/{silence['id']}", headers=admin).status_code == 204
    assert client.get("/silences", params={"state": "active"}, headers=admin).json()["silences"] == []
    expired = client.get("/silences", params={"state": "expired"}, headers=admin).json()["silences"]
    assert [s["id"] for s in expired] == [silence["id"]]
    assert client.delete(f"/silences/{silence['id']}", headers=admin).status_code == 404
    assert client.delete(f"/silences/{uuid.uuid4()}", headers=admin).status_code == 404

    for body, names in (
        ({"matchers": [{"name": "host", "op": "=~", "value": "("}], "duration": "1h"}, "regular expression"),
        ({"matchers": [{"name": "host", "op": "~", "value": "x"}], "duration": "1h"}, "operator"),
        ({"matchers": [{"name": "host", "value": ""}], "duration": "1h"}, "mute every alert"),
        ({"matchers": ["host=a"]}, "ends_at/duration"),
        ({"matchers": ["host=a"], "duration": "1h", "ends_at": NOW.isoformat()}, "ends_at/duration"),
        ({"matchers": ["host=a"], "ends_at": (NOW - timedelta(hours=1)).isoformat()}, "ends_at"),
        ({"matchers": ["host=a"], "duration": "soon"}, "duration"),
        ({"matchers": [], "duration": "1h"}, "'matchers'"),
    ):
        response = client.post("/silences", json=body, headers=admin)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert names in response.json()["detail"], (body, response.json())
    assert (
        client.post(
            "/silences", json={"matchers": ["host=a"], "duration": "1h"}, headers=bearer(tokens, "user")
        ).status_code
        == 403
    )


def test_alerts_current_and_history(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    t0 = NOW - timedelta(minutes=50)
    _alert(db, "resolved-one", "firing", t0, t0)
    _alert(db, "resolved-one", "resolved", t0, t0 + timedelta(minutes=5))
    _alert(db, "still-firing", "firing", t0 + timedelta(minutes=10), t0 + timedelta(minutes=10), gpu="3")
    _alert(db, "flapping", "firing", t0, t0)
    _alert(db, "flapping", "resolved", t0, t0 + timedelta(minutes=1))
    _alert(db, "flapping", "firing", t0 + timedelta(minutes=20), t0 + timedelta(minutes=20))
    admin = bearer(tokens, "admin")

    current = client.get("/alerts", headers=admin).json()
    assert current["state"] == "current"
    assert [a["fingerprint"] for a in current["alerts"]] == ["flapping", "still-firing"]
    assert current["alerts"][1]["labels"] == {"host": "h1", "gpu": "3"}
    filtered = client.get("/alerts", params={"labels": "gpu=3"}, headers=admin).json()
    assert [a["fingerprint"] for a in filtered["alerts"]] == ["still-firing"]
    history = client.get("/alerts", params={"state": "history"}, headers=admin).json()
    assert len(history["alerts"]) == 6
    assert history["alerts"][0]["fingerprint"] == "flapping" and history["alerts"][0]["status"] == "firing"
    window = client.get(
        "/alerts",
        params={
            "state": "history",
            "start_time": t0.isoformat(),
            "end_time": (t0 + timedelta(minutes=2)).isoformat(),
        },
        headers=admin,
    ).json()
    assert sorted((a["fingerprint"], a["status"]) for a in window["alerts"]) == [
        ("flapping", "firing"),
        ("flapping", "resolved"),
        ("resolved-one", "firing"),
    ]


# -- the event stream, under a real server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_silences_take_the_notifiers_matcher_grammar(
    client: TestClient, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    """One grammar (bus/matchers.py) for the API, the notifier and the CLI: lists in braces, Alertmanager's
    escapes and its JSON form; what it refuses is a 400 naming the matcher, never a 500."""
    admin = bearer(tokens, "admin")
    created = client.post(
        "/silences",
        json={"matchers": ['{host=~"gpu-.*", rule="Hot,Cold"}', 'note="say \\"hi\\""'], "duration": "1w"},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    silence = created.json()
    assert silence["matchers"] == [
        {"name": "host", "op": "=~", "value": "gpu-.*"},
        {"name": "rule", "op": "=", "value": "Hot,Cold"},
        {"name": "note", "op": "=", "value": 'say "hi"'},
    ]
    stored = db.execute("SELECT ends_at - starts_at FROM silences WHERE id = %s", (silence["id"],)).fetchone()
    assert stored == (timedelta(weeks=1),)
    for matchers, names in (
        (["host='a'"], "single quotes"),
        (['host="a'], "unescaped double quote"),
        (['{host="a", =b}'], "matchers[0]"),
        (['{host="a", gpu=~"("}'], "regular expression"),
        (["bad-name=a"], "matchers[0]"),
    ):
        response = client.post("/silences", json={"matchers": matchers, "duration": "1h"}, headers=admin)
        assert response.status_code == 400, (matchers, response.text)
        assert names in response.json()["detail"], (matchers, response.json())
    assert client.delete(f"/silences/{silence['id']}", headers=admin).status_code == 204


def _read_event(lines: Iterator[str], wanted: str) -> dict[str, Any]:
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == wanted:
            return dict(json.loads(line.removeprefix("data: ")))
    raise AssertionError(f"the stream ended before a {wanted!r} event")


def test_alert_stream_delivers_inserted_alerts_and_stops_promptly(
    settings: Settings, db_schema: str, tokens: dict[str, tuple[str, str]], db: psycopg.Connection[Any]
) -> None:
    config = ApiSettings.from_environ({}, port=_free_port())
    app = create_app(settings, schema=db_schema, config=config)
    state = app.state.api
    api_server = server(app, config)
    thread = threading.Thread(target=api_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not api_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api_server.started
    url = f"http://127.0.0.1:{config.port}/alerts/stream"
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0)) as http:
            with http.stream("GET", url, headers=bearer(tokens, "admin")) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.iter_lines()
                assert _read_event(lines, "ready")["schema"] == db_schema
                inserted = time.monotonic()
                _alert(db, "streamed", "firing", NOW, NOW)
                event = _read_event(lines, "alert")
                assert time.monotonic() - inserted < 5
                assert event["op"] == "INSERT" and not event["truncated"]
                assert event["alert"]["fingerprint"] == "streamed" and event["alert"]["status"] == "firing"
                assert event["alert"]["annotations"] == {"summary": "hot"}
                # a row too large for one notification is announced without labels and annotations
                _alert(db, "streamed-big", "firing", NOW, NOW)
                db.execute(
                    "UPDATE alert_history SET annotations = %s WHERE fingerprint = 'streamed-big'",
                    (Jsonb({"summary": "x" * 9000}),),
                )
                inserted, updated = _read_event(lines, "alert"), _read_event(lines, "alert")
                assert inserted["alert"]["fingerprint"] == "streamed-big" and not inserted["truncated"]
                assert updated["op"] == "UPDATE" and updated["truncated"]
                assert updated["alert"]["fingerprint"] == "streamed-big"
                assert "annotations" not in updated["alert"]
                assert state.streams == 1
            # the client went away: the stream ends and its connection closes without waiting for an event
            deadline = time.monotonic() + 3
            while state.streams and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state.streams == 0

            with http.stream("GET", url, headers=bearer(tokens, "admin")) as response:
                _read_event(response.iter_lines(), "ready")
                stopping = time.monotonic()
                api_server.should_exit = True
                thread.join(timeout=10)
                assert not thread.is_alive(), "an open stream held the shutdown"
                assert time.monotonic() - stopping < 5
        audited = db.execute("SELECT status FROM audit_log WHERE endpoint = '/alerts/stream'").fetchall()
        assert audited == [(200,), (200,)]
    finally:
        api_server.should_exit = True
        thread.join(timeout=10)


def test_the_service_stops_cleanly_on_sigterm(database_url: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "AIMA_DATABASE_URL": database_url,
        "AIMA_API_HOST": "127.0.0.1",
        "AIMA_API_PORT": str(port),
        "AIMA_STATE_DIR": str(tmp_path),
    }
    code = "from api.main import run; from bus.settings import Settings; run(Settings())"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        deadline, status = time.monotonic() + 20, None
        while status != 200 and time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code
            except httpx.TransportError:
                time.sleep(0.1)
        assert status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=5)
    logs = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "stop requested" for line in logs), stderr.decode()[-2000:]


@pytest.mark.usefixtures("cost_rows")
def test_cost_metrics_aggregate_their_stored_figures_per_calendar_bucket(
    client: TestClient, tokens: dict[str, tuple[str, str]]
) -> None:
    day = NOW.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    span = {"start_time": (day - timedelta(days=40)).isoformat(), "end_time": NOW.isoformat()}
    hourly = client.get(
        "/metrics/aggregated/cost_estimated_eur",
        params={"interval": "1h", "labels": "project=p1", **span},
        headers=bearer(tokens, "finance"),
    )
    assert hourly.status_code == 200, hourly.text
    body = hourly.json()
    assert body["source"] == "costs"
    got = sorted((b["bucket_start"], b["count"], b["max"]) for b in body["buckets"])
    assert [(datetime.fromisoformat(s), c, m) for s, c, m in got] == [
        (day + timedelta(hours=5), 1, 5.0),
        (day + timedelta(hours=10), 1, 10.0),
    ]
    daily = client.get(
        "/metrics/aggregated/cost_estimated_eur",
        params={"interval": "1d", "labels": "project=p1", **span},
        headers=bearer(tokens, "finance"),
    ).json()
    [bucket] = daily["buckets"]
    assert (bucket["count"], bucket["min"], bucket["max"], bucket["avg"]) == (2, 5.0, 10.0, 7.5)
    assert datetime.fromisoformat(bucket["bucket_end"]) - datetime.fromisoformat(
        bucket["bucket_start"]
    ) == timedelta(days=1)
    month = day.replace(day=1)
    monthly = client.get(
        "/metrics/aggregated/budget_utilization_percent",
        params={"interval": "month", **span},
        headers=bearer(tokens, "finance"),
    ).json()
    assert sorted(b["max"] for b in monthly["buckets"]) == [40.0, 90.0]
    for b in monthly["buckets"]:
        assert datetime.fromisoformat(b["bucket_start"]) == month
        assert datetime.fromisoformat(b["bucket_end"]) == (month + timedelta(days=32)).replace(day=1)


def test_the_console_serves_its_chart_library_from_the_configured_folder(
    settings: Settings, db_schema: str, tmp_path: Path
) -> None:
    """AIMA_API_UI_LIBRARY_DIR: an image puts uPlot elsewhere than ./dev setup's .aima/npm."""
    (tmp_path / "uPlot.iife.min.js").write_text("/* uPlot */")
    config = ApiSettings.from_environ({"AIMA_API_UI_LIBRARY_DIR": str(tmp_path)})
    with TestClient(create_app(settings, schema=db_schema, config=config)) as client:
        served = client.get("/ui/lib/uPlot.iife.min.js")
        assert served.status_code == 200 and served.text == "/* uPlot */"
        assert served.headers["content-type"].startswith("text/javascript")
        missing = client.get("/ui/lib/uPlot.min.css")
        assert missing.status_code == 404 and "AIMA_API_UI_LIBRARY_DIR" in missing.json()["detail"]
        assert client.get("/ui/lib/other.js").status_code == 404
