"""The Kubernetes manifests (infra/k8s), rendered by the real kustomize (infra/k8s/kustomize.sh builds it
from the Go module proxy into .aima/bin; CI builds it before the tests) and validated against a pinned
Kubernetes schema (kubernetes-validate's bundled JSON schemas, strict: an unknown field fails). What the
manifests name must exist in the code: the image is compose's, each container's arguments are a command of
the `aima-metrics` CLI, each variable is a documented setting (or one a mounted routing file names), each
port is the value of the setting that opens it, and each file path a setting points at is a key of the
ConfigMap mounted there. Nothing here needs a network once kustomize is built."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from aima_metrics.cli import _register_pipeline_commands, cli
from aima_metrics.settings_doc import documented

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "infra" / "k8s"
SCRIPT = K8S / "kustomize.sh"
BASE, OVERLAY = K8S / "base", K8S / "overlays" / "example"
KUBERNETES_VERSION = "1.33.0"
"""The schema the objects must satisfy: a release every maintained managed Kubernetes offers."""
SECRET = "aima-secrets"
SECRET_KEYS = {"database-url", "api-token-pepper", "slack-url"}
"""The keys of the Secret the user creates (README, "Kubernetes"; base/kustomization.yaml)."""

# Set by the NVIDIA container runtime's hook, not by our settings: which GPUs and driver parts it mounts.
RUNTIME_VARIABLES = {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
# Which setting opens which named container port, and its default when no variable sets it.
PORT_SETTINGS = {
    "metrics": "AIMA_METRICS_PORT",
    "exporter": "AIMA_GPU_EXPORTER_PORT",
    "http": "AIMA_API_PORT",
}

VALIDATED = {
    ("Namespace", "aima"),
    ("ServiceAccount", "aima"),
    ("ServiceAccount", "aima-collector"),
    ("ClusterRole", "aima-pod-reader"),
    ("ClusterRoleBinding", "aima-pod-reader"),
    ("ConfigMap", "aima-env"),
    ("ConfigMap", "aima-rules"),
    ("ConfigMap", "aima-prices"),
    ("ConfigMap", "aima-routing"),
    ("Job", "aima-migrate"),
    ("Job", "aima-topics"),
    ("DaemonSet", "aima-gpu-collector"),
    ("DaemonSet", "aima-system-collector"),
    ("Service", "gpu-exporter"),
    ("Deployment", "aima-stream"),
    ("Deployment", "aima-sink"),
    ("Deployment", "aima-notify"),
    ("Deployment", "aima-api"),
    ("Service", "aima-api"),
    ("PodDisruptionBudget", "aima-stream"),
    ("PodDisruptionBudget", "aima-sink"),
    ("PodDisruptionBudget", "aima-notify"),
    ("PodDisruptionBudget", "aima-api"),
}
"""What the example overlay renders (the base: the same without the Namespace)."""


@cache
def _kustomize() -> Path:
    built = subprocess.run([SCRIPT, "install"], capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, f"kustomize did not build:\n{built.stderr[-3000:]}"
    return Path(subprocess.run([SCRIPT, "path"], capture_output=True, text=True, check=True).stdout.strip())


@cache
def _render(folder: Path) -> tuple[dict[str, Any], ...]:
    _kustomize()
    out = subprocess.run([SCRIPT, "build", folder], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def _generated_name(name: str) -> str:
    """A generated ConfigMap's name without kustomize's content hash."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def _by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {_generated_name(d["metadata"]["name"]): d for d in docs if d["kind"] == kind}


def _workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod template spec) of every object that runs pods."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def _containers(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc, pod in _workloads(docs):
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield doc, container


