"""Kubernetes pod status (M21): lists pods from the Kubernetes API and turns each into a PodStatus record
(phase, readiness, restarts), with the pod's CPU and memory from the Metrics Server beside it
(producers/k8s_usage.py; null where it reports none). Configured in-cluster from the service account, or
explicitly; an API error is logged and counted and yields no records, so the collector that calls this keeps
running; a Metrics Server that does not answer (none installed) only leaves the usage null."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from producers.k8s_usage import PodUsage, UsageApiError, pod_usages

if TYPE_CHECKING:
    from producers.settings import CollectorSettings

__all__ = ["SERVICEACCOUNT_DIR", "K8sApiError", "K8sConfig", "PodReader", "pod_status"]

log = logging.getLogger(__name__)

SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SOURCE = "kubernetes"


class K8sApiError(RuntimeError):
    """The pod list could not be read: no answer, an error status or an answer that is not a PodList."""

    def __init__(self, reason: str, *, url: str, status: int | None = None) -> None:
        super().__init__(f"{reason} ({url})")
        self.reason = reason
        self.url = url
        self.status = status


@dataclass(frozen=True)
class K8sConfig:
    api_url: str
    """e.g. ``https://10.96.0.1:443``."""
    token: str | None = field(default=None, repr=False)
    """A bearer token given directly; ``token_file`` is preferred because tokens rotate."""
    token_file: Path | None = None
    """Re-read on every request: projected service-account tokens are rotated by the kubelet."""
    namespace: str | None = None
    """Only this namespace's pods; None lists all namespaces."""
    node_name: str | None = None
    """Only pods scheduled on this node (a collector per node, as a DaemonSet, reports its own pods)."""
    verify: bool | Path = True
    """TLS verification: True (system CAs), False, or the CA bundle to trust (in-cluster: ca.crt)."""
    timeout_s: float = 10.0
    page_size: int = 500
    """Pods per API page (``limit``), so a large cluster is not answered in one huge response."""
    usage: bool = True
    """Also read each pod's CPU and memory from the Metrics Server (metrics.k8s.io)."""

    @classmethod
    def from_settings(
        cls, settings: CollectorSettings, serviceaccount_dir: Path = SERVICEACCOUNT_DIR
    ) -> K8sConfig | None:
        """AIMA_K8S_API_URL (with AIMA_K8S_TOKEN_FILE, AIMA_K8S_VERIFY: true, false or a CA file) wins;
        else in-cluster (KUBERNETES_SERVICE_HOST/PORT and the service-account token); else None.
        AIMA_K8S_NAMESPACE and AIMA_K8S_NODE_NAME narrow the pods in both cases."""
        namespace, node_name = settings.k8s_namespace, settings.k8s_node_name
        if url := settings.k8s_api_url:
            return cls(
                api_url=url.rstrip("/"),
                token_file=settings.k8s_token_file,
                namespace=namespace,
                node_name=node_name,
                verify=_parse_verify(settings.k8s_verify),
            )
        host, port = settings.kubernetes_service_host, settings.kubernetes_service_port
        token_file = serviceaccount_dir / "token"
        if host and port and token_file.is_file():
            ca = serviceaccount_dir / "ca.crt"
            return cls(
                api_url=f"https://{f'[{host}]' if ':' in host else host}:{port}",
                token_file=token_file,
                namespace=namespace,
                node_name=node_name,
                verify=ca if ca.is_file() else True,
            )
        return None

    def bearer_token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token


def _parse_verify(text: str) -> bool | Path:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    return Path(text)


