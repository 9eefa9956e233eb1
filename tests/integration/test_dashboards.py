"""The Grafana dashboards (A4) against the real database: a fresh schema is filled from the fleet simulator
(two hours of event time, through the Avro contract and the sink's own writer), plus the rollups, costs,
alerts and anomalies the stream app would derive; then every variable, panel and annotation query of every
dashboard is expanded as Grafana does (tests/grafana_macros.py) and executed. Any SQL error, and any panel
or variable that returns no rows, fails the test, naming the dashboard and the panel.

The rollups, costs, alerts and anomalies are made here by hand from the simulated records (same record
schemas, same tables, representative values), not by the stream app.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from bus import sketch as sketches
from bus.catalogue import BY_NAME, METRICS
from bus.codec import Codec
from bus.settings import REPO_ROOT
from consumers.gen_views import view_source
from consumers.sink_writer import Entry, Writer
from consumers.tables import Origin, rows_for
from producers.simulator import Fleet, generate
from streams.runtime.series import points, series_id
from tests.grafana_macros import (
    MacroError,
    TimeRange,
    Variable,
    calculate_interval,
    expand,
    metric_find_values,
    parse_grafana_time,
)

pytestmark = pytest.mark.integration

GRAFANA = REPO_ROOT / "infra" / "grafana"
PROMETHEUS_DASHBOARDS = ["pipeline_health.json"]
"""Dashboards over Prometheus, not the database: tests/test_prometheus_provisioning.py and
tests/integration/test_pipeline_health.py check them."""
DASHBOARDS = sorted(p for p in (GRAFANA / "dashboards").glob("*.json") if p.name not in PROMETHEUS_DASHBOARDS)
"""The dashboards over the database (A4), whose SQL this file runs."""
DATASOURCE = {"type": "grafana-postgresql-datasource", "uid": "aima-postgres"}
SIM_HOURS = 2
STEP_S = 10.0
HAND = "test-hand-inserted"
"""``source`` of the rows made here rather than by the stream app."""
# EUR per GPU-hour of the simulator's host profiles, from streams/costs/prices.yaml.
PRICES = {
    ("aws", "NVIDIA H100 80GB HBM3", "on_demand"): 6.10,
    ("gcp", "NVIDIA A100-SXM4-40GB", "spot"): 1.10,
    ("gcp", "NVIDIA L4", "on_demand"): 0.65,
    ("azure", "NVIDIA H100 80GB HBM3", "spot"): 2.90,
}
ENERGY_KW_PER_GPU = 0.4
"""Mean draw of a simulated GPU for the fleet rows' energy (kWh per device-hour)."""
ENERGY_EUR_PER_KWH = 0.25
VALUE_TYPES = {20, 21, 23, 700, 701, 1700}  # int8, int2, int4, float4, float8, numeric
TEXT_TYPES = {18, 19, 25, 1042, 1043}
TIME_TYPES = {1082, 1114, 1184}  # date, timestamp, timestamptz
PANEL_WIDTH_PX = 1900 / 24
"""Grafana's default max data points is the panel's width in pixels: a 24-column grid on a wide screen."""


# -- filling the database --------------------------------------------------------------------------------


@dataclass
class Filled:
    start: datetime
    end: datetime
    counts: dict[str, int] = field(default_factory=dict)


