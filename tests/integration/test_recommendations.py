"""/recommendations against a real PostgreSQL, the app over TestClient: hourly cost and budget figures
inserted as the sink writes them (the costs table of consumers/migrations is the contract); and a simulated
fleet with injected faults (an allocated GPU left idle, a job using a fifth of its GPU's memory) stored as
the pipeline stores it, whose truth the answers must find."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
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
from bus.prices import DEFAULT_PRICES_FILE, PriceCatalogue
from bus.settings import Settings
from producers.faults import FaultPlan, Truth
from producers.simulator import GPU_SPECS, Fleet, generate
from tests.integration import test_dashboards as dashboards

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


def test_job_placements_keep_where_jobs_ran_once_the_job_events_are_gone(
    db: psycopg.Connection[Any], database_url: str, db_schema: str
) -> None:
    t0 = HOUR - timedelta(hours=30)
    ev = {"queue": "default", "gpu_model": "NVIDIA L4", "provider": "gcp", "pricing": "spot", "source": "t"}
    store = dashboards._Store(database_url, db_schema)
    try:
        # One batch: j1's end before its start (the trigger keeps the earliest of each), j2 still running,
        # j3 queued only (no host: not placed).
        for value in (
            {**ev, "time": t0 + timedelta(hours=2), "job_id": "j1", "event": "finished", "project": "p",
             "host": "h1", "gpu_count": 1, "media_minutes": 3.0},
            {**ev, "time": t0, "job_id": "j1", "event": "started", "project": "p", "host": "h1",
             "gpu_count": 1, "model": "m1"},
            {**ev, "time": t0 + timedelta(hours=1), "job_id": "j2", "event": "started", "project": "q",
             "host": "h2", "gpu_count": 2, "provider": "aws", "pricing": "on_demand"},
            {**ev, "time": t0, "job_id": "j3", "event": "queued", "project": "p", "gpu_count": 1},
        ):  # fmt: skip
            store.add("job.events", "JobEvent", value)
        store.flush()
        before = db.execute("SELECT * FROM job_placements ORDER BY job_id").fetchall()
        # A re-sent event is a row the sink does not insert: nothing changes.
        again = {"time": t0, "job_id": "j1", "event": "started", "project": "p", "host": "h1", "gpu_count": 1}
        store.add("job.events", "JobEvent", {**ev, **again, "model": "m1"})
        store.flush()
    finally:
        store.close()
    db.execute("DELETE FROM job_events")  # raw rows, kept 24 h
    rows = db.execute(
        "SELECT job_id, time, host, gpu_count, provider, pricing, model, started, ended FROM job_placements"
        " ORDER BY job_id"
    ).fetchall()
    assert rows == [
        ("j1", t0, "h1", 1, "gcp", "spot", "m1", t0, t0 + timedelta(hours=2)),
        ("j2", t0 + timedelta(hours=1), "h2", 2, "aws", "on_demand", None, t0 + timedelta(hours=1), None),
    ]
    assert db.execute("SELECT * FROM job_placements ORDER BY job_id").fetchall() == before


# -- on a simulated fleet whose faults are known ------------------------------------------------------------

SIM_HOURS, STEP_S, SEED, FAULT_SEED = 9, 60.0, 3, 14
FAULT_KINDS = ("idle_allocated", "underused_job")


@dataclass
class Simulated:
    start: datetime
    end: datetime
    truth: list[Truth]
    held_s: dict[tuple[str, datetime], float]
    """Seconds a job held the host's (one) GPU in each hour, from the job events."""
    jobs: dict[str, dict[str, Any]]
    """Started jobs: host, start, end (None: still running), GPU model and count, model, frames processed,
    own peak memory share (percent)."""
    gpus: dict[str, str]
    """GPU uuid -> host."""


