"""The Docker Compose stack and its Prometheus and Grafana provisioning, checked with the real tools.

`docker-compose config` (Debian package ``docker-compose``) validates and interpolates docker-compose.yml;
its output is what these tests read. ``promtool`` (Debian package ``prometheus``) checks prometheus.yml.
No Docker engine is needed: nothing here starts a container.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "infra" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "infra" / "grafana"
DATASOURCE_FILE = GRAFANA / "provisioning" / "datasources" / "postgres.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARDS_DIR = GRAFANA / "dashboards"

PASSWORD = "compose-test-Secret-4d1c"
S3_SECRET = "compose-test-S3-7a2e"
WEBHOOK_KEY = "compose-test-Webhook-93f0"
READER_PASSWORD = "compose-test-Reader-5b8e"
GRAFANA_ADMIN_PASSWORD = "compose-test-Grafana-c61d"
DATASOURCE_UID = "aima-postgres"
PROMETHEUS_DATASOURCE_UID = "aima-prometheus"

# Every project service: the `aima-metrics` arguments it runs and the profile it needs (None: always on).
PROJECT_SERVICES: dict[str, tuple[list[str], str | None]] = {
    "migrate": (["db", "migrate"], None),
    "db-reader": (["db", "grant-reader", "aima_grafana"], None),
    "topics": (["topics", "--create"], None),
    "stream": (["stream"], None),
    "sink": (["sink"], None),
    "notify": (["notify"], None),
    "api": (["api"], None),
    "gpu-exporter": (["collect", "gpu"], "gpu"),
    "system-collector": (["collect", "system"], None),
    "simulator": (["collect", "jobs-sim"], "sim"),
    "archive-bucket": (["archive", "bucket"], None),
    "webhook-receiver": (["webhook-receiver", "--host", "0.0.0.0", "--port", "8080"], None),
}
INFRA_IMAGES = {
    "kafka": "apache/kafka:4.1.1",
    "timescaledb": "timescale/timescaledb:latest-pg16",
    "prometheus": "prom/prometheus",
    "grafana": "grafana/grafana",
    "s3": "chrislusf/seaweedfs",
}
SELF_METRICS_SERVICES = [
    "stream",
    "sink",
    "notify",
    "api",
    "system-collector",
    "simulator",
    "webhook-receiver",
]


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not on PATH: install it (`apt-get install -y docker-compose`, the Debian "
            "package); these tests validate docker-compose.yml with the real `docker-compose config`"
        )
    return path


def _compose_config(
    password: str | None,
    tmp_path: Path,
    s3_secret: str | None = S3_SECRET,
    webhook_key: str | None = WEBHOOK_KEY,
    reader_password: str | None = READER_PASSWORD,
    grafana_admin_password: str | None = GRAFANA_ADMIN_PASSWORD,
    files: tuple[Path, ...] = (COMPOSE_FILE,),
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of ``files`` (merged in order) in a clean environment: no inherited AIMA_*
    variables and an empty env file, so a developer's .env cannot supply (or hide the lack of) the
    password."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    if password is not None:
        env["AIMA_DB_PASSWORD"] = password
    if s3_secret is not None:
        env["AIMA_S3_SECRET_KEY"] = s3_secret
    if webhook_key is not None:
        env["AIMA_WEBHOOK_KEY"] = webhook_key
    if reader_password is not None:
        env["AIMA_DB_READER_PASSWORD"] = reader_password
    if grafana_admin_password is not None:
        env["AIMA_GRAFANA_ADMIN_PASSWORD"] = grafana_admin_password
    env.update(extra_env or {})
    command = [
        _docker_compose(),
        "--project-directory", str(REPO),
        "--env-file", str(env_file),
        *[arg for path in files for arg in ("-f", str(path))],
        "config",
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = _compose_config(PASSWORD, tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict) and isinstance(parsed.get("services"), dict), result.stdout
    return parsed


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


def _load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    return yaml.safe_load(path.read_text())


def _ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(published, target) pairs, from either the short "8000:8000" or the long form."""
    pairs = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")  # [ip:]published:target[/protocol]
            pairs.add((int(parts[-2] if len(parts) > 1 else parts[-1]), int(parts[-1])))
    return pairs


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (absolute host path for binds, the name for named volumes)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = str(volume["source"])
        else:
            source, target = str(volume).split(":")[:2]
            mounts[target] = source
    return mounts


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return command.split() if isinstance(command, str) else list(command or [])


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


# ---- docker-compose.yml ------------------------------------------------------------------------