class _Store:
    """Records through the Avro contract (encode, decode) into the tables, with the sink's writer."""

    def __init__(self, database_url: str, schema: str) -> None:
        self.codec = Codec()
        self.writer = Writer(database_url, schema=schema, maintenance_every_s=None)
        self.entries: list[Entry] = []
        self.offset = 0
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, topic: str, name: str, value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        full, decoded = self.codec.decode(self.codec.encode(name, value))
        origin = Origin(topic, 0, self.offset, time.time_ns() // 1_000_000)
        self.entries.append(Entry(topic, 0, self.offset, None, None, rows_for(full, decoded, origin)))
        self.offset += 1
        self.counts[name] += 1
        if len(self.entries) >= 5000:
            self.flush()
        return full, decoded

    def flush(self) -> None:
        if self.entries:
            self.writer.write(self.entries)
            self.entries = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _hours(start: datetime, end: datetime) -> Iterator[tuple[datetime, float]]:
    """The UTC hours that [start, end) overlaps, with the overlap in hours."""
    hour = start.replace(minute=0, second=0, microsecond=0)
    while hour < end:
        overlap = (min(end, hour + timedelta(hours=1)) - max(start, hour)).total_seconds() / 3600
        if overlap > 0:
            yield hour, overlap
        hour += timedelta(hours=1)


_COST_FIELDS = [
    *("project", "gpu_model", "provider", "pricing", "job_id", "budget", "gpu_hours", "device_hours"),
    *("idle_gpu_hours", "cost_estimated_eur", "job_cost_eur", "job_cost_per_media_minute_eur", "budget_eur"),
    *("budget_utilization_percent", "forecast_eur", "energy_kwh", "energy_cost_eur"),
]


def _cost(kind: str, start: datetime, end: datetime, **fields: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"time": start, "period_end": end, "kind": kind}
    for name in _COST_FIELDS:
        value[name] = None
    value.update(currency="EUR", source=HAND, **fields)
    return value


def _gpu_energy(gpus: dict[str, str], start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Each GPU's hours as the stream app's GpuEnergy records: the fleet rows of _costs per GPU."""
    return [
        {
            "time": hour, "period_end": hour + timedelta(hours=1), "gpu_uuid": uuid, "gpu_model": model,
            "device_hours": overlap, "energy_kwh": overlap * ENERGY_KW_PER_GPU,
            "energy_cost_eur": overlap * ENERGY_KW_PER_GPU * ENERGY_EUR_PER_KWH, "currency": "EUR",
            "source": HAND,
        }
        for uuid, model in sorted(gpus.items())
        for hour, overlap in _hours(start, end)
    ]  # fmt: skip


def _costs(events: list[dict[str, Any]], gpus: dict[str, str], start: datetime, end: datetime) -> list[dict]:
    """What the cost processor makes of the job events: GPU-hours and cost per project/model/provider/pricing
    and hour, idle GPU-hours per model and hour, each ended job's cost, and the month's budget figures."""
    jobs: dict[str, dict[str, Any]] = {}
    for e in events:
        job = jobs.setdefault(e["job_id"], {"project": e["project"]})
        if e["event"] == "started":
            job.update(
                start=e["time"],
                gpus=e["gpu_count"],
                model=e["gpu_model"],
                provider=e["provider"],
                pricing=e["pricing"],
            )
        elif e["event"] in ("finished", "failed"):
            job.update(end=e["time"], media=e["media_minutes"])
    records: list[dict[str, Any]] = []
    used: dict[tuple[str, str, str, str, datetime], float] = defaultdict(float)
    for job_id, job in jobs.items():
        if "start" not in job:
            continue
        slot = (job["project"], job["model"], job["provider"], job["pricing"])
        for hour, overlap in _hours(job["start"], job.get("end", end)):
            used[(*slot, hour)] += job["gpus"] * overlap
        if "end" in job:
            hours = job["gpus"] * (job["end"] - job["start"]).total_seconds() / 3600
            cost = hours * PRICES[slot[2], slot[1], slot[3]]
            per_minute = cost / job["media"] if job["media"] else None
            records.append(
                _cost(
                    "job_cost", job["start"], job["end"], project=slot[0], gpu_model=slot[1],
                    provider=slot[2], pricing=slot[3], job_id=job_id, gpu_hours=hours, job_cost_eur=cost,
                    job_cost_per_media_minute_eur=per_minute,
                )
            )  # fmt: skip
    allocated: dict[tuple[str, datetime], float] = defaultdict(float)
    spent: dict[str, float] = defaultdict(float)
    for (project, model, provider, pricing, hour), hours in used.items():
        cost = hours * PRICES[provider, model, pricing]
        allocated[(model, hour)] += hours
        spent[project] += cost
        records.append(
            _cost(
                "gpu_hours", hour, hour + timedelta(hours=1), project=project, gpu_model=model,
                provider=provider, pricing=pricing, gpu_hours=hours, cost_estimated_eur=cost,
            )
        )  # fmt: skip
    per_model: dict[str, int] = defaultdict(int)
    for model in gpus.values():
        per_model[model] += 1
    for model, count in per_model.items():
        for hour, overlap in _hours(start, end):
            device = count * overlap
            kwh = device * ENERGY_KW_PER_GPU
            records.append(
                _cost(
                    "gpu_hours", hour, hour + timedelta(hours=1), gpu_model=model, device_hours=device,
                    idle_gpu_hours=max(device - allocated[(model, hour)], 0.0), energy_kwh=kwh,
                    energy_cost_eur=kwh * ENERGY_EUR_PER_KWH,
                )
            )  # fmt: skip
    month_start = end.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    elapsed = max((end - month_start) / (month_end - month_start), 1 / 720)
    for i, (project, eur) in enumerate(sorted(spent.items())):
        forecast = eur / elapsed
        records.append(_cost("budget", month_start, month_end, project=project, forecast_eur=forecast))
        budget = forecast * (0.8 if i == 0 else 1.5)  # one project heads over its budget
        records.append(
            _cost(
                "budget", month_start, month_end, project=project, budget="gpu-monthly", budget_eur=budget,
                budget_utilization_percent=100 * eur / budget, forecast_eur=forecast,
            )
        )  # fmt: skip
    return records


class _Rollups:
    """Hour and day rollups of every series, as the rollup processor emits them: a summary record (job
    timings) adds its count, sum, extremes and sketch bins, any other value adds one sample."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, str, datetime], dict[str, Any]] = {}

    def add(self, record_name: str, value: dict[str, Any], at: datetime) -> None:
        for point in points(record_name, value):
            summary = BY_NAME[point.metric].type == "summary"
            for tier, start in (
                ("hour", at.replace(minute=0, second=0, microsecond=0)),
                ("day", at.replace(hour=0, minute=0, second=0, microsecond=0)),
            ):
                bucket = self.buckets.get((point.series, tier, start))
                if bucket is None:
                    bucket = {
                        "series": point.series, "metric": point.metric, "labels": point.labels, "tier": tier,
                        "start": start, "count": 0, "sum": 0.0, "min": float("inf"), "max": float("-inf"),
                        "values": [], "bins": defaultdict(float), "zero_count": 0.0,
                    }  # fmt: skip
                    self.buckets[(point.series, tier, start)] = bucket
                if summary:
                    bucket["count"] += value["count"]
                    bucket["sum"] += value["sum_seconds"]
                    bucket["min"] = min(bucket["min"], value["min_seconds"])
                    bucket["max"] = max(bucket["max"], value["max_seconds"])
                    sketch = value["sketch"]
                    bucket["zero_count"] += sketch["zero_count"]
                    for key, count in zip(sketch["keys"], sketch["counts"], strict=True):
                        bucket["bins"][key] += count
                else:
                    bucket["count"] += 1
                    bucket["sum"] += point.value
                    bucket["min"] = min(bucket["min"], point.value)
                    bucket["max"] = max(bucket["max"], point.value)
                    bucket["values"].append(max(point.value, 0.0))

    def records(self, watermark: datetime) -> Iterator[dict[str, Any]]:
        for b in self.buckets.values():
            end = b["start"] + (timedelta(hours=1) if b["tier"] == "hour" else timedelta(days=1))
            if b["values"]:
                sketch = sketches.avro_of(b["values"])
            else:
                keys = sorted(b["bins"])
                sketch = {
                    "relative_accuracy": sketches.DEFAULT_RELATIVE_ACCURACY, "zero_count": b["zero_count"],
                    "keys": keys, "counts": [b["bins"][key] for key in keys],
                }  # fmt: skip
            yield {
                "series": b["series"], "metric": b["metric"], "labels": b["labels"], "tier": b["tier"],
                "bucket_start": b["start"], "bucket_end": end, "count": b["count"], "min": b["min"],
                "max": b["max"], "sum": b["sum"], "avg": b["sum"] / b["count"],
                "p95": sketches.quantile(sketches.from_avro(sketch), 0.95) or 0.0, "sketch": sketch,
                "final": end <= watermark, "watermark": watermark, "source": HAND,
            }  # fmt: skip


def _alerts(gpu: dict[str, Any], start: datetime, end: datetime) -> list[dict[str, Any]]:
    hot = {k: str(gpu[k]) for k in ("host", "gpu", "gpu_uuid", "gpu_model")}
    began, ended = start + timedelta(minutes=30), start + timedelta(minutes=41)
    queue_since = end - timedelta(minutes=20)

    def event(fingerprint: str, rule: str, status: str, severity: str, starts: datetime, at: datetime,
              value: float, labels: dict[str, str], summary: str) -> dict[str, Any]:  # fmt: skip
        return {
            "fingerprint": fingerprint, "rule": rule, "status": status, "severity": severity,
            "starts_at": starts, "ends_at": at if status == "resolved" else None, "event_time": at,
            "value": value, "labels": labels, "annotations": {"summary": summary}, "channels": ["webhook"],
            "source": HAND,
        }  # fmt: skip

    return [
        event("a1f0", "GpuTemperatureHigh", "firing", "critical", began, began, 87.5, hot, "GPU hot"),
        event("a1f0", "GpuTemperatureHigh", "resolved", "critical", began, ended, 79.0, hot, "GPU hot"),
        event("b2e1", "QueueBacklog", "firing", "warning", queue_since, queue_since, 23, {"queue": "default"},
              "Queue default holds 23 jobs"),
        event("c3d2", "budget_forecast_overrun", "firing", "warning", end - timedelta(minutes=5),
              end - timedelta(minutes=5), 120.0, {"project": "news", "budget": "gpu-monthly"},
              "news heads over its monthly budget"),
    ]  # fmt: skip


def fill(database_url: str, schema: str) -> Filled:
    end = datetime.now(UTC).replace(microsecond=0)
    end -= timedelta(seconds=end.second % STEP_S)
    start = end - timedelta(hours=SIM_HOURS)
    store = _Store(database_url, schema)
    rollups = _Rollups()
    events: list[dict[str, Any]] = []
    gpus: dict[str, str] = {}
    some_gpu: dict[str, Any] = {}
    power: list[tuple[dict[str, str], dict[str, Any]]] = []
    try:
        fleet = Fleet(seed=11, hosts=4, gpus_per_host=2, start=start)
        for topic, _key, name, value in generate(fleet, start, end, STEP_S):
            full, decoded = store.add(topic, name, value)
            at = decoded.get("time") or end
            rollups.add(full, decoded, at)
            if name == "JobEvent":
                events.append(decoded)
            elif name == "GpuSample" and decoded["mig_instance"] is None:
                gpus[decoded["gpu_uuid"]] = decoded["gpu_model"]
                if (
                    decoded["power_watts"] is not None
                    and len(power) < 3
                    and at > start + timedelta(minutes=50)
                ):
                    power.append(
                        ({k: str(decoded[k]) for k in ("host", "gpu", "gpu_uuid", "gpu_model")}, decoded)
                    )
                some_gpu = some_gpu or decoded
        for value in _costs(events, gpus, start, end):
            full, decoded = store.add("costs", "CostRecord", value)
            rollups.add(full, decoded, decoded["time"])
        for value in _gpu_energy(gpus, start, end):
            store.add("energy", "GpuEnergy", value)
        for value in rollups.records(end):
            store.add("rollups", "Rollup", value)
        for value in _alerts(some_gpu, start, end):
            store.add("alerts", "AlertEvent", value)
        for labels, sample in power:
            store.add(
                "anomalies",
                "Anomaly",
                {
                    "time": sample["time"], "series": series_id("gpu_power_watts", labels),
                    "metric": "gpu_power_watts", "labels": labels, "value": sample["power_watts"],
                    "expected": sample["power_watts"] * 0.6, "score": 4.2, "method": "ewma_zscore",
                    "source": HAND,
                },
            )  # fmt: skip
    finally:
        store.close()
    return Filled(start, end, dict(store.counts))


# -- dashboards as Grafana reads them ----------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too; rows themselves only carry panels."""
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def timescaledb_flag(conn: psycopg.Connection) -> bool:
    """What the macro engine does: time_bucket when the provisioned datasource says timescaledb: true,
    which works only where the extension is installed (the compose stack); plain PostgreSQL gets the
    floor() form."""
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "postgres.yml").read_text())
    (source,) = [d for d in provisioned["datasources"] if d["uid"] == DATASOURCE["uid"]]
    installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return bool(source["jsonData"].get("timescaledb")) and installed is not None