def _simulate(
    database_url: str,
    schema: str,
    hours: int = SIM_HOURS,
    plan: FaultPlan | None = None,
    seed: int = SEED,
    run_s_scale: float = 1.0,
) -> Simulated:
    """Nine hours (``hours``) of a four-host fleet with one GPU per host (so a GPU's hours are its host's
    jobs') with the fault plan (``plan``; default: idle_allocated and underused_job faults of 3 h), stored as
    the pipeline stores it: the job events (raw, they say which job ran where),
    and the hourly rollups and cost figures the stream app derives (made from the same records by the
    helpers of test_dashboards; test_backfill checks the stream app computes the same). No raw GPU sample
    is stored: the recommendations must come from the rollups."""
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=hours)
    # Faults long enough to fill whole hours, as the hourly rollups see them.
    if plan is None:
        plan = FaultPlan(every_s=4 * 3600.0, duration_s=3 * 3600.0, seed=FAULT_SEED, kinds=FAULT_KINDS)
    fleet = Fleet(seed=seed, hosts=4, gpus_per_host=1, start=start, faults=plan, run_s_scale=run_s_scale)
    store, rollups = dashboards._Store(database_url, schema), dashboards._Rollups()
    events: list[dict[str, Any]] = []
    gpus: dict[str, str] = {}
    memory: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    frames: dict[str, int] = defaultdict(int)
    try:
        for topic, _key, name, value in generate(fleet, start, end, STEP_S):
            if name == "JobEvent":
                full, decoded = store.add(topic, name, value)
                events.append(decoded)
            elif name in ("GpuSample", "JobTimings"):
                full, decoded = store.codec.decode(store.codec.encode(name, value))
                rollups.add(full, decoded, decoded["time"])
                if name == "JobTimings" and decoded["kind"] == "frame":
                    frames[decoded["job_id"]] += decoded["count"]
                if name == "GpuSample" and decoded["memory_utilization_percent"] is not None:
                    gpus[decoded["gpu_uuid"]] = decoded["gpu_model"]
                    memory[decoded["host"]].append((decoded["time"], decoded["memory_utilization_percent"]))
        for value in dashboards._costs(events, gpus, start, end):
            store.add("costs", "CostRecord", value)
        for value in rollups.records(end):
            store.add("rollups", "Rollup", value)
    finally:
        store.close()
    return facts(fleet, start, end, events, frames, memory)


def facts(
    fleet: Fleet,
    start: datetime,
    end: datetime,
    events: list[dict[str, Any]],
    frames: dict[str, int],
    memory: dict[str, list[tuple[datetime, float]]],
) -> Simulated:
    """What the fleet's records say: its job events, frames per job and memory share samples per host."""
    jobs: dict[str, dict[str, Any]] = {}
    held: dict[tuple[str, datetime], float] = defaultdict(float)
    for e in events:
        if e["event"] == "started":
            jobs[e["job_id"]] = {
                "host": e["host"], "project": e["project"], "start": e["time"], "end": None,
                "gpu_model": e["gpu_model"], "gpus": e["gpu_count"], "model": e["model"],
            }  # fmt: skip
        elif e["event"] in ("finished", "failed") and e["job_id"] in jobs:
            jobs[e["job_id"]]["end"] = e["time"]
    for job_id, job in jobs.items():
        for hour, overlap in dashboards._hours(job["start"], job["end"] or end):
            held[(job["host"], hour)] += overlap * 3600
        job["frames"] = frames[job_id]
        job["own_peak"] = max(
            (m for t, m in memory[job["host"]] if job["start"] < t <= (job["end"] or end)), default=0.0
        )
    hosts = {h.gpus[0].uuid: h.name for h in fleet.hosts}
    return Simulated(start, end, fleet.truth, held, jobs, hosts)


def _hours_of(start: datetime, end: datetime) -> list[datetime]:
    """The whole UTC hours inside [start, end)."""
    first = start.replace(minute=0, second=0, microsecond=0)
    if first < start:
        first += timedelta(hours=1)
    return [first + timedelta(hours=i) for i in range(int((end - first) / timedelta(hours=1)))]


