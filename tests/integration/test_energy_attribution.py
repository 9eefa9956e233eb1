"""A project's energy measured per GPU (issue 17, item 3): the rule of the ``energy_costs`` view (migration
0020, its one home) as logic, on rows written straight into a migrated schema, no broker or stream app:
job events (whose trigger keeps ``job_placements``), each GPU's hour in ``gpu_energy`` and the cost rows the
stream app writes (the projects' GPU-hours, the fleet's energy per model and hour).

A job whose events name its GPUs gets, of each such GPU's measured kWh, the share of the hour it held it;
what the GPU drew the rest of the hour is idle; a job without GPU UUIDs keeps the GPU-hour average of what
the measured shares leave; an hour's rows always add up to the fleet's energy."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumers.migrate import MIGRATIONS_DIR, migrate

pytestmark = pytest.mark.integration

H100 = "NVIDIA H100 80GB HBM3"
HOUR = datetime(2025, 4, 10, 10, tzinfo=UTC)
TARIFF = 0.3


def at(minute: int) -> datetime:
    return HOUR + timedelta(minutes=minute)


def job(
    db: psycopg.Connection[Any],
    job_id: str,
    project: str,
    start: int,
    end: int | None,
    uuids: list[str] | None,
    *,
    gpu_count: int | None = None,
) -> None:
    """A job's started and (unless ``end`` is None) finished events, minutes after 10:00."""
    events = [("started", at(start))] + ([("finished", at(end))] if end is not None else [])
    for event, time in events:
        db.execute(
            "INSERT INTO job_events (time, job_id, event, project, host, gpu_count, gpu_uuids, gpu_model,"
            " provider, pricing, source) VALUES (%s, %s, %s, %s, 'gpu-01', %s, %s, %s, 'aws', 'on_demand',"
            " 'test')",
            (time, job_id, event, project, gpu_count or len(uuids or [1]), uuids, H100),
        )


def gpu_hour(db: psycopg.Connection[Any], uuid: str, kwh: float) -> None:
    db.execute(
        "INSERT INTO gpu_energy (time, period_end, gpu_uuid, gpu_model, device_hours, energy_kwh,"
        " energy_cost_eur, currency, source, emitted_at) VALUES (%s, %s, %s, %s, 1.0, %s, %s, 'EUR', 'test',"
        " now())",
        (HOUR, HOUR + timedelta(hours=1), uuid, H100, kwh, kwh * TARIFF),
    )


def fleet_hour(db: psycopg.Connection[Any], device_hours: float, kwh: float) -> None:
    """The stream app's fleet row of the model's hour: its devices' hours and energy (their sum)."""
    db.execute(
        "INSERT INTO costs (time, period_end, kind, gpu_model, device_hours, energy_kwh, energy_cost_eur,"
        " currency, source, emitted_at) VALUES (%s, %s, 'gpu_hours', %s, %s, %s, %s, 'EUR', 'test', now())",
        (HOUR, HOUR + timedelta(hours=1), H100, device_hours, kwh, kwh * TARIFF),
    )


def project_hours(db: psycopg.Connection[Any], project: str, gpu_hours: float) -> None:
    """The cost processor's GPU-hours of a project in the hour (every job's, named GPUs or not)."""
    db.execute(
        "INSERT INTO costs (time, period_end, kind, project, gpu_model, provider, pricing, gpu_hours,"
        " currency, source, emitted_at) VALUES (%s, %s, 'gpu_hours', %s, %s, 'aws', 'on_demand', %s, 'EUR',"
        " 'test', now())",
        (HOUR, HOUR + timedelta(hours=1), project, H100, gpu_hours),
    )


def shares(db: psycopg.Connection[Any]) -> dict[tuple[str | None, str], tuple[float, float, float]]:
    """(project, basis) -> (gpu_hours, energy_kwh, energy_cost_eur) of the hour."""
    rows = db.execute(
        "SELECT project, basis, gpu_hours, energy_kwh, energy_cost_eur FROM energy_costs WHERE time = %s",
        (HOUR,),
    ).fetchall()
    found: dict[tuple[str | None, str], tuple[float, float, float]] = {}
    for project, basis, hours, kwh, eur in rows:
        assert (project, basis) not in found, rows
        found[project, basis] = (hours, kwh, eur)
    return found


