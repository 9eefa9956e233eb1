"""The recommendations through the live pipeline: a simulated fleet with injected faults (an allocated GPU
left idle, a job using a fifth of its GPU's memory, jobs slowed by throttling or memory pressure) produced to
the real broker, the stream app (``python -m streams.main``, every processor) making the rollups and cost
figures, the sink writing them and the job events into PostgreSQL; GET /recommendations and
`aima-metrics recommend` must find each injected truth the hourly rollups can show. Waits are on
conditions (the figures in the database), with generous deadlines."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient

from api import auth
from api.app import create_app
from api.config import ApiSettings
from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from producers.faults import FaultPlan
from producers.simulator import Fleet, generate
from tests.integration import test_dashboards as dashboards
from tests.integration.test_db_sink import running_sink, wait_until
from tests.integration.test_recommendations import (
    _hours_of,
    _longest_run,
    check_slowed_jobs,
    facts,
    recommend_report,
    slowed_truths,
)
from tests.integration.test_streams_rollups import stop, worker

pytestmark = pytest.mark.integration

HOURS, STEP_S, SEED, FAULT_SEED, RUN_S_SCALE = 12, 60.0, 1, 5, 8.0
KINDS = ("job_slowdown", "idle_allocated", "underused_job")
LATENESS_S = 60
"""The stream app's allowed lateness, short so that the fleet's last whole hour is final once the
simulation has gone on 90 s past it (records up to 90 s ahead of now: within the sink's clock skew)."""


def test_the_live_pipeline_recommends_what_the_simulator_injected(
    topics: Settings, db_schema: str, db: psycopg.Connection[Any], unique: str, tmp_path: Path
) -> None:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=HOURS)
    plan = FaultPlan(every_s=1.5 * 3600, duration_s=4 * 3600.0, seed=FAULT_SEED, kinds=KINDS)
    fleet = Fleet(seed=SEED, hosts=4, gpus_per_host=1, start=start, faults=plan, run_s_scale=RUN_S_SCALE)
    codec = Codec()
    producer = Producer({"bootstrap.servers": topics.kafka_bootstrap, "linger.ms": 50})
    events: list[dict[str, Any]] = []
    frames: dict[str, int] = defaultdict(int)
    memory: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for topic, key, name, value in generate(fleet, start, end + timedelta(seconds=90), STEP_S):
        if value["time"] <= end:  # what the offline truth looks at: the whole hours
            if name == "JobEvent":
                events.append(value)
            elif name == "JobTimings" and value["kind"] == "frame":
                frames[value["job_id"]] += value["count"]
            elif name == "GpuSample" and value.get("memory_utilization_percent") is not None:
                memory[value["host"]].append((value["time"], value["memory_utilization_percent"]))
        full = topic_name(topics, topic)
        producer.produce(full, key=key.encode(), value=codec.encode(name, value, topic=full))
        producer.poll(0)
    assert producer.flush(60) == 0
    sim = facts(fleet, start, end, events, frames, memory)
    slowed = slowed_truths(sim)
    # Seed 1, fault seed 5: a job throttled after normal hours, idle_allocated and underused_job faults
    # that fill whole hours (tests/integration/test_recommendations.py shows both slowdown causes).
    assert slowed, sim.truth

    log = tmp_path / "worker.log"
    workers = [
        worker(
            topics,
            f"recommend-{unique}",
            log,
            AIMA_STREAMS_LATENESS_S=str(LATENESS_S),
            AIMA_STREAMS_COMMIT_INTERVAL_S="1",
        )
    ]
    last_hour = end - timedelta(hours=1)
    started = {e["job_id"] for e in events if e["event"] == "started"}
    # The whole hours of every job, whose frame counts are each one rollup (a GPU's rollups come in order on
    # their partition, so its last hour final means the earlier ones are stored; a job's are another series).
    job_hours = sorted(
        (job_id, hour)
        for job_id, job in sim.jobs.items()
        for hour in _hours_of(job["start"], job["end"] or end)
        if hour + timedelta(hours=1) <= (job["end"] or end) and frames[job_id]
    )

    def stored() -> bool:
        for proc in workers:
            assert proc.poll() is None, log.read_text()[-4000:]
        final = db.execute(
            """SELECT count(*) FROM rollups WHERE metric = 'gpu_utilization_percent' AND tier = 'hour'
                AND bucket_start = %s AND final""",
            (last_hour,),
        ).fetchone()[0]
        placed = db.execute("SELECT count(*) FROM job_placements WHERE started IS NOT NULL").fetchone()[0]
        priced = db.execute(
            "SELECT count(*) FROM costs WHERE kind = 'gpu_hours' AND project <> '' AND time >= %s", (start,)
        ).fetchone()[0]
        hours = db.execute(
            """SELECT count(*) FROM rollups r
                JOIN unnest(%s::text[], %s::timestamptz[]) AS w(job_id, hour)
                  ON r.labels->>'job_id' = w.job_id AND r.bucket_start = w.hour
               WHERE r.metric = 'job_frame_processing_seconds' AND r.tier = 'hour'""",
            ([j for j, _ in job_hours], [h for _, h in job_hours]),
        ).fetchone()[0]
        return final == 4 and placed >= len(started) and priced > 0 and hours == len(job_hours)

    try:
        with running_sink(topics, db_schema):
            wait_until(stored, timeout_s=480, what="the fleet's last hour final in the database")
    finally:
        stop(workers, log)
    assert "Traceback" not in log.read_text()

    app = create_app(topics, schema=db_schema, config=ApiSettings.from_environ({}))
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    with TestClient(app) as client:
        body = client.get("/recommendations", headers=admin).json()

    # The allocated GPU left idle: each idle_allocated fault with two whole hours a job held.
    listed = {(g["gpu_uuid"], g["state"]): g for g in body["idle_by_gpu"]}
    idle = set()
    for t in (t for t in sim.truth if t.kind == "idle_allocated"):
        hours = [h for h in _hours_of(t.start, min(t.end, end)) if sim.held_s[(t.host, h)] >= 1200]
        if _longest_run(hours) >= 2:
            idle.add(t.entity)
            assert (t.entity, "allocated") in listed, (t, body["idle_by_gpu"])
    assert idle, sim.truth
    assert {uuid for uuid, state in listed if state == "allocated"} <= {
        t.entity for t in sim.truth if t.kind == "idle_allocated"
    }
    # The under-used job: the jobs wholly inside an underused_job fault's whole hours, at x4.5-4.65.
    factors = {j["job_id"]: j["batch_factor"] for j in body["memory_headroom"]}
    inside = set()
    for t in (t for t in sim.truth if t.kind == "underused_job"):
        hours = set(_hours_of(t.start, min(t.end, end)))
        for job_id, job in sim.jobs.items():
            touched = {h for h, _ in dashboards._hours(job["start"], job["end"] or end)}
            if job["host"] == t.host and touched <= hours:
                inside.add(job_id)
                assert 4.5 <= factors[job_id] <= 4.65, (job_id, factors)
    assert inside, sim.truth
    # The slowed jobs, each with its cause named by the metric that moved most.
    check_slowed_jobs(body, sim, slowed, other_faults=True)

    output = recommend_report({"AIMA_DATABASE_URL": topics.database_dsn()}, db_schema, slowed)
    for job_id in inside:
        assert f"  {job_id} (" in output
    for uuid in idle:
        g = listed[(uuid, "allocated")]
        assert f"  {g['host']} GPU {g['gpu']} {g['gpu_model']} (" in output