def _longest_run(hours: list[datetime]) -> int:
    longest = run = 0
    for i, hour in enumerate(sorted(hours)):
        run = run + 1 if i and hour - sorted(hours)[i - 1] == timedelta(hours=1) else 1
        longest = max(longest, run)
    return longest


def test_recommendations_find_the_simulators_injected_idle_gpu_and_underused_job(
    client: TestClient, db: psycopg.Connection[Any], database_url: str, db_schema: str, settings: Settings
) -> None:
    sim = _simulate(database_url, db_schema)
    kinds = {t.kind for t in sim.truth}
    assert {"idle_allocated", "underused_job"} <= kinds, f"the plan injected {sim.truth}"
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    body = client.get("/recommendations", headers=admin).json()
    window = [sim.start + timedelta(hours=i) for i in range(SIM_HOURS)]
    listed = {(g["gpu_uuid"], g["state"]): g for g in body["idle_by_gpu"]}

    # Allocated but idle: the GPU of each idle_allocated fault, for the whole hours it covers in which a
    # job held the GPU for at least a third of the hour (then the hour's mean memory shows it held).
    expected = set()
    for t in (t for t in sim.truth if t.kind == "idle_allocated"):
        hours = [h for h in _hours_of(t.start, min(t.end, sim.end)) if sim.held_s[(t.host, h)] >= 1200]
        if _longest_run(hours) >= 2:
            expected.add(t.entity)
            assert listed[(t.entity, "allocated")]["idle_hours"] >= len(hours), listed
    assert expected, f"no idle_allocated fault filled two held hours: {sim.truth}"
    assert {uuid for uuid, state in listed if state == "allocated"} == expected
    for uuid in expected:  # no allocated idle hour outside the faults, but where a job held it minutes
        host = sim.gpus[uuid]
        faulty = {h for t in sim.truth if t.entity == uuid for h in window if t.start < h + timedelta(hours=1)
                  and h < t.end}  # fmt: skip
        brief = {h for h in window if 0 < sim.held_s[(host, h)] < 400}
        assert listed[(uuid, "allocated")]["idle_hours"] <= len(faulty | brief)

    # Unallocated: every hour no job held the GPU is an unallocated idle hour; at most the hours a job held
    # it too briefly to show in the hour's mean memory are added.
    for uuid, host in sim.gpus.items():
        empty = [h for h in window if sim.held_s[(host, h)] == 0]
        if _longest_run(empty) >= 2:
            assert (uuid, "unallocated") in listed, f"{host} was unallocated {len(empty)} h but is not listed"
        if (uuid, "unallocated") in listed:
            brief = [h for h in window if sim.held_s[(host, h)] < 1000]
            assert len(empty) <= listed[(uuid, "unallocated")]["idle_hours"] <= len(brief), (host, listed)
    assert any(state == "unallocated" for _, state in listed), "the fleet's last host is seldom used"
    for g in listed.values():  # priced at the host's profile (test_dashboards' prices), over one day
        price = dashboards.PRICES[(g["provider"], g["gpu_model"], g["pricing"])]
        assert g["eur_per_gpu_hour"] == pytest.approx(price)
        assert g["idle_cost_eur_per_day"] == pytest.approx(g["idle_hours"] * price)

    # Memory headroom: the jobs that ran wholly inside the underused_job fault's whole hours, with the
    # batch factor the fault's detail promises (90 % usable / 20 % used = 4.5, the draws up to 3 % less).
    under = [t for t in sim.truth if t.kind == "underused_job"]
    inside = set()
    for t in under:
        hours = set(_hours_of(t.start, min(t.end, sim.end)))
        for job_id, job in sim.jobs.items():
            touched = {h for h, _ in dashboards._hours(job["start"], job["end"] or sim.end)}
            if job["host"] == t.host and touched <= hours:
                inside.add(job_id)
    assert inside, f"no job ran inside an underused_job fault: {under}"
    factors = {j["job_id"]: j for j in body["memory_headroom"]}
    assert inside <= set(factors)
    for job_id in inside:
        assert 4.5 <= factors[job_id]["batch_factor"] <= 4.65, factors[job_id]
    for job_id, j in factors.items():
        job = sim.jobs[job_id]
        assert j["host"] == job["host"] and j["batch_factor"] >= 1.5
        # The figure bounds the job's own use from above: a batch it names fits.
        assert j["peak_memory_percent"] >= job["own_peak"] - 1e-9, (job_id, j, job)
        if j["batch_factor"] > 3.2:  # above what an ordinary job's 30 % or more allows
            assert any(t.host == job["host"] and t.start < (job["end"] or sim.end) and job["start"] < t.end
                       for t in under), (job_id, j)  # fmt: skip

    # A user token: its project's jobs only, no per-GPU list without the GPU metric scopes; with them, the
    # same list as an admin's. Bad thresholds are a 4xx naming the parameter.
    project = sim.jobs[sorted(inside)[0]]["project"]
    user = {"Authorization": f"Bearer {auth.create_token(db, 'user', [], [project], name='u')[1]}"}
    mine = client.get("/recommendations", headers=user).json()
    assert mine["idle_by_gpu"] is None
    assert {j["project"] for j in mine["memory_headroom"]} == {project}
    scopes = [f"metrics:read:{m}" for m in ("gpu_utilization_percent", "gpu_memory_utilization_percent")]
    seer = {"Authorization": f"Bearer {auth.create_token(db, 'user', scopes, [project], name='s')[1]}"}
    assert client.get("/recommendations", headers=seer).json()["idle_by_gpu"] == body["idle_by_gpu"]
    other = "research" if project != "research" else "news"
    assert client.get(f"/recommendations?project={other}", headers=user).status_code == 403
    for bad in (
        "idle_below=101",
        "min_idle_hours=0",
        "min_batch_factor=1",
        "min_idle_hours=25",
        "job_model=",
    ):
        answer = client.get(f"/recommendations?{bad}", headers=admin)
        assert answer.status_code in (400, 422) and bad.split("=")[0] in answer.text, (bad, answer.text)
    stricter = client.get("/recommendations?min_batch_factor=4", headers=admin).json()
    assert {j["job_id"] for j in stricter["memory_headroom"]} == {
        j for j, f in factors.items() if f["batch_factor"] >= 4
    }

    # Cheapest: the throughput measured per GPU model is the simulated one (frames over GPU seconds of the
    # ended jobs, each model's frames/s times the jobs' intensity, 0.7-0.98), and every catalogue offer of
    # a measured model is ranked by its price over that throughput.
    def measured(model: str | None = None) -> dict[str, float]:
        frames: dict[str, float] = defaultdict(float)
        seconds: dict[str, float] = defaultdict(float)
        for job in sim.jobs.values():
            if job["end"] is not None and job["frames"] and model in (None, job["model"]):
                frames[job["gpu_model"]] += job["frames"]
                seconds[job["gpu_model"]] += job["gpus"] * (job["end"] - job["start"]).total_seconds()
        return {gpu_model: frames[gpu_model] / seconds[gpu_model] for gpu_model in frames}

    truth = measured()
    assert {r["gpu_model"]: r["frames_per_gpu_second"] for r in body["throughput"]} == pytest.approx(truth)
    for gpu_model, fps in truth.items():
        assert 0.7 <= fps / GPU_SPECS[gpu_model].frames_per_second <= 0.98
    catalogue = PriceCatalogue.load(DEFAULT_PRICES_FILE)
    offers = sorted(
        (price / (fps * 3600) * 1e6, provider, entry.model, pricing)
        for gpu_model, fps in truth.items()
        for provider in catalogue.providers
        if (entry := catalogue.match(provider, gpu_model)) is not None
        for pricing in ("on_demand", "spot")
        if (price := entry.eur_per_gpu_hour(pricing)) is not None
    )
    got = [
        (c["eur_per_million_frames"], c["provider"], c["catalogue_model"], c["pricing"])
        for c in body["cheapest"]
    ]
    assert [g[1:] for g in got] == [o[1:] for o in offers] and len(got) > len(truth)
    assert [g[0] for g in got] == pytest.approx([o[0] for o in offers])
    assert "onprem" in {c["provider"] for c in body["cheapest"]}  # offers beyond the fleet's own providers
    model = sim.jobs[sorted(inside)[0]]["model"]
    profile = client.get(f"/recommendations?job_model={model}", headers=admin).json()
    assert profile["job_model"] == model
    assert {r["gpu_model"]: r["frames_per_gpu_second"] for r in profile["throughput"]} == pytest.approx(
        measured(model)
    )
    assert measured(model) != truth

    # The CLI: the same answers, readable.
    env = {"AIMA_DATABASE_URL": settings.database_dsn()}
    report = CliRunner().invoke(recommend, ["--schema", db_schema], env=env)
    assert report.exit_code == 0, report.output
    print(report.output)
    for uuid in expected:
        g = listed[(uuid, "allocated")]
        line = f"  {g['host']} GPU {g['gpu']} {g['gpu_model']} ({g['provider']}/{g['pricing']}): allocated, "
        assert line in report.output
    for job_id in inside:
        assert (
            f"  {job_id} (" in report.output
            and f"batch x{factors[job_id]['batch_factor']:.1f}" in report.output
        )
    best = body["cheapest"][0]
    assert f"  {best['provider']} {best['catalogue_model']} ({best['pricing']}): " in report.output
    bad = CliRunner().invoke(recommend, ["--schema", db_schema, "--min-batch-factor", "0.5"], env=env)
    assert bad.exit_code == 2 and "--min-batch-factor" in bad.output