@dataclass
class Outcome:
    dashboard: str
    panel: str
    ref: str
    rows: int = 0
    seconds: float = 0.0
    problem: str | None = None


def run_query(conn: psycopg.Connection, query: str) -> tuple[list[psycopg.Column], list[tuple[Any, ...]]]:
    """As Grafana's datasource user would: read-only, with a time limit."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute("SET LOCAL statement_timeout = '30s'")
        cursor.execute(query)
        return list(cursor.description or []), cursor.fetchall()


def check_frame(fmt: str, columns: list[psycopg.Column], rows: list[tuple[Any, ...]]) -> str | None:
    """What Grafana itself would refuse in a time-series frame: no time column, values that are neither
    numbers nor labels, rows out of time order (long-to-wide conversion needs ascending time)."""
    if fmt != "time_series":
        return None
    names = [c.name for c in columns]
    if "time" not in names:
        return f"time series without a 'time' column (columns: {names})"
    at = names.index("time")
    if columns[at].type_code not in TIME_TYPES | VALUE_TYPES:
        return f"'time' column of type oid {columns[at].type_code}"
    for i, column in enumerate(columns):
        if i != at and column.type_code not in VALUE_TYPES | TEXT_TYPES:
            return f"column {column.name!r} (type oid {column.type_code}) is neither a number nor a label"
    times = [row[at] for row in rows if row[at] is not None]
    if any(b < a for a, b in itertools.pairwise(times)):
        return "rows are not in ascending time order (add ORDER BY the time column)"
    return None


def resolve_variables(
    conn: psycopg.Connection, board: dict[str, Any], time_range: TimeRange, timescaledb: bool, name: str
) -> tuple[dict[str, Variable], list[Outcome]]:
    """Runs each query variable in order (later ones may use earlier ones) with its default selection."""
    variables: dict[str, Variable] = {}
    outcomes = []
    for spec in board.get("templating", {}).get("list", []):
        outcome = Outcome(name, f"variable ${spec['name']}", "var")
        outcomes.append(outcome)
        if spec.get("type") != "query":
            outcome.problem = f"variable type {spec.get('type')!r} is not handled by this test"
            continue
        query = spec["query"] if isinstance(spec["query"], str) else spec["query"].get("rawSql", "")
        try:
            expanded = expand(query, variables, time_range, timescaledb=timescaledb)
            started = time.perf_counter()
            columns, rows = run_query(conn, expanded)
            outcome.seconds = time.perf_counter() - started
        except (psycopg.Error, MacroError) as exc:
            outcome.problem = f"{type(exc).__name__}: {str(exc).strip()}"
            continue
        options = metric_find_values([c.name for c in columns], rows)
        outcome.rows = len(options)
        if not options:
            outcome.problem = "no values"
        current = spec.get("current", {}).get("value", ["$__all"])
        variables[spec["name"]] = Variable(
            spec["name"],
            options,
            current if isinstance(current, list) else [current],
            multi=bool(spec.get("multi")),
            include_all=bool(spec.get("includeAll")),
            all_value=spec.get("allValue") or None,
        )
    return variables, outcomes


def run_dashboard(
    conn: psycopg.Connection,
    path: Path,
    now: datetime,
    timescaledb: bool,
    selection: dict[str, list[str]] | None = None,
) -> list[Outcome]:
    """Every query of one dashboard. ``selection`` overrides variables' current values (None: defaults)."""
    board = load(path)
    name = path.name
    time_range = TimeRange(
        parse_grafana_time(board["time"]["from"], now), parse_grafana_time(board["time"]["to"], now)
    )
    variables, outcomes = resolve_variables(conn, board, time_range, timescaledb, name)
    for var_name, values in (selection or {}).items():
        if var_name in variables:
            variables[var_name].current = values
    queries: list[tuple[str, str, str, str, str | None, int]] = []
    for panel in panels(board):
        width = panel.get("gridPos", {}).get("w", 12)
        max_points = panel.get("maxDataPoints") or round(width * PANEL_WIDTH_PX)
        for target in panel.get("targets", []):
            fmt = target.get("format", "time_series")
            queries.append((panel.get("title", "?"), target.get("refId", "A"), target.get("rawSql", ""), fmt,
                            panel.get("interval"), max_points))  # fmt: skip
    for annotation in board.get("annotations", {}).get("list", []):
        target = annotation.get("target") or {}
        if annotation.get("datasource", {}).get("uid") == DATASOURCE["uid"]:
            title = f"annotation {annotation['name']}"
            queries.append((title, "Anno", target.get("rawSql", ""), "annotation", None, 1000))
    for title, ref, raw, fmt, min_interval, max_points in queries:
        outcome = Outcome(name, title, ref)
        outcomes.append(outcome)
        if not raw.strip():
            outcome.problem = "no rawSql"
            continue
        interval, interval_ms = calculate_interval(time_range, max_points, min_interval or "1m")
        try:
            expanded = expand(
                raw,
                variables,
                time_range,
                interval=interval,
                interval_ms=interval_ms,
                timescaledb=timescaledb,
            )
            started = time.perf_counter()
            columns, rows = run_query(conn, expanded)
            outcome.seconds = time.perf_counter() - started
        except (psycopg.Error, MacroError) as exc:
            outcome.problem = f"{type(exc).__name__}: {str(exc).strip()}"
            continue
        outcome.rows = len(rows)
        if fmt == "annotation":
            names = {c.name for c in columns}
            if not {"time", "text"} <= names:
                outcome.problem = f"an annotation query needs columns time and text, got {sorted(names)}"
                continue
        outcome.problem = check_frame(fmt, columns, rows)
        if outcome.problem is None and not rows:
            outcome.problem = "no rows"
    return outcomes


