"""infra/prometheus (the compose file and the Kubernetes one, with the seed's jobs of §3.2), the local
stack's Prometheus configuration, and the pipeline-health dashboard's PromQL against the self-metric
catalogue (bus/self_metrics.py), checked with the real ``promtool``.

Debian's ``promtool`` (package ``prometheus``, which ./dev installs) is built without Kubernetes service
discovery, so it rejects ``kubernetes_sd_configs``; prometheus.k8s.yml is checked with upstream's promtool,
which ``infra/prometheus/promtool.sh install`` builds from the Go module proxy into the cache folder
(./dev setup runs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aima_metrics.prometheus_local import GPU_JOB, TEMPLATE, local_config
from bus.self_metrics import CATALOGUE

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "infra" / "prometheus"
COMPOSE_CONFIG = PROMETHEUS / "prometheus.yml"
K8S_CONFIG = PROMETHEUS / "prometheus.k8s.yml"
PROMTOOL_SH = PROMETHEUS / "promtool.sh"
GRAFANA = REPO / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pipeline_health.json"
PROMETHEUS_DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS_UID = "aima-prometheus"

# The seed's jobs (§3.2), as written there.
SEED_GPU_JOB = {
    "job_name": "gpu_metrics",
    "scrape_interval": "10s",
    "static_configs": [{"targets": ["gpu-exporter:9400"], "labels": {"service": "aima-gpu-metrics"}}],
}
SEED_SERVICES_RELABEL = [
    {"source_labels": ["__meta_kubernetes_pod_label_app"], "regex": "aima-.*", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_pod_label_component"], "target_label": "component"},
]
# Labels every scraped series has, whatever its catalogue entry says; `le` on a histogram's buckets.
TARGET_LABELS = {"job", "instance", "service", "component", "namespace", "pod"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _debian_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: apt-get install -y prometheus (the Debian package; ./dev does)")
    return path


def _promtool_check(promtool: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=120, check=False
    )


def _upstream_promtool() -> str:
    """The promtool infra/prometheus/promtool.sh builds: built here when missing, or, while CI builds it
    in the background, once that build is done (the script waits on the Go build lock)."""
    built = subprocess.run(
        ["bash", str(PROMTOOL_SH), "install"], capture_output=True, text=True, timeout=3600
    )
    assert built.returncode == 0, f"upstream promtool did not build:\n{built.stderr[-3000:]}"
    return subprocess.run(
        ["bash", str(PROMTOOL_SH), "path"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


# ---- the configuration files ---------------------------------------------------------------------------


def test_both_configs_carry_the_seeds_gpu_job() -> None:
    for path in (COMPOSE_CONFIG, K8S_CONFIG):
        jobs = {job["job_name"]: job for job in _yaml(path)["scrape_configs"]}
        assert jobs[GPU_JOB] == SEED_GPU_JOB, path.name


def test_k8s_config_discovers_the_aima_pods_as_the_seed_does() -> None:
    jobs = {job["job_name"]: job for job in _yaml(K8S_CONFIG)["scrape_configs"]}
    services = jobs["aima_services"]
    assert services["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = services["relabel_configs"]
    assert relabel[: len(SEED_SERVICES_RELABEL)] == SEED_SERVICES_RELABEL, "the seed's rules come first"
    # Ours after them: only the self-metrics port, so no other declared container port becomes a target.
    assert {
        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
        "regex": "metrics",
        "action": "keep",
    } in relabel


def test_promtool_accepts_the_compose_config() -> None:
    result = _promtool_check(_debian_promtool(), COMPOSE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_upstream_promtool_accepts_the_k8s_config() -> None:
    promtool = _upstream_promtool()  # Debian's has no Kubernetes discovery: it rejects kubernetes_sd_configs
    for path in (K8S_CONFIG, COMPOSE_CONFIG):
        result = _promtool_check(promtool, path)
        assert result.returncode == 0, f"{path.name}: {result.stdout}{result.stderr}"


def test_the_local_stacks_config_scrapes_every_process(tmp_path: Path) -> None:
    """What `aima-metrics prometheus` runs with (`up` passes the ports): the template's global settings,
    the seed's job on the local exporter, a job per process with the compose job's interval."""
    template = _yaml(TEMPLATE)
    targets = [
        ("stream", "127.0.0.1:9101"),
        ("sink", "127.0.0.1:9102"),
        ("webhook-receiver", "127.0.0.1:9108"),
    ]
    config = local_config(template, 9090, "127.0.0.1:9400", targets)
    assert config["global"] == template["global"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[GPU_JOB] == {
        **SEED_GPU_JOB,
        "static_configs": [{"targets": ["127.0.0.1:9400"], "labels": {"service": "aima-gpu-metrics"}}],
    }
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9090"]}]
    for name, address in targets:
        assert jobs[name]["static_configs"] == [{"targets": [address]}]
        assert jobs[name]["scrape_interval"] == "15s"
    written = tmp_path / "prometheus.yml"
    written.write_text(yaml.safe_dump(config, sort_keys=False))
    result = _promtool_check(_debian_promtool(), written)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the pipeline-health dashboard ---------------------------------------------------------------------


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    board = json.loads(path.read_text())
    return [
        (panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])
    ]


SELECTOR = re.compile(r"\b(aima_[a-z0-9_]+)(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def catalogue_entry(series: str) -> tuple[str, bool]:
    """(catalogue name, is a histogram's ``_bucket``) of a series name in an expression; fails the test
    when the catalogue has no such metric."""
    if series in CATALOGUE:
        return series, False
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and CATALOGUE.get(base) is not None and CATALOGUE[base].kind == "histogram":
            return base, suffix == "_bucket"
    pytest.fail(f"{series} is not in bus/self_metrics.py (nor a histogram's _bucket, _sum or _count)")


def test_dashboard_reads_only_catalogue_metrics_and_their_labels() -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    seen = set()
    for title, expr in expressions:
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: {expr!r} reads no aima_ metric"
        allowed = set(TARGET_LABELS)
        for series, matchers in selectors:
            name, bucket = catalogue_entry(series)
            seen.add(name)
            labels = set(CATALOGUE[name].labels) | TARGET_LABELS | ({"le"} if bucket else set())
            allowed |= labels
            for label, _op, _value in MATCHER.findall(matchers):
                assert label in labels, f"{title}: {series} has no label {label!r}"
        for group in GROUPING.findall(expr):
            for label in filter(None, (item.strip() for item in group.split(","))):
                assert label in allowed, f"{title}: grouping by {label!r}, which {expr!r} does not have"
    # The five signals, each from its catalogue metric.
    for wanted in [
        "aima_sink_consumer_lag_records",
        "aima_stream_dead_letters_total",
        "aima_sink_dead_letters_total",
        "aima_notifier_dead_letters_total",
        "aima_stream_batch_seconds",
        "aima_sink_batch_duration_seconds",
        "aima_notifier_notifications_total",
        "aima_gpu_collector_errors_total",
        "aima_system_collector_errors_total",
        "aima_service_up",
    ]:
        assert wanted in seen, f"the dashboard does not show {wanted}"


def test_dashboard_uses_the_provisioned_prometheus_datasource() -> None:
    (datasource,) = _yaml(PROMETHEUS_DATASOURCE)["datasources"]
    assert datasource["uid"] == PROMETHEUS_UID and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090", "the compose service"
    assert datasource.get("isDefault") is False, "TimescaleDB's datasource stays the default"
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "aima-pipeline-health"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": PROMETHEUS_UID}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