# -- a job that got slow, against its own history ---------------------------------------------------------

CAUSE_METRICS = {
    "throttling": {"gpu_sm_clock_hz", "gpu_memory_clock_hz", "gpu_temperature_celsius"},
    "memory_pressure": {"gpu_memory_utilization_percent", "gpu_memory_used_bytes"},
}


def _whole_hours_of_job(start: datetime, end: datetime) -> list[datetime]:
    return [h for h in _hours_of(start, end) if h + timedelta(hours=1) <= end]


def slowed_truths(sim: Simulated) -> dict[str, str]:
    """job id -> cause of every job_slowdown fault that hit a job with a whole hour before the fault and a
    whole hour inside it (what the hourly rollups can show as a job that got slow)."""
    found = {}
    for t in (t for t in sim.truth if t.kind == "job_slowdown"):
        for job_id, job in sim.jobs.items():
            hours = _whole_hours_of_job(job["start"], job["end"] or sim.end) if job["host"] == t.host else []
            before = [h for h in hours if h + timedelta(hours=1) <= t.start]
            inside = [h for h in hours if h >= t.start and h + timedelta(hours=1) <= t.end]
            if before and inside:
                found[job_id] = t.cause
    return found


def recommend_report(env: dict[str, str], schema: str, causes: dict[str, str]) -> str:
    """``aima-metrics recommend`` on ``schema``: it succeeds, and names each slowed job's cause on its
    line; returns (and prints, a sample for the closing note) its output."""
    report = CliRunner().invoke(recommend, ["--schema", schema], env=env)
    assert report.exit_code == 0, report.output
    print(report.output)
    for job_id, cause in causes.items():
        line = next(x for x in report.output.splitlines() if x.startswith(f"  {job_id} ("))
        assert f"likely cause: {cause}" in line, line
    return report.output