def _report(outcomes: list[Outcome]) -> str:
    lines = [f"{'dashboard':<14} {'panel':<58} {'ref':<5} {'rows':>6} {'ms':>7}  problem"]
    for o in outcomes:
        ms = o.seconds * 1000
        lines.append(
            f"{o.dashboard:<14} {o.panel[:58]:<58} {o.ref:<5} {o.rows:>6} {ms:>7.1f}  {o.problem or ''}"
        )
    return "\n".join(lines)


# -- tests -------------------------------------------------------------------------------------------------


def test_dashboards_are_provisionable_and_cover_the_catalogue() -> None:
    """Static checks: the JSON Grafana provisions, the datasource on every panel and target, the template
    variables and alert annotations, and every catalogue metric drawn somewhere."""
    assert [p.name for p in DASHBOARDS] == ["admin.json", "finance.json", "users.json"]
    every = sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json"))
    assert every == sorted([p.name for p in DASHBOARDS] + PROMETHEUS_DASHBOARDS)
    all_sql: list[str] = []
    uids = set()
    for path in DASHBOARDS:
        board = load(path)
        assert board["schemaVersion"] >= 39, path.name
        uids.add(board["uid"])
        names = [v["name"] for v in board["templating"]["list"]]
        assert {"host", "gpu", "project"} <= set(names), f"{path.name}: variables {names}"
        for variable in board["templating"]["list"]:
            assert variable["datasource"] == DATASOURCE, f"{path.name} ${variable['name']}"
            assert variable["multi"] and variable["includeAll"], f"{path.name} ${variable['name']}"
            all_sql.append(variable["query"])
        annotations = [a for a in board["annotations"]["list"] if a.get("datasource") == DATASOURCE]
        assert annotations and all("alert_history" in a["target"]["rawSql"] for a in annotations), path.name
        ids = []
        for panel in panels(board):
            ids.append(panel["id"])
            where = f"{path.name}: panel {panel.get('title')!r}"
            assert panel.get("datasource") == DATASOURCE, where
            assert panel.get("targets"), where
            for target in panel["targets"]:
                assert target.get("datasource") == DATASOURCE, where
                assert target.get("rawQuery") is True and target.get("rawSql"), where
                assert "time_bucket(" not in target["rawSql"], f"{where}: use $__timeGroup (plain PostgreSQL)"
                all_sql.append(target["rawSql"])
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    uids |= {load(GRAFANA / "dashboards" / name)["uid"] for name in PROMETHEUS_DASHBOARDS}
    assert len(uids) == len(DASHBOARDS) + len(PROMETHEUS_DASHBOARDS), "every dashboard has its own uid"

    text = "\n".join(all_sql)
    missing = []
    for metric in METRICS:
        table, value, _ = view_source(metric)
        literals = [f"'{v}'" for _, v in metric.where]
        via_view = re.search(rf"\b{metric.name}\b", text)
        via_table = any(
            re.search(rf"\b{table.name}\b", q)
            and re.search(rf"\b{value.name}\b", q)
            and all(x in q for x in literals)
            for q in all_sql
        )
        if not (via_view or via_table):
            missing.append(metric.name)
    assert not missing, f"catalogue metrics no dashboard draws: {missing}"