@pytest.fixture
def partitions(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    db.execute("SELECT aima_ensure_partitions(%s)", (HOUR - timedelta(days=1),))
    return db


def test_a_gpu_held_half_the_hour_gives_its_project_half_its_measured_energy(
    partitions: psycopg.Connection[Any],
) -> None:
    db = partitions
    # GPU-0 draws 0.2 kWh, GPU-1 0.6: the model's average is 0.4 per device-hour.
    gpu_hour(db, "GPU-0", 0.2)
    gpu_hour(db, "GPU-1", 0.6)
    fleet_hour(db, 2.0, 0.8)
    job(db, "a1", "archive", 0, 30, ["GPU-1"])
    project_hours(db, "archive", 0.5)
    found = shares(db)
    assert set(found) == {("archive", "measured"), (None, "idle")}
    # Half of GPU-1's 0.6 kWh, not the average's 0.5 GPU-hours x 0.4 = 0.2.
    assert found["archive", "measured"] == (pytest.approx(0.5), pytest.approx(0.3), pytest.approx(0.09))
    assert found[None, "idle"][1] == pytest.approx(0.5)  # GPU-1's other half and all of GPU-0
    assert sum(kwh for _, kwh, _ in found.values()) == pytest.approx(0.8)


def test_a_job_without_gpu_uuids_keeps_the_gpu_hour_average(partitions: psycopg.Connection[Any]) -> None:
    db = partitions
    gpu_hour(db, "GPU-0", 0.2)
    gpu_hour(db, "GPU-1", 0.6)
    fleet_hour(db, 2.0, 0.8)
    job(db, "n1", "newsroom", 0, 30, None, gpu_count=1)
    project_hours(db, "newsroom", 0.5)
    assert db.execute("SELECT count(*) FROM job_placements WHERE gpu_uuids IS NOT NULL").fetchone() == (0,)
    found = shares(db)
    assert set(found) == {("newsroom", "gpu_hours"), (None, "idle")}
    # 0.5 GPU-hours x 0.8 kWh / 2 device-hours, as migration 0016 shared it.
    assert found["newsroom", "gpu_hours"][1] == pytest.approx(0.2)
    assert found[None, "idle"] == (pytest.approx(1.5), pytest.approx(0.6), pytest.approx(0.18))


def test_measured_and_averaged_jobs_in_one_hour_add_up_to_the_fleet(
    partitions: psycopg.Connection[Any],
) -> None:
    db = partitions
    for uuid, kwh in (("GPU-0", 0.2), ("GPU-1", 0.6), ("GPU-2", 0.4), ("GPU-3", 0.4)):
        gpu_hour(db, uuid, kwh)
    fleet_hour(db, 4.0, 1.6)
    job(db, "a1", "archive", 0, 60, ["GPU-1"])  # all of GPU-1: 0.6
    job(db, "a2", "archive", 30, 60, None, gpu_count=1)  # somewhere, half an hour
    job(db, "n1", "newsroom", 15, 45, ["GPU-0", "GPU-2"])  # half of GPU-0 and of GPU-2: 0.1 + 0.2
    project_hours(db, "archive", 1.5)
    project_hours(db, "newsroom", 1.0)
    found = shares(db)
    assert found["archive", "measured"][:2] == (pytest.approx(1.0), pytest.approx(0.6))
    assert found["newsroom", "measured"][:2] == (pytest.approx(1.0), pytest.approx(0.3))
    # What the meters leave: 1.6 - 0.9 = 0.7 kWh over the 4 - 2 = 2 device-hours no named job held.
    assert found["archive", "gpu_hours"][:2] == (pytest.approx(0.5), pytest.approx(0.7 * 0.5 / 2))
    assert found[None, "idle"][:2] == (pytest.approx(1.5), pytest.approx(0.7 * 1.5 / 2))
    assert sum(kwh for _, kwh, _ in found.values()) == pytest.approx(1.6)
    assert sum(eur for _, _, eur in found.values()) == pytest.approx(1.6 * TARIFF)


def test_jobs_sharing_a_gpu_share_its_energy_and_never_more(partitions: psycopg.Connection[Any]) -> None:
    db = partitions
    gpu_hour(db, "GPU-0", 0.6)
    fleet_hour(db, 1.0, 0.6)
    job(db, "a1", "archive", 0, 60, ["GPU-0"])
    job(db, "n1", "newsroom", 0, 30, ["GPU-0"])  # held 1.5 GPU-hours of a 1-hour GPU between them
    project_hours(db, "archive", 1.0)
    project_hours(db, "newsroom", 0.5)
    found = shares(db)
    assert found["archive", "measured"][1] == pytest.approx(0.6 * 1.0 / 1.5)
    assert found["newsroom", "measured"][1] == pytest.approx(0.6 * 0.5 / 1.5)
    assert (None, "idle") not in found
    assert sum(kwh for _, kwh, _ in found.values()) == pytest.approx(0.6)


def test_an_end_event_stored_before_its_start_still_ends_the_job(partitions: psycopg.Connection[Any]) -> None:
    db = partitions
    db.execute(
        "INSERT INTO job_events (time, job_id, event, project, host, gpu_count, source)"
        " VALUES (%s, 'a1', 'finished', 'archive', 'gpu-01', 1, 'test')",
        (at(30),),
    )
    job(db, "a1", "archive", 0, None, ["GPU-1"])
    assert db.execute(
        "SELECT gpu_uuids, started, ended FROM job_placements WHERE job_id = 'a1'"
    ).fetchone() == (
        ["GPU-1"],
        at(0),
        at(30),
    )
    gpu_hour(db, "GPU-1", 0.6)
    fleet_hour(db, 1.0, 0.6)
    project_hours(db, "archive", 0.5)
    assert shares(db)["archive", "measured"][1] == pytest.approx(0.3)


def test_a_schema_migrated_before_0021_keeps_the_gpus_jobs_held(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    """0021 folds job_gpus (0020) into job_placements: the GPUs a job held, and a job known only from an
    end event without a host, come across, and the energy view gives the same shares after as before."""
    before = tmp_path / "migrations"
    before.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) <= 20:
            shutil.copy(path, before)
    schema = f"up_{unique}"
    with psycopg.connect(database_url, autocommit=True) as db:
        try:
            migrate(db, schema=schema, directory=before)
            db.execute("SELECT aima_ensure_partitions(%s)", (HOUR - timedelta(days=1),))
            gpu_hour(db, "GPU-0", 0.2)
            gpu_hour(db, "GPU-1", 0.6)
            fleet_hour(db, 2.0, 0.8)
            job(db, "a1", "archive", 0, 30, ["GPU-1"])
            project_hours(db, "archive", 0.5)
            db.execute(
                "INSERT INTO job_events (time, job_id, event, project, gpu_count, gpu_uuids, source)"
                " VALUES (%s, 'x1', 'finished', 'archive', 1, ARRAY['GPU-0'], 'test')",
                (at(50),),
            )
            old = shares(db)
            assert old["archive", "measured"][1] == pytest.approx(0.3)

            report = migrate(db, schema=schema)
            assert report.applied == ["0021_one_job_placements"]
            assert db.execute("SELECT to_regclass('job_gpus')").fetchone() == (None,)
            assert db.execute(
                "SELECT job_id, host, gpu_uuids, started, ended FROM job_placements ORDER BY job_id"
            ).fetchall() == [
                ("a1", "gpu-01", ["GPU-1"], at(0), at(30)),
                ("x1", None, ["GPU-0"], None, at(50)),
            ]
            assert shares(db) == old
            # The one trigger left keeps the GPUs of a job that starts now, with or without a host.
            db.execute(
                "INSERT INTO job_events (time, job_id, event, project, gpu_count, gpu_uuids, source)"
                " VALUES (%s, 'n1', 'started', 'newsroom', 1, ARRAY['GPU-0'], 'test')",
                (at(40),),
            )
            assert db.execute(
                "SELECT host, gpu_uuids FROM job_placements WHERE job_id = 'n1'"
            ).fetchone() == (
                None,
                ["GPU-0"],
            )
        finally:
            for name in (schema, f"{schema}_by_project"):
                db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
