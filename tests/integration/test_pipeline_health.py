"""The local stack's Prometheus and the pipeline-health dashboard with the real tools: `aima-metrics
prometheus` (what `up` runs; Debian's ``prometheus`` under it) scrapes two exposition servers holding the
self-metrics the dashboard reads, built from the catalogue (bus/self_metrics.py) with its names, types and
labels, one as the GPU exporter (the seed's gpu_metrics job) and one as a service; then every expression
of infra/grafana/dashboards/pipeline_health.json runs through Prometheus' HTTP API and returns series."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from aima_metrics.settings import StackSettings
from aima_metrics.stack import LocalStackSettings, processes
from api.config import ApiSettings
from bus import self_metrics
from bus.self_metrics import CATALOGUE
from bus.settings import REPO_ROOT, Settings
from consumers.settings import NotifySettings
from producers.settings import CollectorSettings
from tests.prometheus_server import PrometheusServer, free_port, wait_until
from tests.test_prometheus_provisioning import MATCHER, SELECTOR, catalogue_entry, dashboard_expressions

pytestmark = pytest.mark.integration

# Grafana's variables, as it would fill them for a panel of a few hours at the datasource's 15 s interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "3h"}


def _label_values(expressions: list[str]) -> dict[str, dict[str, str]]:
    """Per catalogue metric, label values its selectors in the dashboard match (the first alternative of
    a regex), "x" for the rest."""
    wanted: dict[str, dict[str, str]] = {}
    for expr in expressions:
        for series, matchers in SELECTOR.findall(expr):
            name, _bucket = catalogue_entry(series)
            values = wanted.setdefault(name, {})
            for label, op, value in MATCHER.findall(matchers):
                if op == "=":
                    values[label] = value
                elif op == "=~":
                    values[label] = value.split("|")[0]
    return wanted


def _registry(names: dict[str, dict[str, str]]) -> CollectorRegistry:
    """One series per metric, made with the catalogue's own factories (so name, type and labels are the
    catalogue's), each with a value."""
    registry = CollectorRegistry()
    for name, values in names.items():
        definition = CATALOGUE[name]
        labels = {label: values.get(label, "x") for label in definition.labels}
        if definition.kind == "counter":
            metric = self_metrics.counter(name, registry)  # type: ignore[arg-type]
            (metric.labels(**labels) if labels else metric).inc(3)
        elif definition.kind == "gauge":
            metric = self_metrics.gauge(name, registry)  # type: ignore[arg-type]
            (metric.labels(**labels) if labels else metric).set(1)
        elif definition.kind == "histogram":
            metric = self_metrics.histogram(name, registry, buckets=(0.1, 1.0, 10.0))  # type: ignore[arg-type]
            (metric.labels(**labels) if labels else metric).observe(0.5)
    return registry


@pytest.fixture
def exposition() -> Iterator[tuple[int, int]]:
    """(GPU exporter port, service port): the GPU collector's metrics on the first, as the exporter serves
    them, every other one the dashboard reads on the second."""
    wanted = _label_values([expr for _title, expr in dashboard_expressions()])
    gpu = {n: v for n, v in wanted.items() if CATALOGUE[n].component == "gpu_collector"}
    rest = {n: v for n, v in wanted.items() if n not in gpu}
    servers = []
    ports = []
    for names in (gpu, rest):
        port = free_port()
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=_registry(names))
        servers.append(server)
        ports.append(port)
    try:
        yield ports[0], ports[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def local_prometheus(tmp_path: Path, exposition: tuple[int, int]) -> Iterator[PrometheusServer]:
    """`aima-metrics prometheus` as `up` starts it, scraping the two exposition servers."""
    gpu_port, service_port = exposition
    port = free_port()
    log_file = tmp_path / "prometheus.log"
    env = dict(os.environ, AIMA_STATE_DIR=str(tmp_path / "state"))
    args = [
        "prometheus", "--port", str(port), "--gpu-exporter", f"127.0.0.1:{gpu_port}",
        f"--scrape=sink=127.0.0.1:{service_port}",
    ]  # fmt: skip
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aima_metrics", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(
        process, f"http://127.0.0.1:{port}", log_file, tmp_path / "state" / "prometheus" / "prometheus.yml"
    )
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"aima-metrics prometheus exited with {process.returncode}:\n{server.log_tail()}")
            try:
                return server.client.get("/-/ready").status_code == 200
            except Exception:
                return False

        wait_until(ready, 60, "the local Prometheus to be ready")
        yield server
    finally:
        server.stop()
    assert process.returncode == 0, f"Prometheus did not stop cleanly on SIGTERM:\n{server.log_tail()}"


def test_every_dashboard_query_returns_series_from_the_local_prometheus(
    local_prometheus: PrometheusServer,
) -> None:
    targets = local_prometheus.wait_for_targets_up({"gpu_metrics", "sink", "prometheus"}, timeout_s=90)
    gpu = targets["gpu_metrics"]
    assert gpu["labels"]["service"] == "aima-gpu-metrics", "the seed's label on the GPU exporter's series"
    assert gpu["scrapeInterval"] == "10s"
    assert targets["sink"]["scrapeInterval"] == "15s"
    expressions = dashboard_expressions()

    def runnable(expr: str) -> str:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable left in {expr!r}"
        return expr

    def without_series() -> list[str]:
        """The dashboard's queries that return nothing yet (a parse or evaluation error fails the test)."""
        return [
            f"{title}: {expr}" for title, expr in expressions if not local_prometheus.query(runnable(expr))
        ]

    # A rate needs two scrapes of its series, and each job scrapes on its own schedule (10 s and 15 s,
    # offset from each other): wait until every query has a series, and name those that never get one.
    empty = without_series()
    deadline = time.monotonic() + 120
    while empty and time.monotonic() < deadline:
        time.sleep(1.0)
        empty = without_series()
    assert not empty, "queries without a series after 120 s:\n" + "\n".join(empty)
    # Collector errors come through the seed's job, with its label.
    errors = local_prometheus.query('aima_gpu_collector_errors_total{service="aima-gpu-metrics"}')
    assert errors and errors[0]["metric"]["job"] == "gpu_metrics"


def test_up_scrapes_every_process_it_starts(tmp_path: Path) -> None:
    """The Prometheus process `up` adds: the GPU exporter as gpu_metrics, every other process's
    self-metrics port by its name (the GPU collector's come with its exporter's)."""
    settings = Settings(state_dir=tmp_path)
    local = LocalStackSettings(
        StackSettings(port_base=20100, prometheus_port=20190),
        ApiSettings(),
        CollectorSettings(),
        NotifySettings(),
    )
    listed = processes(settings, local, gpu=False)
    (prometheus,) = [p for p in listed if p.name == "prometheus"]
    args = list(prometheus.args)
    assert args[0] == "prometheus" and args[args.index("--port") + 1] == "20190"
    assert prometheus.metrics_port == 20190 and prometheus.address == "http://127.0.0.1:20190"
    exporter = local.collectors.gpu_exporter_port
    assert args[args.index("--gpu-exporter") + 1] == f"127.0.0.1:{exporter}"
    scraped = dict(re.match(r"--scrape=([^=]+)=(.+)", a).groups() for a in args if a.startswith("--scrape="))  # type: ignore[union-attr]
    others = {
        p.name: f"127.0.0.1:{p.metrics_port}" for p in listed if p.name not in {"prometheus", "gpu-collector"}
    }
    assert scraped == others
    assert {"stream", "sink", "notify", "api", "system-collector", "simulator", "webhook-receiver"} <= set(
        scraped
    )