def check_slowed_jobs(
    body: dict[str, Any], sim: Simulated, expected: dict[str, str], *, other_faults: bool = False
) -> None:
    """Each job the slowdown faults could show is listed with its fault's cause, named by the metric that
    moved most, its frames/s halved; no job is listed that no slowdown or throttling touched.
    ``other_faults``: other kinds of fault may have hit the same GPU in the compared hours (an allocated
    GPU left idle moves utilization and power most): the cause's metric moved clearly (|score| >= 3) and
    more than any metric of the other cause."""
    listed = {j["job_id"]: j for j in body["slowed_jobs"]}
    for job_id, cause in expected.items():
        job = listed[job_id]
        assert job["likely_cause"] == cause, json.dumps(job, indent=1)
        ranked = [m["metric"] for m in job["moved_most"] if abs(m["score"]) >= 3]
        if other_faults:
            mine = [i for i, m in enumerate(ranked) if m in CAUSE_METRICS[cause]]
            others = [
                i
                for i, m in enumerate(ranked)
                if m in set().union(*CAUSE_METRICS.values()) - CAUSE_METRICS[cause]
            ]
            assert mine and (not others or mine[0] < others[0]), job["moved_most"]
        else:
            assert ranked[0] in CAUSE_METRICS[cause], job["moved_most"]
        assert 0.45 <= job["throughput_drop"] <= 0.55, job
        assert job["host"] == sim.jobs[job_id]["host"]
    for job_id in set(listed) - set(expected):
        job = sim.jobs[job_id]
        assert any(
            t.kind in ("job_slowdown", "throttling") and t.host == job["host"]
            and t.start < (job["end"] or sim.end) and job["start"] < t.end
            for t in sim.truth
        ), listed[job_id]  # fmt: skip