def test_raw_file_is_compose_spec_with_a_shared_env_anchor() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw, "the Compose spec has no `version:` key"
    shared = raw.get("x-aima-env")
    assert isinstance(shared, dict), "the shared environment lives in the extension field x-aima-env"
    assert shared["AIMA_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert str(shared["AIMA_METRICS_PORT"]) == "9100"
    assert "${AIMA_DB_PASSWORD" in shared["AIMA_DATABASE_URL"]


def test_config_fails_without_the_password(tmp_path: Path) -> None:
    """No secret is baked in: without AIMA_DB_PASSWORD, compose refuses the file."""
    result = _compose_config(None, tmp_path)
    assert result.returncode != 0, "docker-compose config succeeded without AIMA_DB_PASSWORD"
    assert "AIMA_DB_PASSWORD" in result.stderr, result.stderr


def test_every_service_is_present(services: dict[str, dict[str, Any]]) -> None:
    expected = set(PROJECT_SERVICES) | set(INFRA_IMAGES)
    missing = expected - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(PROJECT_SERVICES))
def test_project_service_runs_its_cli_command(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    args, profile = PROJECT_SERVICES[name]
    build = service.get("build")
    context = build["context"] if isinstance(build, dict) else build
    assert context is not None and Path(context).resolve() == REPO, f"{name} must be built from ./Dockerfile"
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    assert dockerfile == "Dockerfile"
    assert _command(service) == args, f"{name} must run `aima-metrics {' '.join(args)}`"
    assert service.get("profiles", []) == ([profile] if profile else []), f"profiles of {name}"


def test_project_services_share_one_image_and_environment(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name].get("image") for name in PROJECT_SERVICES}
    assert len(images) == 1, f"the project services should share one built image, got {images}"
    for name in PROJECT_SERVICES:
        env = _environment(services[name])
        assert env.get("AIMA_KAFKA_BOOTSTRAP") == "kafka:9092", name
        assert env.get("AIMA_DATABASE_URL") == f"postgresql://aima:{PASSWORD}@timescaledb:5432/aima", name
        assert env.get("AIMA_METRICS_PORT") == "9100", name


def test_startup_order(services: dict[str, dict[str, Any]]) -> None:
    assert _depends_on(services["migrate"]) == {"timescaledb": "service_healthy"}
    assert services["migrate"].get("restart", "no") == "no", "migrate is one-shot"
    assert _depends_on(services["topics"]) == {"kafka": "service_healthy"}
    for name in ["stream", "sink", "notify", "gpu-exporter", "system-collector", "simulator"]:
        assert _depends_on(services[name]).get("topics") == "service_completed_successfully", name
    for name in ["sink", "notify", "api", "grafana"]:
        assert _depends_on(services[name]).get("migrate") == "service_completed_successfully", name
    for name, service in services.items():
        for dependency, condition in _depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{dependency} needs a healthcheck"


def test_infrastructure_images(services: dict[str, dict[str, Any]]) -> None:
    for name, image in INFRA_IMAGES.items():
        actual = services[name].get("image", "")
        assert actual == image or actual.startswith(f"{image}:"), f"{name} runs {actual!r}, expected {image}"
        assert "build" not in services[name], name


def test_kafka_is_reachable_from_containers_and_host(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = _environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    by_address = {address: name for name, address in advertised.items()}
    internal, external = by_address["kafka:9092"], by_address["localhost:9092"]
    assert listeners[internal].rsplit(":", 1)[1] == "9092", "containers reach the broker as kafka:9092"
    host_port = int(listeners[external].rsplit(":", 1)[1])
    assert (9092, host_port) in _ports(kafka), "the host reaches the broker as localhost:9092"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == internal
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "CLUSTER_ID must be a base64 16-byte uuid"
    assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])
    assert _mounts(kafka).get(env["KAFKA_LOG_DIRS"]) == "kafka-data"