def _environment(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str | None]:
    """What the container's environment holds: the envFrom ConfigMaps' keys, then its own env (which wins,
    as in Kubernetes); a value from a Secret or the downward API is None."""
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def _routing_variables(docs: tuple[dict[str, Any], ...]) -> set[str]:
    """The variables the mounted routing files name (`url_env`, `hmac_key_env`, ...)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for text in _by_kind(docs, "ConfigMap")["aima-routing"]["data"].values():
        walk(yaml.safe_load(text))
    return found


@pytest.fixture(scope="module", params=[BASE, OVERLAY], ids=["base", "overlay"])
def docs(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return _render(request.param)


def test_every_object_validates_against_the_pinned_schema(docs: tuple[dict[str, Any], ...]) -> None:
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    rendered = {(d["kind"], _generated_name(d["metadata"]["name"])) for d in docs}
    assert rendered | {("Namespace", "aima")} == VALIDATED  # the base leaves the namespace to overlays


def test_the_overlay_sets_namespace_image_broker_and_workers() -> None:
    docs = _render(OVERLAY)
    assert {
        d["metadata"].get("namespace")
        for d in docs
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
    } == {"aima"}
    binding = _by_kind(docs, "ClusterRoleBinding")["aima-pod-reader"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "aima-collector", "namespace": "aima"}]
    assert {c["image"] for _, c in _containers(docs)} == {"registry.example.com/aima/aima-metrics:0.1.0"}
    assert (
        _by_kind(docs, "ConfigMap")["aima-env"]["data"]["AIMA_KAFKA_BOOTSTRAP"]
        == "kafka-bootstrap.kafka.svc:9092"
    )
    assert _by_kind(docs, "Deployment")["aima-stream"]["spec"]["replicas"] == 3


def test_the_image_is_the_one_compose_builds_from_the_dockerfile() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose_images = {s["image"] for s in compose["services"].values() if s.get("build")}
    assert compose_images == {"aima-metrics:local"}
    assert 'ENTRYPOINT ["aima-metrics"]' in (REPO / "Dockerfile").read_text()
    images = {c["image"] for _, c in _containers(_render(BASE))}
    assert images == compose_images
    # No container replaces the entrypoint: its args are the CLI's.
    assert not [c["name"] for _, c in _containers(_render(BASE)) if "command" in c]


def test_every_container_runs_a_command_of_the_cli(docs: tuple[dict[str, Any], ...]) -> None:
    _register_pipeline_commands()  # what the entry point adds before it runs the group
    seen = set()
    for doc, container in _containers(docs):
        args = list(container["args"])
        command: click.Command = cli
        ctx = click.Context(cli, info_name="aima-metrics")
        while isinstance(command, click.Group):
            assert args, f"{doc['metadata']['name']}: a command group without its subcommand"
            name = args.pop(0)
            assert name in command.commands, f"{doc['metadata']['name']}: no command {name!r}"
            command = command.commands[name]
            ctx = click.Context(command, parent=ctx, info_name=name)
        command.parse_args(ctx, args)  # raises on an option or argument the command does not take
        seen.add(" ".join(container["args"]))
    assert seen == {
        "collect gpu",
        "collect system",
        "stream",
        "sink",
        "notify",
        "api",
        "db migrate",
        "topics --create",
    }


def test_every_variable_is_a_documented_setting(docs: tuple[dict[str, Any], ...]) -> None:
    settings = {name for _, name, _, _ in documented()}
    routing = _routing_variables(docs)
    assert routing >= {"AIMA_SLACK_URL", "AIMA_LOCAL_WEBHOOK_URL", "AIMA_WEBHOOK_KEY"}
    for doc, container in _containers(docs):
        for name in _environment(docs, container):
            assert name in settings | RUNTIME_VARIABLES | routing, (
                f"{doc['metadata']['name']}/{container['name']}: {name} is no setting of the code "
                "(aima_metrics/settings_doc.py) nor a variable a mounted routing file names"
            )


def test_secrets_are_referenced_never_inlined(docs: tuple[dict[str, Any], ...]) -> None:
    assert not [d for d in docs if d["kind"] == "Secret"]
    referenced = set()
    for doc, container in _containers(docs):
        for item in container.get("env", []):
            source = item.get("valueFrom", {})
            if "secretKeyRef" in source:
                assert source["secretKeyRef"]["name"] == SECRET
                referenced.add(source["secretKeyRef"]["key"])
            elif "value" in item:
                assert not re.search(
                    r"PASSWORD|SECRET|PEPPER|TOKEN|_KEY$|DATABASE_URL|SLACK_URL", item["name"]
                ), f"{doc['metadata']['name']}: {item['name']} must come from the Secret"
    for data in (d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"):
        assert "AIMA_DATABASE_URL" not in data
    assert referenced == SECRET_KEYS
    # The user is told how to create it, with every key.
    for text in ((BASE / "kustomization.yaml").read_text(), (REPO / "README.md").read_text()):
        assert f"create secret generic {SECRET}" in text
        assert all(f"--from-literal={key}=" in text for key in SECRET_KEYS)


def test_ports_probes_and_scrape_annotations_match_the_settings(docs: tuple[dict[str, Any], ...]) -> None:
    defaults = {name: default for _, name, default, _ in documented()}
    for doc, pod in _workloads(docs):
        template = doc["spec"]["template"]
        name = doc["metadata"]["name"]
        for container in pod["containers"]:
            env = _environment(docs, container)
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for port_name, number in ports.items():
                variable = PORT_SETTINGS[port_name]
                assert int(env.get(variable) or defaults[variable]) == number, f"{name}: {port_name} port"
            if doc["kind"] == "Job":
                continue
            assert "metrics" in ports, f"{name}: no metrics port"
            for probe in ("livenessProbe", "readinessProbe"):
                http = container[probe]["httpGet"]
                assert http["port"] in ports, f"{name}: {probe} on a port it does not declare"
                assert http["path"] in ("/healthz", "/readyz"), f"{name}: {probe}"
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert int(annotations["prometheus.io/port"]) == ports["metrics"]
            assert annotations["prometheus.io/path"] == "/metrics"
            resources = container["resources"]
            assert set(resources) == {"requests", "limits"} and "memory" in resources["limits"]
        # prometheus.k8s.yml's aima_services job keeps pods labelled app=aima-* and copies `component`.
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert re.fullmatch("aima-.*", labels["app"]) and labels["component"]
    # Each Service and PodDisruptionBudget selects pods, and a Service's target ports are theirs.
    pods = {doc["metadata"]["name"]: doc["spec"]["template"] for doc, _ in _workloads(docs)}
    for kind in ("Service", "PodDisruptionBudget"):
        for doc in _by_kind(docs, kind).values():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            chosen = [t for t in pods.values() if selector.items() <= t["metadata"]["labels"].items()]
            assert chosen, f"{kind}/{doc['metadata']['name']} selects nothing"
            for port in doc["spec"].get("ports", []):
                names = {
                    p["name"] for t in chosen for c in t["spec"]["containers"] for p in c.get("ports", [])
                }
                assert port["targetPort"] in names
    exporter = _by_kind(docs, "Service")["gpu-exporter"]  # the seed's gpu_metrics target
    assert {"name": "exporter", "port": 9400, "targetPort": "exporter"} in exporter["spec"]["ports"]


def test_config_maps_carry_the_shipped_files_where_the_settings_point(
    docs: tuple[dict[str, Any], ...],
) -> None:
    maps = _by_kind(docs, "ConfigMap")
    shipped = {
        ("aima-rules", "default_rules.yaml"): REPO / "streams" / "alerts" / "default_rules.yaml",
        ("aima-prices", "prices.yaml"): REPO / "streams" / "costs" / "prices.yaml",
        **{("aima-routing", p.name): p for p in sorted((REPO / "infra" / "notify").glob("*.yaml"))},
    }
    for (name, key), path in shipped.items():
        assert maps[name]["data"][key] == path.read_text(), f"{name}/{key} differs from {path}"
    assert set(maps["aima-routing"]["data"]) == {k for n, k in shipped if n == "aima-routing"}
    # A variable that names a file names a key of a ConfigMap mounted at that folder.
    file_settings = {"AIMA_ALERT_RULES", "AIMA_PRICES_FILE", "AIMA_NOTIFY_CONFIG"}
    found = set()
    for doc, pod in _workloads(docs):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            env = _environment(docs, container)
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for variable in file_settings & set(env):
                path = Path(str(env[variable]))
                volume = mounts.get(str(path.parent))
                assert volume and "configMap" in volume, (
                    f"{doc['metadata']['name']}: {variable}={path} not mounted"
                )
                assert path.name in maps[_generated_name(volume["configMap"]["name"])]["data"]
                found.add(variable)
    assert found == file_settings
