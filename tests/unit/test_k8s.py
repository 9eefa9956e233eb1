"""Kubernetes pod status against a real local HTTP server that answers like the Kubernetes API."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bus.codec import Codec
from bus.validation import check
from producers.k8s import K8sApiError, K8sConfig, PodReader
from producers.k8s_usage import parse_quantity
from producers.settings import CollectorSettings

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
TOKEN = "eyJhbGciOiJSUzI1NiJ9.fake-service-account-token"


def _pod(namespace: str, name: str, node: str | None, phase: str, ready: str, restarts: list[int]) -> dict:
    """A Pod as `GET /api/v1/pods` returns it (trimmed of fields the reader ignores, but not all)."""
    conditions = [
        {
            "type": "PodScheduled",
            "status": "True" if node else "False",
            "lastTransitionTime": "2025-03-14T09:00:00Z",
        }
    ]
    if node:
        conditions += [
            {"type": "Initialized", "status": "True", "lastTransitionTime": "2025-03-14T09:00:01Z"},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": "2025-03-14T09:00:05Z"},
            {"type": "Ready", "status": ready, "lastTransitionTime": "2025-03-14T09:00:05Z"},
        ]
    status: dict[str, Any] = {"phase": phase, "conditions": conditions, "qosClass": "Burstable"}
    if node:
        status["hostIP"] = "10.0.0.7"
        status["podIP"] = "10.244.1.17"
        status["startTime"] = "2025-03-14T09:00:00Z"
        status["containerStatuses"] = [
            {
                "name": f"c{i}",
                "image": "registry.example/aima/worker:1.4.2",
                "imageID": "registry.example/aima/worker@sha256:0f3a",
                "containerID": f"containerd://{i:064x}",
                "ready": ready == "True",
                "restartCount": count,
                "started": True,
                "state": {"running": {"startedAt": "2025-03-14T09:00:04Z"}},
            }
            for i, count in enumerate(restarts)
        ]
        # Init containers' restarts are not the pod's (as in the requirement).
        status["initContainerStatuses"] = [{"name": "init", "restartCount": 9, "ready": True}]
    spec: dict[str, Any] = {"containers": [{"name": f"c{i}"} for i in range(len(restarts))]}
    if node:
        spec["nodeName"] = node
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "resourceVersion": "48213",
            "creationTimestamp": "2025-03-14T08:59:58Z",
            "labels": {"app": name.rsplit("-", 2)[0]},
        },
        "spec": spec,
        "status": status,
    }


PODS = [
    _pod("media", "worker-7d9f8b6c4d-x2k9p", "gpu-node-07", "Running", "True", [1, 2]),
    _pod("media", "worker-7d9f8b6c4d-pq8zt", None, "Pending", "False", []),
    _pod("kube-system", "coredns-5d78c9869d-7kq2m", "gpu-node-01", "Running", "False", [5]),
    _pod("batch", "transcode-28431-abcde", "gpu-node-07", "Failed", "False", [0]),
]
EXPECTED = [
    {"namespace": "media", "pod": "worker-7d9f8b6c4d-x2k9p", "host": "gpu-node-07", "phase": "Running",
     "ready": True, "restarts": 3, "cpu_usage_cores": None, "memory_usage_bytes": None},
    {"namespace": "media", "pod": "worker-7d9f8b6c4d-pq8zt", "host": None, "phase": "Pending",
     "ready": False, "restarts": 0, "cpu_usage_cores": None, "memory_usage_bytes": None},
    {"namespace": "kube-system", "pod": "coredns-5d78c9869d-7kq2m", "host": "gpu-node-01", "phase": "Running",
     "ready": False, "restarts": 5, "cpu_usage_cores": None, "memory_usage_bytes": None},
    {"namespace": "batch", "pod": "transcode-28431-abcde", "host": "gpu-node-07", "phase": "Failed",
     "ready": False, "restarts": 0, "cpu_usage_cores": None, "memory_usage_bytes": None},
]  # fmt: skip
"""Without a Metrics Server (the fake's default: 404 on metrics.k8s.io) the usage is null."""


def _pod_metrics(namespace: str, name: str, containers: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A PodMetrics as `GET /apis/metrics.k8s.io/v1beta1/pods` returns it (metrics-server 0.7)."""
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": "2025-03-14T09:26:50Z",
            "labels": {"app": name.rsplit("-", 2)[0]},
        },
        "timestamp": "2025-03-14T09:26:40Z",
        "window": "15.012s",
        "containers": [
            {"name": container, "usage": {"cpu": cpu, "memory": memory}}
            for container, (cpu, memory) in containers.items()
        ],
    }


POD_METRICS = [
    # Two containers: 250m + 1200n cores, 512Mi + 1048576Ki bytes.
    _pod_metrics("media", "worker-7d9f8b6c4d-x2k9p", {"c0": ("250m", "512Mi"), "c1": ("1200n", "1048576Ki")}),
    _pod_metrics("kube-system", "coredns-5d78c9869d-7kq2m", {"c0": ("3123456n", "18444Ki")}),
    # Finished and pending pods are not reported by the Metrics Server; a pod just started has no
    # containers measured yet.
    _pod_metrics("batch", "transcode-28431-abcde", {}),
    # Reported, but not in the pod list (gone since): ignored.
    _pod_metrics("media", "worker-7d9f8b6c4d-gone1", {"c0": ("1", "1Gi")}),
]  # fmt: skip
USAGE = {
    "worker-7d9f8b6c4d-x2k9p": (0.2500012, 512 * 2**20 + 2**30),
    "coredns-5d78c9869d-7kq2m": (0.003123456, 18444 * 1024),
}


class FakeKubernetes:
    """Serves pods at /api/v1/pods and /api/v1/namespaces/<ns>/pods, with the API's paging (limit,
    continue) and the spec.nodeName field selector; records every request."""

    def __init__(
        self, pods: list[dict[str, Any]] = PODS, pod_metrics: list[dict[str, Any]] | None = None
    ) -> None:
        self.pods = copy.deepcopy(pods)
        self.pod_metrics = copy.deepcopy(pod_metrics)
        """PodMetrics served at metrics.k8s.io/v1beta1; None: no Metrics Server (404 there)."""
        self.metrics_fail_with: int | None = None
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.fail_with: int | None = None
        self.raw_body: bytes | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKubernetes:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _metrics_answer(self, parts: list[str]) -> tuple[int, dict[str, Any]]:
        if self.pod_metrics is None:  # the API server's answer for an API group nobody serves
            return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
        if self.metrics_fail_with is not None:
            return self.metrics_fail_with, {
                "kind": "Status",
                "status": "Failure",
                "code": self.metrics_fail_with,
            }
        items = self.pod_metrics
        if len(parts) == 6:  # namespaces/<ns>/pods
            items = [i for i in items if i["metadata"]["namespace"] == parts[4]]
        return 200, {
            "kind": "PodMetricsList",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {},
            "items": items,
        }

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if (
            parts[:3] == ["apis", "metrics.k8s.io", "v1beta1"]
            and parts[-1] == "pods"
            and len(parts) in (4, 6)
        ):
            return self._metrics_answer(parts)
        if parts == ["api", "v1", "pods"]:
            pods = self.pods
        elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            pods = [p for p in self.pods if p["metadata"]["namespace"] == parts[3]]
        else:
            return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
        for selector in query.get("fieldSelector", []):
            field, _, value = selector.partition("=")
            if field == "spec.nodeName":
                pods = [p for p in pods if p["spec"].get("nodeName") == value]
        start = int(query.get("continue", ["0"])[0])
        limit = int(query.get("limit", [str(len(pods) or 1)])[0])
        page, rest = pods[start : start + limit], pods[start + limit :]
        metadata = {"resourceVersion": "48300"}
        if rest:
            metadata["continue"] = str(start + limit)
            metadata["remainingItemCount"] = len(rest)  # type: ignore[assignment]
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": page}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                fake.requests.append((url.path, query, dict(self.headers)))
                if fake.fail_with is not None:
                    status, body = fake.fail_with, b'{"kind":"Status","status":"Failure","code":500}'
                elif fake.raw_body is not None:
                    status, body = 200, fake.raw_body
                else:
                    status, answer = fake._answer(url.path, query)
                    body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes().start()
    yield server
    server.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # the kubelet's files end without one, but editors add it
    return path


def _reader(kube: FakeKubernetes, **config: Any) -> PodReader:
    return PodReader(K8sConfig(api_url=kube.url, **config), now=lambda: T0)


def _without_time_and_source(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in pod.items() if k not in ("time", "source")} for pod in pods]


def test_all_namespaces_become_pod_statuses_with_the_bearer_token(
    kube: FakeKubernetes, token_file: Path
) -> None:
    reader = _reader(kube, token_file=token_file)
    pods = reader.read()
    assert _without_time_and_source(pods) == EXPECTED
    assert {pod["time"] for pod in pods} == {T0}
    assert {pod["source"] for pod in pods} == {"kubernetes"}
    path, query, headers = kube.requests[0]
    assert path == "/api/v1/pods"
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert query["limit"] == ["500"]
    assert reader.errors == 0


def test_a_namespace_reads_only_its_pods(kube: FakeKubernetes) -> None:
    pods = _reader(kube, namespace="media", token="t0k3n").read()
    assert kube.requests[0][0] == "/api/v1/namespaces/media/pods"
    assert kube.requests[0][2]["Authorization"] == "Bearer t0k3n"
    assert [pod["pod"] for pod in pods] == ["worker-7d9f8b6c4d-x2k9p", "worker-7d9f8b6c4d-pq8zt"]


def test_a_node_reads_only_the_pods_scheduled_on_it(kube: FakeKubernetes) -> None:
    pods = _reader(kube, node_name="gpu-node-07").read()
    assert kube.requests[0][1]["fieldSelector"] == ["spec.nodeName=gpu-node-07"]
    assert {pod["host"] for pod in pods} == {"gpu-node-07"}
    assert len(pods) == 2


def test_pages_are_followed_with_continue(kube: FakeKubernetes) -> None:
    pods = _reader(kube, page_size=3).read()
    assert _without_time_and_source(pods) == EXPECTED
    pod_lists = [query for path, query, _ in kube.requests if path == "/api/v1/pods"]
    assert [query.get("continue") for query in pod_lists] == [None, ["3"]]


def test_no_token_sends_no_authorization(kube: FakeKubernetes) -> None:
    _reader(kube).read()
    assert "Authorization" not in kube.requests[0][2]


def test_a_rotated_token_is_read_again(kube: FakeKubernetes, token_file: Path) -> None:
    reader = _reader(kube, token_file=token_file)
    reader.read()
    token_file.write_text("rotated")
    reader.read()
    # Each read: the pod list, then the Metrics Server, both with the token of the moment.
    sent = [headers["Authorization"] for _, _, headers in kube.requests]
    assert sent == [f"Bearer {TOKEN}"] * 2 + ["Bearer rotated"] * 2


def test_a_500_is_counted_and_gives_no_pods(kube: FakeKubernetes) -> None:
    kube.fail_with = 500
    reader = _reader(kube)
    assert reader.read() == []
    assert reader.errors == 1
    with pytest.raises(K8sApiError) as raised:
        reader.fetch()
    assert raised.value.status == 500
    # The reader keeps working once the API answers again.
    kube.fail_with = None
    assert len(reader.read()) == len(PODS)
    assert reader.errors == 1


def test_an_answer_that_is_no_pod_list_is_an_error(kube: FakeKubernetes) -> None:
    kube.raw_body = b"<html>proxy error</html>"
    reader = _reader(kube)
    assert reader.read() == []
    assert reader.errors == 1


def test_an_unreachable_api_is_an_error(kube: FakeKubernetes) -> None:
    url = kube.url
    kube.stop()
    reader = PodReader(K8sConfig(api_url=url, timeout_s=2))
    assert reader.read() == []
    assert reader.errors == 1


def test_a_malformed_pod_is_skipped_and_counted(kube: FakeKubernetes) -> None:
    del kube.pods[1]["metadata"]["name"]
    reader = _reader(kube)
    assert [pod["pod"] for pod in reader.read()] == [
        e["pod"] for e in EXPECTED if e["pod"] != EXPECTED[1]["pod"]
    ]
    assert reader.errors == 1


def test_pod_statuses_fit_the_contract(kube: FakeKubernetes) -> None:
    codec = Codec()
    for pod in _reader(kube).read():
        check("PodStatus", pod)
        name, decoded = codec.decode(codec.encode("PodStatus", pod))
        assert name == "aima.metrics.PodStatus"
        assert decoded == pod


# -- configuration ---------------------------------------------------------------------------------------


def test_explicit_configuration_from_env(tmp_path: Path, token_file: Path) -> None:
    config = K8sConfig.from_settings(
        CollectorSettings.from_environ({
            "AIMA_K8S_API_URL": "https://k8s.example:6443/",
            "AIMA_K8S_TOKEN_FILE": str(token_file),
            "AIMA_K8S_NAMESPACE": "media",
            "AIMA_K8S_NODE_NAME": "gpu-node-07",
            "AIMA_K8S_VERIFY": "false",
            # The explicit URL wins over in-cluster detection.
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
        }),
        serviceaccount_dir=tmp_path,
    )  # fmt: skip
    assert config == K8sConfig(
        api_url="https://k8s.example:6443",
        token_file=token_file,
        namespace="media",
        node_name="gpu-node-07",
        verify=False,
    )
    given = {"AIMA_K8S_API_URL": "https://x", "AIMA_K8S_VERIFY": "/etc/ca.pem"}
    assert K8sConfig.from_settings(CollectorSettings.from_environ(given)).verify == Path("/etc/ca.pem")


def test_in_cluster_configuration_from_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    config = K8sConfig.from_settings(CollectorSettings.from_environ(env), serviceaccount_dir=tmp_path)
    assert config is not None
    assert config.api_url == "https://10.96.0.1:443"
    assert config.bearer_token() == "sa-token"
    assert config.verify == tmp_path / "ca.crt"
    assert config.namespace is None
    ipv6 = K8sConfig.from_settings(
        CollectorSettings.from_environ({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}),
        serviceaccount_dir=tmp_path,
    )
    assert ipv6 is not None and ipv6.api_url == "https://[fd00::1]:443"


def test_no_configuration_outside_a_cluster(tmp_path: Path) -> None:
    assert K8sConfig.from_settings(CollectorSettings.from_environ({}), serviceaccount_dir=tmp_path) is None
    # Service variables without a mounted token are not a cluster we can read.
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert K8sConfig.from_settings(CollectorSettings.from_environ(env), serviceaccount_dir=tmp_path) is None


def test_the_token_is_not_in_the_repr() -> None:
    assert "s3cret" not in repr(K8sConfig(api_url="https://x", token="s3cret"))


# -- Metrics Server (metrics.k8s.io) ---------------------------------------------------------------------


def test_quantities_are_read_as_kubernetes_writes_them() -> None:
    assert parse_quantity("250m") == Decimal("0.25")
    assert parse_quantity("1200n") == Decimal("0.0000012")
    assert parse_quantity("15u") == Decimal("0.000015")
    assert parse_quantity("2") == 2
    assert parse_quantity("1.5") == Decimal("1.5")
    assert parse_quantity("512Mi") == 512 * 2**20
    assert parse_quantity("1048576Ki") == 2**30
    assert parse_quantity("3Gi") == 3 * 2**30
    assert parse_quantity("1G") == 10**9
    assert parse_quantity("129e6") == 129 * 10**6
    assert parse_quantity("1k") == 1000
    for bad in ("", "Mi", "12 Mi", "1.2.3", "5x"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


def test_usage_from_the_metrics_server_lands_beside_each_pods_status() -> None:
    kube = FakeKubernetes(pod_metrics=POD_METRICS).start()
    try:
        reader = _reader(kube, token=TOKEN)
        pods = {pod["pod"]: pod for pod in reader.read()}
        assert set(pods) == {e["pod"] for e in EXPECTED}  # the gone pod's usage makes no record
        for name, pod in pods.items():
            cpu, memory = USAGE.get(name, (None, None))
            assert pod["cpu_usage_cores"] == (pytest.approx(cpu) if cpu is not None else None), name
            assert pod["memory_usage_bytes"] == memory, name
            check("PodStatus", pod)
        metrics_requests = [r for r in kube.requests if r[0].startswith("/apis/metrics.k8s.io/")]
        assert [r[0] for r in metrics_requests] == ["/apis/metrics.k8s.io/v1beta1/pods"]
        assert metrics_requests[0][2]["Authorization"] == f"Bearer {TOKEN}"
        assert reader.errors == reader.usage_errors == 0

        # One namespace: its pods' metrics only.
        _reader(kube, namespace="media").read()
        assert kube.requests[-1][0] == "/apis/metrics.k8s.io/v1beta1/namespaces/media/pods"
    finally:
        kube.stop()


def test_a_metrics_server_that_fails_leaves_the_usage_null_and_is_counted(kube: FakeKubernetes) -> None:
    reader = _reader(kube)  # this fake has no Metrics Server: 404
    assert _without_time_and_source(reader.read()) == EXPECTED
    assert reader.usage_errors == 1 and reader.errors == 0
    kube.pod_metrics = copy.deepcopy(POD_METRICS)
    kube.metrics_fail_with = 503  # installed, not ready
    assert _without_time_and_source(reader.read()) == EXPECTED
    assert reader.usage_errors == 2
    kube.metrics_fail_with = None  # ready: the usage comes back
    assert {p["pod"]: p["memory_usage_bytes"] for p in reader.read() if p["memory_usage_bytes"]} == {
        name: memory for name, (_, memory) in USAGE.items()
    }
    assert reader.usage_errors == 2
    # An entry with a quantity that is none is left out; the others' usage stays.
    kube.pod_metrics[0]["containers"][0]["usage"]["cpu"] = "lots"
    pods = {p["pod"]: p for p in reader.read()}
    assert pods["worker-7d9f8b6c4d-x2k9p"]["cpu_usage_cores"] is None
    assert pods["coredns-5d78c9869d-7kq2m"]["memory_usage_bytes"] == USAGE["coredns-5d78c9869d-7kq2m"][1]
    # Off by configuration: the Metrics Server is not asked.
    asked = len(kube.requests)
    _reader(kube, usage=False).read()
    assert not [r for r in kube.requests[asked:] if r[0].startswith("/apis/")]