def test_recommendations_name_the_metrics_that_moved_when_the_simulators_jobs_got_slow(
    client: TestClient, db: psycopg.Connection[Any], database_url: str, db_schema: str, settings: Settings
) -> None:
    # Jobs of 24 min to 6 h, slowdowns of 4 h: jobs with whole hours before and inside a slowdown, the
    # first (seed 1, fault seed 2) throttled 3 h after 1 normal hour, another short of memory for 2 h.
    plan = FaultPlan(every_s=3.5 * 3600, duration_s=4 * 3600.0, seed=2, kinds=("job_slowdown",))
    sim = _simulate(database_url, db_schema, hours=12, plan=plan, seed=1, run_s_scale=12.0)
    expected = slowed_truths(sim)
    assert set(expected.values()) == {"throttling", "memory_pressure"}, sim.truth
    # Job events are raw rows kept 24 h: where each job ran comes from job_placements (migration 0019).
    db.execute("DELETE FROM job_events")
    admin = {"Authorization": f"Bearer {auth.create_token(db, 'admin', name='admin')[1]}"}
    body = client.get("/recommendations", headers=admin).json()
    check_slowed_jobs(body, sim, expected)
    assert body["idle_by_gpu"], "the per-GPU idle list still knows its hosts without job events"
    assert all(g["provider"] for g in body["idle_by_gpu"])

    project = sim.jobs[sorted(expected)[0]]["project"]
    user = {"Authorization": f"Bearer {auth.create_token(db, 'user', [], [project], name='u')[1]}"}
    assert client.get("/recommendations", headers=user).json()["slowed_jobs"] is None
    scopes = [f"metrics:read:{m}" for m in ("gpu_utilization_percent", "gpu_memory_utilization_percent")]
    seer = {"Authorization": f"Bearer {auth.create_token(db, 'user', scopes, [project], name='s')[1]}"}
    assert {j["project"] for j in client.get("/recommendations", headers=seer).json()["slowed_jobs"]} == {
        project
    }
    for bad in ("min_slowdown=0", "min_slowdown=100", "min_slowdown=x"):
        answer = client.get(f"/recommendations?{bad}", headers=admin)
        assert answer.status_code == 422 and "min_slowdown" in answer.text, (bad, answer.text)
    assert client.get("/recommendations?min_slowdown=60", headers=admin).json()["slowed_jobs"] == []

    env = {"AIMA_DATABASE_URL": settings.database_dsn()}
    recommend_report(env, db_schema, expected)
    bad = CliRunner().invoke(recommend, ["--schema", db_schema, "--min-slowdown", "100"], env=env)
    assert bad.exit_code == 2 and "--min-slowdown" in bad.output
