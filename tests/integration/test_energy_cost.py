"""Energy cost through the real path (issue 17, item 3): GPU samples with power and energy counters (one
counter resets, some readings lack it) and job events go through the real broker into a stream worker
running the cost processors; its cost records go through the sink into PostgreSQL, where the
``energy_costs`` view shares the fleet's energy out by GPU-hours, and ``GET /costs`` returns it beside the
GPU-hour cost, a user token seeing its own project only. Each GPU's hour goes on the ``energy`` topic into
``gpu_energy``, and ``GET /costs/gpus`` returns it to admin and finance tokens, not to user tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api import auth
from api.app import create_app
from api.config import ApiSettings
from bus.settings import REPO_ROOT, Settings
from tests.integration.test_db_sink import running_sink, wait_until
from tests.integration.test_streams_costs import H100, at, collect, job_event, produce

pytestmark = pytest.mark.integration

TARIFF = 0.3
PRICES = f'energy_eur_per_kwh: {TARIFF}\nproviders: {{aws: {{"{H100}": {{on_demand: 4.0}}}}}}\n'
FLEET_10 = f"idle|{H100}|2025-04-10T10:00Z"
# GPU-0 draws 300 W, GPU-1 600 W, steadily from 10:00 to 11:00: 0.3 + 0.6 kWh. GPU-1's counter resets
# half way and is missing for five readings: power x time stands in there, the same at a steady draw.
FLEET_KWH = 0.9
# Jobs: archive holds 1 GPU 10:00-11:00, newsroom 1 GPU 10:30-11:00: 1.5 of the 2 device-hours held,
# so each GPU-hour carries 0.45 kWh.
SHARES = {"archive": 1.0 * 0.45, "newsroom": 0.5 * 0.45, None: 0.5 * 0.45}
PER_GPU = {"GPU-0": 0.3, "GPU-1": 0.6}
"""kWh of each GPU in the hour (its counter; GPU-1's power x time where it reset or is missing)."""


def gpu_samples() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for gpu, watts in (("GPU-0", 300.0), ("GPU-1", 600.0)):
        for i in range(121):
            joules: float | None = 5e6 + watts * 30 * i
            if gpu == "GPU-1" and i >= 60:
                joules = watts * 30 * (i - 60)  # the driver was reloaded: the counter starts again
            if gpu == "GPU-1" and 80 <= i <= 84:
                joules = None
            value = {
                "time": at(10) + timedelta(seconds=30 * i), "host": "gpu-01", "gpu": int(gpu[-1]),
                "gpu_uuid": gpu, "gpu_model": H100, "source": "test", "interval_group": "slow",
                "power_watts": watts, "energy_joules": joules,
            }  # fmt: skip
            out.append((f"gpu-01/{gpu}", value))
    return out


def _priced(costs: dict[str, Any]) -> bool:
    fleet = costs.get(FLEET_10)
    return (
        fleet is not None
        and fleet["energy_kwh"] == pytest.approx(FLEET_KWH)
        and fleet["idle_gpu_hours"] == pytest.approx(0.5)
    )


@pytest.fixture
def worker(topics: Settings, unique: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    env = dict(
        os.environ,
        AIMA_KAFKA_BOOTSTRAP=topics.kafka_bootstrap,
        AIMA_TOPIC_PREFIX=topics.topic_prefix,
        AIMA_STATE_DIR=str(tmp_path / "state"),
        AIMA_STREAMS_APP_ID=f"energy{unique}",
        AIMA_STREAMS_COMMIT_INTERVAL_S="0.5",
        AIMA_PRICES_FILE=str(prices),
        PYTHONPATH=str(REPO_ROOT),
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.faust_apps.costs_app"], env=env, cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield process, log_path
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_energy_cost_from_samples_to_the_api(
    topics: Settings,
    db_schema: str,
    db: psycopg.Connection[Any],
    worker: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log_path = worker
    produce(topics, "job.events", "JobEvent", [
        ("a1", job_event("started", at(10), job_id="a1", project="archive", gpu_count=1)),
        ("a1", job_event("finished", at(11), job_id="a1", project="archive", gpu_count=1)),
        ("n1", job_event("started", at(10, 30), job_id="n1", gpu_count=1)),
        ("n1", job_event("finished", at(11), job_id="n1", gpu_count=1)),
    ])  # fmt: skip
    produce(topics, "gpu.samples", "GpuSample", gpu_samples())

    # The cost records on the broker: the fleet's hour carries the energy and its cost.
    costs, _, dead = collect(topics, process, log_path, _priced)
    assert _priced(costs), costs.get(FLEET_10)
    assert costs[FLEET_10]["energy_cost_eur"] == pytest.approx(FLEET_KWH * TARIFF)
    assert dead == []

    # Through the sink into the costs table, and shared out by the energy_costs view.
    def stored() -> dict[str | None, tuple[float, float]]:
        rows = db.execute(
            "SELECT project, energy_kwh, energy_cost_eur FROM energy_costs WHERE time = %s", (at(10),)
        ).fetchall()
        return {project: (kwh, eur) for project, kwh, eur in rows}

    def per_gpu() -> dict[str, tuple[Any, ...]]:
        rows = db.execute(
            "SELECT gpu_uuid, gpu_model, device_hours, energy_kwh, energy_cost_eur, period_end"
            " FROM gpu_energy WHERE time = %s",
            (at(10),),
        ).fetchall()
        return {row[0]: row[1:] for row in rows}

    expected_gpus = {
        uuid: (H100, pytest.approx(1.0), pytest.approx(kwh), pytest.approx(kwh * TARIFF), at(11))
        for uuid, kwh in PER_GPU.items()
    }
    with running_sink(topics, db_schema):
        wait_until(
            lambda: (
                {p: pytest.approx(k) for p, k in SHARES.items()}
                == {p: kwh for p, (kwh, _) in stored().items()}
            ),
            timeout_s=90,
            what="the energy shares in the database",
        )
        wait_until(lambda: per_gpu() == expected_gpus, timeout_s=60, what="each GPU's energy in gpu_energy")
    assert db.execute("SELECT count(*) FROM gpu_energy").fetchone() == (2,)  # one row per GPU and hour
    fleet = db.execute(
        "SELECT energy_kwh, energy_cost_eur FROM costs"
        " WHERE kind = 'gpu_hours' AND project = '' AND time = %s",
        (at(10),),
    ).fetchone()
    assert fleet == (pytest.approx(FLEET_KWH), pytest.approx(FLEET_KWH * TARIFF))
    shares = stored()
    for project, kwh in SHARES.items():
        assert shares[project] == (pytest.approx(kwh), pytest.approx(kwh * TARIFF)), project
    assert sum(kwh for kwh, _ in shares.values()) == pytest.approx(FLEET_KWH)  # nothing lost or doubled
    assert sum(row[2] for row in per_gpu().values()) == pytest.approx(FLEET_KWH)  # the fleet's is their sum

    # GET /costs: the energy beside the GPU-hour cost; a user token sees its own project only.
    app = create_app(topics, schema=db_schema, config=ApiSettings.from_environ({}))
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    user = {"Authorization": f"Bearer {auth.create_token(db, 'user', [], ['newsroom'], name='nina')[1]}"}
    finance = {"Authorization": f"Bearer {auth.create_token(db, 'finance', name='fiona')[1]}"}
    span = {"start_time": "2025-04-10T10:00:00Z", "end_time": "2025-04-10T11:00:00Z", "period": "hour"}
    with TestClient(app) as client:
        answer = client.get("/costs", params={**span, "group_by": "project"}, headers=admin)
        assert answer.status_code == 200, answer.text
        rows = {row["project"]: row for row in answer.json()["rows"]}
        assert set(rows) == {"archive", "newsroom", None}
        for project, kwh in SHARES.items():
            assert rows[project]["energy_kwh"] == pytest.approx(kwh), project
            assert rows[project]["energy_cost_eur"] == pytest.approx(kwh * TARIFF), project
        assert rows["newsroom"]["gpu_hours"] == pytest.approx(0.5)
        assert rows["newsroom"]["cost_eur"] == pytest.approx(2.0)  # 0.5 GPU-hours x 4 EUR, beside
        by_model = client.get("/costs", params={**span, "group_by": "gpu_model"}, headers=admin).json()
        assert [(r["gpu_model"], r["energy_kwh"]) for r in by_model["rows"]] == [
            (H100, pytest.approx(FLEET_KWH))
        ]
        mine = client.get("/costs", params={**span, "group_by": "project"}, headers=user).json()
        assert [(r["project"], r["energy_kwh"]) for r in mine["rows"]] == [
            ("newsroom", pytest.approx(SHARES["newsroom"]))
        ]

        # GET /costs/gpus: each GPU's energy and its cost per hour, for admin and finance tokens.
        for headers in (admin, finance):
            answer = client.get("/costs/gpus", params=span, headers=headers)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["truncated"] is False
            gpus = {row["gpu_uuid"]: row for row in body["rows"]}
            assert set(gpus) == set(PER_GPU)
            for uuid, kwh in PER_GPU.items():
                row = gpus[uuid]
                assert row["period_start"].startswith("2025-04-10T10:00:00"), row
                assert (row["gpu_model"], row["device_hours"], row["hours_with_energy"]) == (
                    H100,
                    pytest.approx(1.0),
                    1,
                ), uuid
                assert row["energy_kwh"] == pytest.approx(kwh), uuid
                assert row["energy_cost_eur"] == pytest.approx(kwh * TARIFF), uuid
        one = client.get(
            "/costs/gpus", params={**span, "gpu_uuid": "GPU-1", "period": "total"}, headers=admin
        )
        assert [(r["gpu_uuid"], r["energy_kwh"]) for r in one.json()["rows"]] == [
            ("GPU-1", pytest.approx(0.6))
        ]
        none = client.get("/costs/gpus", params={**span, "gpu_model": "NVIDIA L4"}, headers=admin)
        assert none.status_code == 200 and none.json()["rows"] == []
        # A GPU belongs to no project: a user token is refused, saying why; bad parameters are named.
        refused = client.get("/costs/gpus", params=span, headers=user)
        assert refused.status_code == 403 and "admin or finance" in refused.json()["detail"], refused.text
        bad = client.get("/costs/gpus", params={**span, "period": "fortnight"}, headers=admin)
        assert bad.status_code == 422 and "'period'" in bad.json()["detail"], bad.text
        backwards = {"start_time": "2025-04-10T11:00:00Z", "end_time": "2025-04-10T10:00:00Z"}
        assert client.get("/costs/gpus", params=backwards, headers=admin).status_code == 400


# Jobs whose events name their GPUs: archive holds GPU-1 (0.6 kWh) all the hour, newsroom GPU-0 (0.3 kWh)
# from 10:30: each gets its GPU's measured share (not the average's 0.45 and 0.225); the rest is idle.
MEASURED = {"archive": 0.6, "newsroom": 0.5 * 0.3, None: 0.5 * 0.3}


def test_a_projects_energy_is_its_gpus_measured_share(
    topics: Settings,
    db_schema: str,
    db: psycopg.Connection[Any],
    worker: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log_path = worker
    archive = {"job_id": "a1", "project": "archive", "gpu_count": 1, "gpu_uuids": ["GPU-1"]}
    newsroom = {"job_id": "n1", "gpu_count": 1, "gpu_uuids": ["GPU-0"]}
    produce(topics, "job.events", "JobEvent", [
        ("a1", job_event("started", at(10), **archive)),
        ("a1", job_event("finished", at(11), **archive)),
        ("n1", job_event("started", at(10, 30), **newsroom)),
        ("n1", job_event("finished", at(11), **newsroom)),
        # Names one GPU twice for a job of two: dead-lettered, saying why, and no share.
        ("x1", job_event("started", at(10), job_id="x1", gpu_uuids=["GPU-0", "GPU-0"])),
    ])  # fmt: skip
    produce(topics, "gpu.samples", "GpuSample", gpu_samples())

    costs, _, dead = collect(topics, process, log_path, _priced)
    assert _priced(costs), costs.get(FLEET_10)
    assert [letter["origin_topic"].endswith("job.events") for letter in dead] == [True], dead
    assert "gpu_uuids: names a GPU more than once" in dead[0]["reason"], dead[0]

    def stored() -> dict[tuple[str | None, str], float]:
        rows = db.execute(
            "SELECT project, basis, energy_kwh FROM energy_costs WHERE time = %s", (at(10),)
        ).fetchall()
        return {(project, basis): kwh for project, basis, kwh in rows}

    expected = {
        (project, "idle" if project is None else "measured"): pytest.approx(kwh)
        for project, kwh in MEASURED.items()
    }
    with running_sink(topics, db_schema):
        wait_until(lambda: stored() == expected, timeout_s=90, what="the measured energy shares")
    assert db.execute(
        "SELECT job_id, gpu_uuids, started, ended FROM job_placements ORDER BY job_id"
    ).fetchall() == [("a1", ["GPU-1"], at(10), at(11)), ("n1", ["GPU-0"], at(10, 30), at(11))]
    assert sum(stored().values()) == pytest.approx(FLEET_KWH)  # the hour's rows add up to the fleet's

    # GET /costs: each project's measured share; a user token sees its own project only.
    app = create_app(topics, schema=db_schema, config=ApiSettings.from_environ({}))
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    user = {"Authorization": f"Bearer {auth.create_token(db, 'user', [], ['newsroom'], name='nina')[1]}"}
    span = {"start_time": "2025-04-10T10:00:00Z", "end_time": "2025-04-10T11:00:00Z", "period": "hour"}
    with TestClient(app) as client:
        answer = client.get("/costs", params={**span, "group_by": "project"}, headers=admin)
        assert answer.status_code == 200, answer.text
        rows = {row["project"]: row for row in answer.json()["rows"]}
        assert set(rows) == set(MEASURED)
        for project, kwh in MEASURED.items():
            assert rows[project]["energy_kwh"] == pytest.approx(kwh), project
            assert rows[project]["energy_cost_eur"] == pytest.approx(kwh * TARIFF), project
        assert rows["archive"]["gpu_hours"] == pytest.approx(1.0)
        assert rows["newsroom"]["cost_eur"] == pytest.approx(2.0)  # the GPU-hour cost beside, unchanged
        mine = client.get("/costs", params={**span, "group_by": "project"}, headers=user).json()
        assert [(r["project"], r["energy_kwh"]) for r in mine["rows"]] == [
            ("newsroom", pytest.approx(MEASURED["newsroom"]))
        ]