def test_timescaledb(services: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    db = services["timescaledb"]
    env = _environment(db)
    assert env["POSTGRES_DB"] == "aima" and env["POSTGRES_USER"] == "aima"
    assert env["POSTGRES_PASSWORD"] == PASSWORD, "the password comes from AIMA_DB_PASSWORD"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    volume = _mounts(db)["/var/lib/postgresql/data"]
    assert volume in config.get("volumes", {}), "the database lives on a named volume"


def test_no_secret_literal_in_compose_file() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert value.startswith("${"), f"{name}.{key} must come from the environment, not a literal"


def test_gpu_exporter_reserves_nvidia_gpus(services: dict[str, dict[str, Any]]) -> None:
    exporter = services["gpu-exporter"]
    devices = exporter["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert (9400, 9400) in _ports(exporter)


def test_api_port(services: dict[str, dict[str, Any]]) -> None:
    assert (8000, 8000) in _ports(services["api"])


def test_prometheus_service(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    command = _command(prometheus)
    assert "--web.enable-remote-write-receiver" in command
    config_flag = next(arg for arg in command if arg.startswith("--config.file="))
    mounted = _mounts(prometheus)[config_flag.split("=", 1)[1]]
    assert Path(mounted).resolve() == PROMETHEUS_FILE
    assert (9090, 9090) in _ports(prometheus)


def test_grafana_service(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = {target: Path(source).resolve() for target, source in _mounts(grafana).items()}
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == DASHBOARDS_DIR
    assert DASHBOARDS_DIR.is_dir()
    env = _environment(grafana)
    assert env.get("AIMA_DB_READER_PASSWORD") == READER_PASSWORD, "the datasource reads the reader's password"
    assert "AIMA_DB_PASSWORD" not in env, "Grafana never gets the database owner's password"
    assert env.get("GF_SECURITY_ADMIN_PASSWORD") == GRAFANA_ADMIN_PASSWORD, "no default admin password"
    assert _depends_on(grafana).get("db-reader") == "service_completed_successfully"
    reader = services["db-reader"]
    assert _environment(reader).get("AIMA_DB_READER_PASSWORD") == READER_PASSWORD
    assert _depends_on(reader) == {"migrate": "service_completed_successfully"}
    assert (3000, 3000) in _ports(grafana)


# ---- infra/prometheus/prometheus.yml --------------------------------------------------------------


def _scrape_targets() -> dict[str, tuple[set[str], str]]:
    """job name -> (targets, effective scrape interval)."""
    prometheus = _load_yaml(PROMETHEUS_FILE)
    default_interval = prometheus.get("global", {}).get("scrape_interval", "1m")
    jobs = {}
    for job in prometheus["scrape_configs"]:
        targets = {t for group in job.get("static_configs", []) for t in group["targets"]}
        jobs[job["job_name"]] = (targets, job.get("scrape_interval", default_interval))
    return jobs


def test_prometheus_scrapes_the_exporter_and_every_service(services: dict[str, dict[str, Any]]) -> None:
    jobs = _scrape_targets()
    by_target = {target: interval for targets, interval in jobs.values() for target in targets}
    # The seed's gpu_metrics job (§3.2): the exporter every 10 s; the self-metrics every 15 s.
    assert jobs["gpu_metrics"] == ({"gpu-exporter:9400"}, "10s")
    for target in [f"{name}:9100" for name in SELF_METRICS_SERVICES]:
        assert target in by_target, f"prometheus.yml does not scrape {target}"
        assert by_target[target] == "15s", f"{target} is scraped every {by_target[target]}, not 15s"
    for target in by_target:
        host = target.rsplit(":", 1)[0]
        assert host == "localhost" or host in services, f"scrape target {target} is no compose service"


def test_promtool_accepts_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (`apt-get install -y prometheus`)")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- infra/grafana/provisioning ----------------------------------------------------------------


def test_grafana_datasource(services: dict[str, dict[str, Any]]) -> None:
    provisioning = _load_yaml(DATASOURCE_FILE)
    assert provisioning["apiVersion"] == 1
    (datasource,) = [d for d in provisioning["datasources"] if d.get("uid") == DATASOURCE_UID]
    assert datasource["type"] in {"grafana-postgresql-datasource", "postgres"}
    host, port = datasource["url"].rsplit(":", 1)
    assert host == "timescaledb" and host in services and port == "5432"
    assert datasource["user"] == "aima_grafana", "the read-only login `db-reader` creates, not the owner"
    json_data = datasource["jsonData"]
    assert json_data["database"] == "aima"
    assert json_data["timescaledb"] is True
    assert json_data["postgresVersion"] == 1600
    assert json_data["sslmode"] == "disable"
    password = datasource["secureJsonData"]["password"]
    assert password in {"$AIMA_DB_READER_PASSWORD", "${AIMA_DB_READER_PASSWORD}"}


def test_grafana_dashboard_provider_reads_the_mounted_folder() -> None:
    provisioning = _load_yaml(DASHBOARD_PROVIDER_FILE)
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def _datasource_refs(node: Any) -> list[Any]:
    refs = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                refs.append(value)
            refs.extend(_datasource_refs(value))
    elif isinstance(node, list):
        for item in node:
            refs.extend(_datasource_refs(item))
    return refs


def test_dashboards_use_the_provisioned_datasource() -> None:
    """Every dashboard JSON (added beside the provider) parses and names a provisioned datasource by its
    uid: TimescaleDB's, or Prometheus' (the pipeline-health dashboard)."""
    provisioned = {
        d["uid"]
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
        for d in _load_yaml(path)["datasources"]
    }
    assert provisioned == {DATASOURCE_UID, PROMETHEUS_DATASOURCE_UID}
    for dashboard in sorted(DASHBOARDS_DIR.rglob("*.json")):
        for ref in _datasource_refs(json.loads(dashboard.read_text())):
            if ref is None:
                continue
            if isinstance(ref, str):
                assert ref.startswith("$"), f"{dashboard.name}: refer to the datasource by uid, not {ref!r}"
                continue
            uid = str(ref.get("uid", ""))
            if ref.get("type") in {"grafana", "datasource"} or uid.startswith("$") or uid == "-- Grafana --":
                continue
            assert uid in provisioned, f"{dashboard.name}: datasource uid {uid!r}, not one of {provisioned}"


# ---- Dockerfile and .dockerignore -----------------------------------------------------------------


def test_dockerfile_installs_the_project_as_non_root() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    stages = [i for i, line in enumerate(instructions) if line.startswith("FROM ")]
    assert instructions[stages[-1]] == "FROM python:3.11-slim", "the image is the last stage"
    instructions = instructions[stages[-1] :]
    user_at = next(i for i, line in enumerate(instructions) if line.startswith("USER "))
    assert instructions[user_at].split()[1] not in {"root", "0"}
    install_at = next(i for i, line in enumerate(instructions) if "pip install ." in line)
    assert install_at > user_at, "pip install . runs as the non-root user"
    assert 'ENTRYPOINT ["aima-metrics"]' in instructions


def test_the_image_has_the_console_library_dev_setup_installs() -> None:
    """The same uPlot version as ./dev setup's, and the API told where it lies (api/config.py)."""
    text = (REPO / "Dockerfile").read_text()
    pinned = re.search(r"^UPLOT_VERSION=(\S+)$", (REPO / "dev").read_text(), re.MULTILINE)
    assert pinned is not None and f"ARG UPLOT_VERSION={pinned[1]}" in text
    copied = re.search(r"^COPY --from=console-library .* (\S+)/$", text, re.MULTILINE)
    assert copied is not None and f"ENV AIMA_API_UI_LIBRARY_DIR={copied[1]}" in text
    from api.config import ApiSettings

    assert ApiSettings.from_environ({"AIMA_API_UI_LIBRARY_DIR": copied[1]}).ui_library_dir == Path(copied[1])


def test_dockerignore_keeps_what_the_wheel_needs() -> None:
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = ["pyproject.toml", pyproject["project"]["readme"], *wheel["packages"], *wheel["force-include"]]
    for path in needed:
        excluded = [p for p in patterns if not p.startswith("!") and fnmatch(path, p)]
        assert not excluded, f".dockerignore excludes {path} (by {excluded}), which `pip install .` needs"
    for secret_or_bulk in [".git", ".venv", ".env", "aima.env"]:
        assert any(fnmatch(secret_or_bulk, p) for p in patterns), (
            f".dockerignore should exclude {secret_or_bulk}"
        )


def test_the_archive_store_and_the_sink_that_writes_to_it(
    services: dict[str, dict[str, Any]], config: dict[str, Any]
) -> None:
    s3 = services["s3"]
    assert s3["command"][:1] == ["server"] and "-s3" in s3["command"]
    assert _environment(s3)["AWS_SECRET_ACCESS_KEY"] == S3_SECRET, "the secret comes from AIMA_S3_SECRET_KEY"
    assert "/healthz" in " ".join(s3["healthcheck"]["test"])
    assert _mounts(s3)["/data"] in config.get("volumes", {}), "the archive lives on a named volume"
    sink = _environment(services["sink"])
    assert sink["AIMA_ARCHIVE_ENDPOINT_URL"] == "http://s3:8333"
    assert sink["AIMA_ARCHIVE_SECRET_ACCESS_KEY"] == S3_SECRET
    assert sink["AIMA_ARCHIVE_BUCKET"] == _environment(services["archive-bucket"])["AIMA_ARCHIVE_BUCKET"]
    assert services["sink"]["depends_on"]["archive-bucket"]["condition"] == "service_completed_successfully"
    assert services["archive-bucket"]["depends_on"]["s3"]["condition"] == "service_healthy"


def test_config_fails_without_the_archive_secret(tmp_path: Path) -> None:
    result = _compose_config(PASSWORD, tmp_path, s3_secret=None)
    assert result.returncode != 0 and "AIMA_S3_SECRET_KEY" in result.stderr


def test_the_notifier_routes_every_alert_to_the_webhook_receiver(services: dict[str, dict[str, Any]]) -> None:
    """Without a routing file the notifier would dead-letter every alert (NoReceiver): compose mounts
    infra/notify and routes with local.yaml to the webhook-receiver service, both holding the same key."""
    notify, receiver = _environment(services["notify"]), _environment(services["webhook-receiver"])
    mounted = Path(notify["AIMA_NOTIFY_CONFIG"])
    assert _mounts(services["notify"])[str(mounted.parent)] == str(REPO / "infra" / "notify")
    routing = yaml.safe_load((REPO / "infra" / "notify" / mounted.name).read_text())
    (receiver_spec,) = [r for r in routing["receivers"] if r["name"] == routing["route"]["receiver"]]
    webhook = receiver_spec["webhook"]
    assert webhook == {"url_env": "AIMA_LOCAL_WEBHOOK_URL", "hmac_key_env": "AIMA_WEBHOOK_KEY"}
    command = _command(services["webhook-receiver"])
    port = command[command.index("--port") + 1]
    assert notify["AIMA_LOCAL_WEBHOOK_URL"] == f"http://webhook-receiver:{port}/alerts"
    assert notify["AIMA_WEBHOOK_KEY"] == receiver["AIMA_WEBHOOK_KEY"] == WEBHOOK_KEY
    assert _depends_on(services["notify"]).get("webhook-receiver") == "service_healthy"


def test_config_fails_without_the_webhook_key(tmp_path: Path) -> None:
    result = _compose_config(PASSWORD, tmp_path, webhook_key=None)
    assert result.returncode != 0 and "AIMA_WEBHOOK_KEY" in result.stderr


@pytest.mark.parametrize(
    ("missing", "variable"),
    [
        ("reader_password", "AIMA_DB_READER_PASSWORD"),
        ("grafana_admin_password", "AIMA_GRAFANA_ADMIN_PASSWORD"),
    ],
)
def test_config_fails_without_the_grafana_secrets(tmp_path: Path, missing: str, variable: str) -> None:
    """Grafana's admin password and its reader login's are required like the database password."""
    result = _compose_config(PASSWORD, tmp_path, **{missing: None})
    assert result.returncode != 0 and variable in result.stderr, result.stderr


# ---- docker-compose.tls.yml: the TLS overlay (P2) --------------------------------------------------

TLS_FILE = REPO / "docker-compose.tls.yml"
MAKE_CERTS = REPO / "infra" / "tls" / "make-certs.sh"
KAFKA_PASSWORD = "compose-test-Kafka-2f9a"
KAFKA_ADMIN_PASSWORD = "compose-test-KafkaAdmin-8d3b"
TLS_SECRETS = {"AIMA_KAFKA_PASSWORD": KAFKA_PASSWORD, "AIMA_KAFKA_ADMIN_PASSWORD": KAFKA_ADMIN_PASSWORD}
TLS_DIR = REPO / "tls"  # the overlay's default AIMA_TLS_DIR, resolved by compose against the project dir
CA_IN_CONTAINER = "/etc/aima/tls/ca.pem"


@pytest.fixture(scope="module")
def tls_services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("compose-tls")
    result = _compose_config(PASSWORD, folder, files=(COMPOSE_FILE, TLS_FILE), extra_env=TLS_SECRETS)
    assert result.returncode == 0, f"docker-compose config of the TLS overlay failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)["services"]


@pytest.fixture(scope="module")
def example_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The certificates as a user makes them: infra/tls/make-certs.sh with the system's openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH (`apt-get install -y openssl`): infra/tls/make-certs.sh needs it")
    folder = tmp_path_factory.mktemp("certs") / "tls"
    result = subprocess.run(
        ["sh", str(MAKE_CERTS), str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


def _mounted_from_tls_dir(service: dict[str, Any], target: str, name: str) -> None:
    source = _mounts(service).get(target)
    assert source is not None, f"{target} is not mounted"
    assert Path(source) == TLS_DIR / name, f"{target} comes from {source}, not ./tls/{name}"


@pytest.mark.parametrize("missing", sorted(TLS_SECRETS))
def test_tls_overlay_requires_the_kafka_secrets(tmp_path: Path, missing: str) -> None:
    secrets = {key: value for key, value in TLS_SECRETS.items() if key != missing}
    result = _compose_config(PASSWORD, tmp_path, files=(COMPOSE_FILE, TLS_FILE), extra_env=secrets)
    assert result.returncode != 0 and missing in result.stderr, result.stderr


def test_tls_overlay_has_no_secret_literal() -> None:
    raw = yaml.safe_load(TLS_FILE.read_text())
    envs = [("x-aima-tls-env", raw["x-aima-tls-env"])]
    envs += [(name, _environment(service)) for name, service in raw["services"].items()]
    for name, env in envs:
        for key, value in env.items():
            if "PASSWORD" in key or "SECRET" in key:
                assert str(value).startswith("${") and ":?" in str(value), f"{name}.{key} must be required"


@pytest.mark.parametrize("name", sorted(PROJECT_SERVICES))
def test_tls_every_project_service_talks_sasl_ssl_and_verify_full(
    tls_services: dict[str, dict[str, Any]], name: str
) -> None:
    """Every project service (each has the broker and the database in its environment) gets the README's
    variables: SASL_SSL with SCRAM as aima, the CA mounted, and the database URL at verify-full against it."""
    service = tls_services[name]
    env = _environment(service)
    assert env["AIMA_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["AIMA_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["AIMA_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["AIMA_KAFKA_SASL_USERNAME"] == "aima"
    assert env["AIMA_KAFKA_SASL_PASSWORD"] == KAFKA_PASSWORD
    assert env["AIMA_KAFKA_SSL_CA_LOCATION"] == CA_IN_CONTAINER
    _mounted_from_tls_dir(service, CA_IN_CONTAINER, "ca.pem")
    url = urlsplit(env["AIMA_DATABASE_URL"])
    assert (url.hostname, url.port, url.path, url.password) == ("timescaledb", 5432, "/aima", PASSWORD)
    query = parse_qs(url.query)
    assert query == {"sslmode": ["verify-full"], "sslrootcert": [CA_IN_CONTAINER]}, query
    assert _command(service) == PROJECT_SERVICES[name][0], "the overlay changes no command"
    assert service.get("profiles", []) == ([PROJECT_SERVICES[name][1]] if PROJECT_SERVICES[name][1] else [])


def test_tls_overlay_keeps_the_base_services_own_settings(
    tls_services: dict[str, dict[str, Any]], services: dict[str, dict[str, Any]]
) -> None:
    """Compose merges environment and volumes key by key: nothing of the base file is lost."""
    for name, base in services.items():
        merged = _environment(tls_services[name])
        for key, value in _environment(base).items():
            if key != "AIMA_DATABASE_URL":
                assert merged.get(key) == value, f"{name}.{key} changed by the overlay"
        for target, source in _mounts(base).items():
            if name == "kafka" and target == "/var/lib/kafka/data":
                continue
            assert _mounts(tls_services[name]).get(target) == source, f"{name}: {target} lost"


KAFKA_ADMIN_PASSWORD_ODD = "odd|pass&word"  # sed's special characters survive the script


def _properties(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _run_kafka_entrypoint(
    script: Path, template: Path, tmp_path: Path, formatted: bool = False
) -> dict[str, Any]:
    """Runs the kafka service's entrypoint with KAFKA_HOME holding stubs of kafka-storage.sh and
    kafka-server-start.sh; returns the configuration files it wrote and the format arguments."""
    home = tmp_path / ("formatted" if formatted else "fresh")
    (home / "bin").mkdir(parents=True)
    (home / "data").mkdir()
    if formatted:
        (home / "data" / "meta.properties").write_text("node.id=1\n")
    out = home / "out"
    out.mkdir()
    stubs = {
        "kafka-storage.sh": f'for a in "$@"; do printf "%s\\n" "$a"; done > {out}/kafka-storage.args\n',
        "kafka-server-start.sh": f'cp "$1" {out}/server.properties\n',
    }
    for name, body in stubs.items():
        (home / "bin" / name).write_text("#!/bin/sh\n" + body)
        (home / "bin" / name).chmod(0o755)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KAFKA_HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "BROKER_TEMPLATE": str(template),
        "BROKER_DATA_DIR": "/var/lib/kafka/data",
        "CLUSTER_ID": "XRS0DkdhSqaz4jPWCfl3Ag",
        "BROKER_AIMA_PASSWORD": KAFKA_PASSWORD,
        "BROKER_ADMIN_PASSWORD": KAFKA_ADMIN_PASSWORD_ODD,
    }
    if formatted:
        env["BROKER_DATA_DIR"] = str(home / "data")
    result = subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found: dict[str, Any] = {"server.properties": _properties((out / "server.properties").read_text())}
    found["admin-client.properties"] = _properties(
        (home / "tmp" / "aima-kafka" / "admin-client.properties").read_text()
    )
    if (out / "kafka-storage.args").exists():
        found["kafka-storage.args"] = (out / "kafka-storage.args").read_text().splitlines()
    return found


def test_tls_kafka_broker_is_sasl_ssl_only(tls_services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    kafka = tls_services["kafka"]
    entrypoint = kafka["entrypoint"]
    script = Path(_mounts(kafka)[entrypoint[-1]])
    assert script == REPO / "infra" / "kafka" / "compose-sasl-ssl.sh"
    template = Path(_mounts(kafka)["/etc/aima/kafka/server-sasl-ssl.properties"])
    assert template == REPO / "infra" / "kafka" / "server-sasl-ssl.properties"
    _mounted_from_tls_dir(kafka, "/etc/aima/tls/kafka.pem", "kafka.pem")
    _mounted_from_tls_dir(kafka, "/etc/aima/tls/ca.pem", "ca.pem")
    env = _environment(kafka)
    assert env["BROKER_AIMA_PASSWORD"] == KAFKA_PASSWORD
    assert env["BROKER_ADMIN_PASSWORD"] == KAFKA_ADMIN_PASSWORD
    # The SCRAM users exist only on a volume formatted by the script, never on the plain stack's.
    assert _mounts(kafka)["/var/lib/kafka/data"] == "kafka-tls-data"
    # The broker's configuration as the script writes it (run here, with the image's two Kafka commands
    # replaced by stubs that record what they were given); later keys win, as in java.util.Properties.
    generated = _run_kafka_entrypoint(script, template, tmp_path)
    props = generated["server.properties"]
    assert not re.findall(r"@[A-Z_]+@", "\n".join(props.values())), "a template placeholder is left"
    protocols = dict(item.split(":", 1) for item in props["listener.security.protocol.map"].split(","))
    listeners = dict(item.split("://", 1) for item in props["listeners"].split(","))
    advertised = dict(item.split("://", 1) for item in props["advertised.listeners"].split(","))
    for name, address in listeners.items():
        if name == props["controller.listener.names"]:
            assert address.startswith("127.0.0.1:"), "the PLAINTEXT controller listener stays on loopback"
        else:
            assert protocols[name] == "SASL_SSL", f"listener {name} is {protocols[name]}"
            jaas = props[f"listener.name.{name.lower()}.scram-sha-512.sasl.jaas.config"]
            assert "ScramLoginModule required" in jaas
    by_address = {address: name for name, address in advertised.items()}
    assert protocols[by_address["kafka:9092"]] == "SASL_SSL", "containers' bootstrap kafka:9092"
    external = by_address["localhost:9092"]
    assert protocols[external] == "SASL_SSL"
    assert (9092, int(listeners[external].rsplit(":", 1)[1])) in _ports(kafka), "the host's localhost:9092"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["ssl.keystore.type"] == "PEM" and props["ssl.keystore.location"] == "/etc/aima/tls/kafka.pem"
    assert props["ssl.truststore.location"] == CA_IN_CONTAINER
    assert props["log.dirs"] == "/var/lib/kafka/data"
    assert (
        f'password="{KAFKA_ADMIN_PASSWORD_ODD}"'
        in props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    )
    # The storage is formatted with both SCRAM users, once: a second start keeps the volume as it is.
    format_args = generated["kafka-storage.args"]
    assert format_args[:3] == ["format", "-t", _environment(kafka)["CLUSTER_ID"]]
    assert f"SCRAM-SHA-512=[name=aima,password={KAFKA_PASSWORD}]" in format_args
    assert f"SCRAM-SHA-512=[name=admin,password={KAFKA_ADMIN_PASSWORD_ODD}]" in format_args
    assert _run_kafka_entrypoint(script, template, tmp_path, formatted=True).get("kafka-storage.args") is None
    client = generated["admin-client.properties"]
    assert client["security.protocol"] == "SASL_SSL" and client["ssl.truststore.location"] == CA_IN_CONTAINER
    health = " ".join(kafka["healthcheck"]["test"])
    assert "--command-config /tmp/aima-kafka/admin-client.properties" in health


def test_tls_timescaledb_takes_tcp_only_over_tls(tls_services: dict[str, dict[str, Any]]) -> None:
    db = tls_services["timescaledb"]
    command = _command(db)
    assert command[0] == "postgres"
    settings = dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "-c")
    assert settings["ssl"] == "on"
    hba = Path(_mounts(db)[settings["hba_file"]])
    assert hba == REPO / "infra" / "postgres" / "pg_hba-tls.conf"
    lines = hba.read_text().splitlines()
    rules = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    assert all(rule[0] in {"local", "hostssl", "hostnossl"} for rule in rules), "no `host` rule: TLS only"
    assert ["hostnossl", "all", "all", "all", "reject"] in rules
    assert all(rule[-1] != "trust" for rule in rules if rule[0] != "local"), "TCP always authenticates"
    entrypoint = Path(_mounts(db)[db["entrypoint"][-1]])
    assert entrypoint == REPO / "infra" / "postgres" / "compose-tls-entrypoint.sh"
    script = entrypoint.read_text()
    # The entrypoint copies the mounted pair to where ssl_cert_file and ssl_key_file point.
    for name, setting in [("timescaledb.crt", "ssl_cert_file"), ("timescaledb.key", "ssl_key_file")]:
        _mounted_from_tls_dir(db, f"/etc/aima/tls/{name}", name)
        copied = settings[setting].rsplit("/", 1)[1]
        assert f'cp "$src/{name}" "$dst/{copied}"' in script
        assert settings[setting] == f"/var/lib/postgresql/tls/{copied}"
    assert "exec docker-entrypoint.sh" in script
    assert "pg_isready" in " ".join(db["healthcheck"]["test"]), "the base healthcheck stays"


def test_tls_api_serves_https(tls_services: dict[str, dict[str, Any]]) -> None:
    api = tls_services["api"]
    env = _environment(api)
    _mounted_from_tls_dir(api, env["AIMA_API_TLS_CERT"], "api.crt")
    _mounted_from_tls_dir(api, env["AIMA_API_TLS_KEY"], "api.key")
    assert (8000, 8000) in _ports(api)


def test_tls_grafana_datasource_is_verify_full(tls_services: dict[str, dict[str, Any]]) -> None:
    """The overlay mounts a TLS variant of the TimescaleDB datasource over the plain one (whose database
    speaks no TLS, so it stays at sslmode=disable); apart from TLS the two are the same datasource."""
    grafana = tls_services["grafana"]
    mounts = _mounts(grafana)
    variant = Path(mounts["/etc/grafana/provisioning/datasources/postgres.yml"])
    assert variant == GRAFANA / "tls" / "postgres.yml"
    assert mounts["/etc/grafana/provisioning"] == str(GRAFANA / "provisioning")
    (tls_ds,) = _load_yaml(variant)["datasources"]
    (plain_ds,) = [d for d in _load_yaml(DATASOURCE_FILE)["datasources"] if d.get("uid") == DATASOURCE_UID]
    tls_json = tls_ds["jsonData"]
    assert tls_json["sslmode"] == "verify-full"
    assert tls_json["tlsConfigurationMethod"] == "file-path"
    _mounted_from_tls_dir(grafana, tls_json["sslRootCertFile"], "ca.pem")
    tls_only = {"sslmode", "tlsConfigurationMethod", "sslRootCertFile"}
    assert {k: v for k, v in tls_json.items() if k not in tls_only} == {
        k: v for k, v in plain_ds["jsonData"].items() if k not in tls_only
    }
    assert {k: v for k, v in tls_ds.items() if k != "jsonData"} == {
        k: v for k, v in plain_ds.items() if k != "jsonData"
    }


def _sans(pem: bytes) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in names.get_values_for_type(x509.DNSName)} | {
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    }


def _handshake(cert_chain: Path, key: Path, ca: Path, server_name: str) -> str:
    """A verifying client (host name checked, as verify-full and both Kafka clients do) against a server
    with ``cert_chain``/``key``, over a local socket pair; returns the negotiated protocol."""
    import socket
    import ssl
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_chain, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as error:
            errors.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=server_name) as tls:
            version = str(tls.version())
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
    assert not errors, errors
    return version


def test_make_certs_issues_what_the_overlay_mounts(
    example_certs: Path, tls_services: dict[str, dict[str, Any]]
) -> None:
    """Every ./tls file the merged config mounts is one the script makes, and each server's certificate
    verifies against ca.pem for the host name its clients use (the compose service, and localhost)."""
    wanted = {
        Path(source).name
        for service in tls_services.values()
        for source in _mounts(service).values()
        if Path(source).parent == TLS_DIR
    }
    assert wanted == {"ca.pem", "kafka.pem", "timescaledb.crt", "timescaledb.key", "api.crt", "api.key"}
    for name in wanted:
        path = example_certs / name
        assert path.is_file(), f"make-certs.sh does not make {name}"
        assert path.stat().st_mode & 0o444 == 0o444, f"{name} must be readable by the containers' users"
    assert (example_certs / "ca.key").stat().st_mode & 0o077 == 0, "the CA key is private"
    assert example_certs.stat().st_mode & 0o077 == 0, "the folder is only the user's"
    ca = example_certs / "ca.pem"
    # Kafka's PEM keystore: the unencrypted PKCS#8 key, then the chain.
    keystore = (example_certs / "kafka.pem").read_text()
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----")
    key_end = keystore.index("-----END PRIVATE KEY-----") + len("-----END PRIVATE KEY-----\n")
    kafka_dir = example_certs.parent / "kafka-split"
    kafka_dir.mkdir(exist_ok=True)
    (kafka_dir / "key.pem").write_text(keystore[:key_end])
    (kafka_dir / "chain.pem").write_text(keystore[key_end:])
    pairs = {
        "kafka": (kafka_dir / "chain.pem", kafka_dir / "key.pem"),
        "timescaledb": (example_certs / "timescaledb.crt", example_certs / "timescaledb.key"),
        "api": (example_certs / "api.crt", example_certs / "api.key"),
    }
    for host, (chain, key) in pairs.items():
        assert {host, "localhost", "127.0.0.1"} <= _sans(chain.read_bytes()), host
        assert _handshake(chain, key, ca, host).startswith("TLS"), host
        assert _handshake(chain, key, ca, "localhost").startswith("TLS"), host
    # The hosts the merged config's clients name are the ones the certificates carry.
    env = _environment(tls_services["sink"])
    assert env["AIMA_KAFKA_BOOTSTRAP"].split(":")[0] in _sans((kafka_dir / "chain.pem").read_bytes())
    db_host = urlsplit(env["AIMA_DATABASE_URL"]).hostname
    assert db_host in _sans((example_certs / "timescaledb.crt").read_bytes())


def test_make_certs_reuses_its_ca(example_certs: Path) -> None:
    """Reissuing (e.g. on expiry) keeps ca.pem, so clients need no new trust anchor."""
    before = (example_certs / "ca.pem").read_bytes()
    result = subprocess.run(
        ["sh", str(MAKE_CERTS), str(example_certs)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (example_certs / "ca.pem").read_bytes() == before
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(example_certs / "ca.pem"), str(example_certs / "api.crt")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
