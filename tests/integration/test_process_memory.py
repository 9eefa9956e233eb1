"""Per-process GPU memory through the real path: GpuSamples with processes and the job events that say who
held each host go through the broker, the sink writes one gpu_process_samples row per process, and the API
(/metrics/raw, /metrics/aggregated, /fleet/processes) returns every process to an admin and to a user token
only those of hosts its projects' jobs held alone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api import auth
from api.app import create_app
from api.config import ApiSettings
from bus.settings import Settings
from tests.integration.test_db_sink import gpu_sample, produce, running_sink, wait_until

pytestmark = pytest.mark.integration

METRIC = "gpu_process_memory_used_bytes"
GIB = 1 << 30
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
# Ten slow reads 30 s apart: with each record delivered twice, enough for the sink's columnar path.
SAMPLE_TIMES = tuple(T0 + timedelta(seconds=30 * i) for i in range(10))
# host -> (gpu uuid, mig instance, processes): pid, name, bytes.
GPUS: dict[str, list[tuple[str, str | None, list[dict[str, Any]]]]] = {
    "h-a": [
        (
            "GPU-A",
            None,
            [
                {"pid": 101, "name": "train_a", "used_memory_bytes": 1 * GIB},
                {"pid": 102, "name": None, "used_memory_bytes": None},  # the driver did not say
            ],
        ),
        ("MIG-A1", "gi1/ci0", [{"pid": 103, "name": "infer_a", "used_memory_bytes": 5 * GIB}]),
    ],
    "h-b": [("GPU-B", None, [{"pid": 201, "name": "shared_b", "used_memory_bytes": 2 * GIB}])],
    "h-c": [("GPU-C", None, [{"pid": 301, "name": "secret_c", "used_memory_bytes": 3 * GIB}])],
    "h-d": [("GPU-D", None, [{"pid": 401, "name": "orphan_d", "used_memory_bytes": 4 * GIB}])],
    # A GPU whose process list was not readable, and one with no process: no rows.
    "h-e": [("GPU-E0", None, None), ("GPU-E1", None, [])],  # type: ignore[list-item]
}
# (job, project, host, started, ended): h-a held by p1 alone, h-b by p1 and p2, h-c by p2 alone, h-d by
# a p1 job that ended before the samples.
JOBS = (
    ("ja", "p1", "h-a", T0 - timedelta(minutes=1), None),
    ("jb1", "p1", "h-b", T0 - timedelta(minutes=1), None),
    ("jb2", "p2", "h-b", T0 - timedelta(minutes=1), None),
    ("jc", "p2", "h-c", T0 - timedelta(minutes=1), None),
    ("jd", "p1", "h-d", T0 - timedelta(minutes=3), T0 - timedelta(seconds=30)),
)


def _records() -> list[tuple[str, str, str, dict[str, Any]]]:
    records = []
    for host, gpus in GPUS.items():
        for index, (uuid, mig, processes) in enumerate(gpus):
            for at in SAMPLE_TIMES:
                value = {
                    **gpu_sample(0, host=host, mig=mig),
                    "time": at,
                    "gpu": index,
                    "gpu_uuid": uuid,
                    "parent_gpu_uuid": "GPU-A" if mig else None,
                    "interval_group": "slow",
                    "processes": processes,
                }
                records.append(("gpu.samples", f"{host}/{uuid}", "GpuSample", value))
    for job, project, host, started, ended in JOBS:
        for event, at in (("started", started), ("finished", ended)):
            if at is None:
                continue
            value = {
                "time": at, "job_id": job, "event": event, "project": project, "user": None,
                "service": "media", "queue": "default", "model": "yolo", "host": host, "gpu_count": 1,
                "gpu_model": "H100", "provider": "cloud-x", "pricing": "on_demand", "media_minutes": None,
                "queue_wait_seconds": 1.0 if event == "started" else None, "error": None, "source": "test",
            }  # fmt: skip
            records.append(("job.events", job, "JobEvent", value))
    return records


@pytest.fixture
def client(settings: Settings, db_schema: str) -> Iterator[TestClient]:
    app = create_app(settings, schema=db_schema, config=ApiSettings.from_environ({}))
    with TestClient(app) as test_client:
        yield test_client


def _bearer(db: psycopg.Connection[Any], role: str, scopes: list[str], projects: list[str]) -> dict[str, str]:
    _, token = auth.create_token(db, role, scopes, projects, name=f"{role}-{'-'.join(projects) or 'all'}")
    return {"Authorization": f"Bearer {token}"}


def _range() -> dict[str, str]:
    return {
        "start_time": (T0 - timedelta(minutes=5)).isoformat(),
        "end_time": (T0 + timedelta(minutes=5)).isoformat(),
    }


def _raw(client: TestClient, headers: dict[str, str]) -> set[tuple[str, str, str, str | None, float]]:
    answer = client.get(f"/metrics/raw/{METRIC}", params=_range(), headers=headers)
    assert answer.status_code == 200, answer.text
    return {
        (s["time"], s["labels"]["host"], s["labels"]["pid"], s["labels"].get("process_name"), s["value"])
        for s in answer.json()["samples"]
    }


def test_processes_go_from_the_broker_to_rows_and_the_api_filters_them_for_user_tokens(
    topics: Settings, db_schema: str, db: psycopg.Connection[Any], client: TestClient
) -> None:
    records = _records()
    produce(topics, records)
    produce(topics, records)  # delivered twice: stored once
    rows_expected = sum(len(p or ()) for gpus in GPUS.values() for _, _, p in gpus) * len(SAMPLE_TIMES)
    events_expected = sum(1 + (ended is not None) for *_, ended in JOBS)

    def stored() -> tuple[int, int]:
        return (
            db.execute("SELECT count(*) FROM gpu_process_samples").fetchone()[0],
            db.execute("SELECT count(*) FROM job_events").fetchone()[0],
        )

    with running_sink(topics, db_schema, topics=("gpu.samples", "job.events")):
        wait_until(lambda: stored() == (rows_expected, events_expected), what="every process row stored")
    assert stored() == (rows_expected, events_expected) == (6 * len(SAMPLE_TIMES), 6)
    assert db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 7 * len(SAMPLE_TIMES)

    rows = db.execute(
        """SELECT host, gpu_uuid, mig_instance, pid, process_name, used_memory_bytes
             FROM gpu_process_samples WHERE time = %s ORDER BY host, pid""",
        (T0,),
    ).fetchall()
    assert rows == [
        ("h-a", "GPU-A", "", 101, "train_a", GIB),
        ("h-a", "GPU-A", "", 102, None, None),
        ("h-a", "MIG-A1", "gi1/ci0", 103, "infer_a", 5 * GIB),
        ("h-b", "GPU-B", "", 201, "shared_b", 2 * GIB),
        ("h-c", "GPU-C", "", 301, "secret_c", 3 * GIB),
        ("h-d", "GPU-D", "", 401, "orphan_d", 4 * GIB),
    ]

    scope = [f"metrics:read:{METRIC}"]
    admin = _bearer(db, "admin", [], [])
    p1 = _bearer(db, "user", scope, ["p1"])
    p2 = _bearer(db, "user", scope, ["p2"])
    both = _bearer(db, "user", ["metrics:read:*"], ["p1", "p2"])
    unscoped = _bearer(db, "user", ["metrics:read:gpu_utilization_percent"], ["p1"])

    # Raw samples: the admin sees every process with a memory figure (pid 102 has none), at both times.
    seen = _raw(client, admin)
    assert {(host, pid) for _, host, pid, _, _ in seen} == {
        ("h-a", "101"), ("h-a", "103"), ("h-b", "201"), ("h-c", "301"), ("h-d", "401")
    }  # fmt: skip
    assert len(seen) == 5 * len(SAMPLE_TIMES)
    assert (T0.isoformat(), "h-a", "101", "train_a", float(GIB)) in seen
    # A user token: only the hosts its projects' jobs held alone (h-b is shared; h-d's job had ended).
    assert {(host, pid) for _, host, pid, _, _ in _raw(client, p1)} == {("h-a", "101"), ("h-a", "103")}
    assert {(host, pid) for _, host, pid, _, _ in _raw(client, p2)} == {("h-c", "301")}
    # Both projects: h-b too, every job there being theirs.
    assert {host for _, host, _, _, _ in _raw(client, both)} == {"h-a", "h-b", "h-c"}
    denied = client.get(f"/metrics/raw/{METRIC}", params=_range(), headers=unscoped)
    assert denied.status_code == 403, denied.text

    # Aggregated: never rolled up, so hour buckets come from the raw rows, filtered alike.
    answer = client.get(f"/metrics/aggregated/{METRIC}", params={**_range(), "interval": "1h"}, headers=p1)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["source"] == "raw"
    assert {(b["labels"]["host"], b["labels"]["pid"]) for b in body["buckets"]} == {
        ("h-a", "101"),
        ("h-a", "103"),
    }
    assert sum(b["count"] for b in body["buckets"]) == 2 * len(SAMPLE_TIMES)
    answer = client.get(f"/metrics/aggregated/{METRIC}", params={**_range(), "interval": "1h"}, headers=admin)
    assert sum(b["count"] for b in answer.json()["buckets"]) == 5 * len(SAMPLE_TIMES)

    # /fleet/processes: the latest sample of each process, with the jobs on its host then.
    answer = client.get("/fleet/processes", params=_range(), headers=admin)
    assert answer.status_code == 200, answer.text
    latest = {(p["host"], p["pid"]): p for p in answer.json()["processes"]}
    assert set(latest) == {("h-a", 101), ("h-a", 102), ("h-a", 103), ("h-b", 201), ("h-c", 301), ("h-d", 401)}
    assert {p["time"] for p in latest.values()} == {SAMPLE_TIMES[-1].isoformat()}
    assert latest[("h-a", 101)]["jobs"] == [{"job_id": "ja", "project": "p1"}]
    assert latest[("h-a", 103)]["mig_instance"] == "gi1/ci0" and latest[("h-a", 101)]["mig_instance"] is None
    assert latest[("h-a", 102)]["used_memory_bytes"] is None and latest[("h-a", 102)]["process_name"] is None
    assert sorted(j["job_id"] for j in latest[("h-b", 201)]["jobs"]) == ["jb1", "jb2"]
    assert latest[("h-d", 401)]["jobs"] == []
    answer = client.get("/fleet/processes", params={**_range(), "gpu_uuid": "GPU-C"}, headers=admin)
    assert [p["pid"] for p in answer.json()["processes"]] == [301]
    answer = client.get("/fleet/processes", params=_range(), headers=p1)
    assert answer.status_code == 200, answer.text
    assert {(p["host"], p["pid"]) for p in answer.json()["processes"]} == {
        ("h-a", 101),
        ("h-a", 102),
        ("h-a", 103),
    }
    assert {j["project"] for p in answer.json()["processes"] for j in p["jobs"]} == {"p1"}
    answer = client.get("/fleet/processes", params={**_range(), "host": "h-c"}, headers=p1)
    assert answer.status_code == 200 and answer.json()["processes"] == []
    answer = client.get("/fleet/processes", params={**_range(), "limit": 2}, headers=admin)
    assert len(answer.json()["processes"]) == 2 and answer.json()["truncated"] is True

    # Bad parameters and missing scopes: 4xx with a reason.
    assert client.get("/fleet/processes", headers=unscoped).status_code == 403
    assert client.get("/fleet/processes", params={"limit": 0}, headers=admin).status_code == 422
    assert client.get("/fleet/processes", params={"gpu_uuid": "GPU-\x00"}, headers=admin).status_code == 422
    backwards = {"start_time": T0.isoformat(), "end_time": (T0 - timedelta(minutes=1)).isoformat()}
    answer = client.get("/fleet/processes", params=backwards, headers=admin)
    assert answer.status_code == 400 and "not after" in answer.text
    answer = client.get(f"/metrics/raw/{METRIC}", params={"labels": "pid"}, headers=admin)
    assert answer.status_code == 400, answer.text
    answer = client.get(f"/metrics/raw/{METRIC}", params={"labels": "no_such_label=1"}, headers=admin)
    assert answer.status_code == 400, answer.text
    assert client.get("/fleet/processes").status_code == 401

    # Every read of the processes is in the audit trail, the refused ones with their reason.
    audited = db.execute(
        """SELECT outcome, reason, row_count FROM audit_log
            WHERE endpoint = '/fleet/processes' AND metric = %s ORDER BY id""",
        (METRIC,),
    ).fetchall()
    assert audited[0] == ("allowed", None, 6)
    assert ("denied", "insufficient_scope", None) in audited