class PodReader:
    """Reads every pod the configuration selects. ``client`` may be injected (tests, shared pools)."""

    def __init__(
        self,
        config: K8sConfig,
        *,
        client: httpx.Client | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self._client = client or _client_for(config)
        self._owns_client = client is None
        self._now = now
        self.errors = 0
        """API errors and malformed pods so far; callers turn increases into their own metrics."""
        self.usage_errors = 0
        """Reads of the Metrics Server that failed (its pods' usage then stays null)."""
        self._usage_failing = False

    @property
    def path(self) -> str:
        if self.config.namespace:
            return f"/api/v1/namespaces/{self.config.namespace}/pods"
        return "/api/v1/pods"

    def read(self) -> list[dict[str, Any]]:
        """PodStatus values for every selected pod; [] (logged, counted) when the API fails."""
        try:
            return self.fetch()
        except K8sApiError as exc:
            self.errors += 1
            log.warning("kubernetes pod list failed", extra={"url": exc.url, "status": exc.status})
            return []

    def fetch(self) -> list[dict[str, Any]]:
        """Like :meth:`read`, but raises :class:`K8sApiError` instead of returning []."""
        read_at = self._now()
        statuses = []
        for item in self._items():
            try:
                statuses.append(pod_status(item, read_at))
            except (KeyError, TypeError, ValueError) as exc:
                # One odd pod must not hide the others.
                self.errors += 1
                log.warning("skipping malformed pod", extra={"error": repr(exc)})
        if statuses and self.config.usage:
            usages = self._usages()
            for status in statuses:
                if (usage := usages.get((status["namespace"], status["pod"]))) is not None:
                    status["cpu_usage_cores"] = usage.cpu_cores
                    status["memory_usage_bytes"] = usage.memory_bytes
        return statuses

    def _usages(self) -> dict[tuple[str, str], PodUsage]:
        """The Metrics Server's pod usage; {} (logged when it starts failing, counted) when it fails."""
        headers = {"Accept": "application/json"}
        try:
            if token := self._token():
                headers["Authorization"] = f"Bearer {token}"
            usages = pod_usages(
                self._client, self.config.api_url, namespace=self.config.namespace, headers=headers
            )
        except (UsageApiError, K8sApiError) as exc:
            self.usage_errors += 1
            if not self._usage_failing:  # a cluster without a Metrics Server answers 404 every time
                log.warning(
                    "kubernetes pod usage (metrics.k8s.io) unavailable: usage fields stay null",
                    extra={"url": getattr(exc, "url", None), "status": getattr(exc, "status", None)},
                )
                self._usage_failing = True
            return {}
        if self._usage_failing:
            log.info("kubernetes pod usage (metrics.k8s.io) recovered")
            self._usage_failing = False
        return usages

    def _items(self) -> Iterator[Mapping[str, Any]]:
        params: dict[str, str | int] = {"limit": self.config.page_size}
        if self.config.node_name:
            params["fieldSelector"] = f"spec.nodeName={self.config.node_name}"
        headers = {"Accept": "application/json"}
        if token := self._token():
            headers["Authorization"] = f"Bearer {token}"
        url = self.config.api_url + self.path
        while True:
            try:
                response = self._client.get(url, params=params, headers=headers)
            except httpx.HTTPError as exc:
                raise K8sApiError(f"no answer: {type(exc).__name__}: {exc}", url=url) from exc
            if response.status_code != 200:
                raise K8sApiError(
                    f"HTTP {response.status_code}: {response.text[:200]}",
                    url=url,
                    status=response.status_code,
                )
            try:
                body = response.json()
                items, cont = body["items"], (body.get("metadata") or {}).get("continue")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise K8sApiError(f"not a PodList: {exc!r}", url=url, status=200) from exc
            yield from items or ()  # an empty list is JSON null in some API versions
            if not cont:
                return
            params["continue"] = cont

    def _token(self) -> str | None:
        try:
            return self.config.bearer_token()
        except OSError as exc:
            raise K8sApiError(f"cannot read token: {exc}", url=self.config.api_url) from exc

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


def _client_for(config: K8sConfig) -> httpx.Client:
    verify: bool | ssl.SSLContext = config.verify if isinstance(config.verify, bool) else True
    if isinstance(config.verify, Path):
        # A context, not a path: httpx deprecates verify=<str>.
        verify = ssl.create_default_context(cafile=str(config.verify))
    # trust_env=False: the API server (a cluster-internal address) must not be reached through a proxy
    # taken from HTTP(S)_PROXY.
    return httpx.Client(verify=verify, timeout=config.timeout_s, trust_env=False)


def pod_status(pod: Mapping[str, Any], read_at: datetime) -> dict[str, Any]:
    """One Kubernetes Pod object as a PodStatus value."""
    metadata, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    conditions = status.get("conditions") or ()
    # Init containers are left out, as in the containerStatuses the requirement names.
    containers = status.get("containerStatuses") or ()
    return {
        "time": read_at,
        "namespace": str(metadata["namespace"]),
        "pod": str(metadata["name"]),
        "host": spec.get("nodeName") or None,
        "phase": status.get("phase") or "Unknown",
        "ready": any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
        "restarts": sum(int(c.get("restartCount") or 0) for c in containers),
        "source": SOURCE,
        # From the Metrics Server when it reports the pod (PodReader.fetch); unknown until then.
        "cpu_usage_cores": None,
        "memory_usage_bytes": None,
    }