def test_every_panel_query_runs_and_returns_data(
    database_url: str, db_schema: str, db: psycopg.Connection
) -> None:
    started = time.perf_counter()
    filled = fill(database_url, db_schema)
    fill_s = time.perf_counter() - started
    print(f"\nfilled {filled.start:%H:%M}-{filled.end:%H:%M} UTC in {fill_s:.1f} s: {filled.counts}")
    timescaledb = timescaledb_flag(db)
    print(f"macros expanded for {'TimescaleDB (time_bucket)' if timescaledb else 'plain PostgreSQL (floor)'}")
    now = datetime.now(UTC)

    outcomes = [o for path in DASHBOARDS for o in run_dashboard(db, path, now, timescaledb)]
    print(_report(outcomes))
    problems = [o for o in outcomes if o.problem]
    assert not problems, "dashboard queries that fail or return nothing:\n" + "\n".join(
        f"  {o.dashboard} / {o.panel} [{o.ref}]: {o.problem}" for o in problems
    )

    # One concrete choice in every variable instead of All: the filters must still be valid SQL (a single
    # host or project may legitimately have no data in some panels, so only errors count here).
    for path in DASHBOARDS:
        board = load(path)
        time_range = TimeRange(parse_grafana_time(board["time"]["from"], now), now)
        variables, _ = resolve_variables(db, board, time_range, timescaledb, path.name)
        selection = {name: [v.options[0][1]] for name, v in variables.items() if v.options}
        errors = [
            o
            for o in run_dashboard(db, path, now, timescaledb, selection)
            if o.problem and o.problem != "no rows"
        ]
        assert not errors, f"{path.name} with {selection}:\n" + "\n".join(
            f"  {o.panel} [{o.ref}]: {o.problem}" for o in errors
        )


def test_dashboards_refuse_unknown_macros(db: psycopg.Connection) -> None:
    """The expander is as strict as Grafana: an unknown macro is an error, not SQL sent as is."""
    now = datetime.now(UTC)
    with pytest.raises(MacroError, match="unknown macro"):
        expand("SELECT $__timeFilterr(time)", {}, TimeRange(now - timedelta(hours=1), now))
    query = sql.SQL("SELECT {}").format(sql.Literal(1)).as_string(db)
    assert run_query(db, query)[1] == [(1,)]
