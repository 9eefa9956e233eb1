"""The producers' settings beyond :class:`bus.settings.Settings`: the collectors' (`aima-metrics collect`
builds :class:`CollectorSettings` when it starts) and the job SDK's key (:class:`PseudonymSettings`,
built by the SDK's entry point when the caller passes no key: a job's process has no command of ours) and
the GPUs a job's process was given (:class:`JobGpuSettings`, read the same way)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from bus.settings import AimaSettings, described
from producers.gpu.collector import DEFAULT_EXPORTER_PORT
from producers.system import GROUPS, SystemIntervals

__all__ = ["CollectorSettings", "JobGpuSettings", "PseudonymSettings"]

_POSITIVE_S = {"gt": 0, "allow_inf_nan": False}


class CollectorSettings(AimaSettings):
    """The GPU and system collectors, Kubernetes pod status and the fleet simulator."""

    host: str | None = described(
        None,
        "host name the collectors report (the system collector falls back to AIMA_K8S_NODE_NAME)",
        shown="the machine's host name",
    )
    gpu_fast_interval_s: float = Field(10.0, **_POSITIVE_S, description="GPU utilisation and memory interval")
    gpu_slow_interval_s: float = Field(
        30.0, **_POSITIVE_S, description="GPU temperature, power, PCIe interval"
    )
    gpu_exporter_port: int = Field(
        DEFAULT_EXPORTER_PORT, description="Prometheus text of the current GPU values (`collect gpu`)"
    )

    dcgm_url: str | None = described(
        None,
        "dcgm-exporter endpoint `collect dcgm` reads (e.g. http://node:9400/metrics); `--url` wins over it",
        shown="none (`collect dcgm` then needs `--url`)",
    )
    dcgm_timeout_s: float = Field(5.0, **_POSITIVE_S, description="`collect dcgm`: time one read may take")
    dcgm_backoff_max_s: float = Field(
        60.0,
        **_POSITIVE_S,
        description="`collect dcgm`: longest wait between tries while the endpoint does not answer",
    )

    system_cpu_interval_s: float = Field(
        SystemIntervals.cpu_s, **_POSITIVE_S, description="host CPU interval"
    )
    system_memory_interval_s: float = Field(
        SystemIntervals.memory_s, **_POSITIVE_S, description="host memory interval"
    )
    system_disk_interval_s: float = Field(
        SystemIntervals.disk_s, **_POSITIVE_S, description="disk use interval"
    )
    system_network_interval_s: float = Field(
        SystemIntervals.network_s, **_POSITIVE_S, description="network rates interval"
    )
    system_containers_interval_s: float = Field(
        SystemIntervals.containers_s, **_POSITIVE_S, description="running containers interval"
    )
    system_pods_interval_s: float = Field(
        SystemIntervals.pods_s, **_POSITIVE_S, description="Kubernetes pod status interval"
    )

    k8s_api_url: str | None = described(
        None,
        "Kubernetes API to read pods from; wins over in-cluster detection (KUBERNETES_SERVICE_HOST/PORT and "
        "the service-account token)",
        shown="in-cluster detection",
    )
    k8s_token_file: Path | None = Field(None, description="bearer token file for AIMA_K8S_API_URL (re-read)")
    k8s_verify: str = Field(
        "true", description="TLS verification of AIMA_K8S_API_URL: true, false or a CA file"
    )
    k8s_namespace: str | None = Field(None, description="only this namespace's pods; unset: all namespaces")
    k8s_node_name: str | None = Field(
        None, description="only pods scheduled on this node (one collector per node)"
    )
    kubernetes_service_host: str | None = Field(
        None,
        validation_alias="KUBERNETES_SERVICE_HOST",
        description="set by Kubernetes in a pod: the API's host",
    )
    kubernetes_service_port: str | None = Field(
        None,
        validation_alias="KUBERNETES_SERVICE_PORT",
        description="set by Kubernetes in a pod: the API's port",
    )

    sim_rate_hz: float = Field(1.0, **_POSITIVE_S, description="simulated fleet: steps per second")
    sim_hosts: int = Field(2, ge=1, description="simulated fleet: hosts")
    sim_gpus_per_host: int = Field(4, ge=1, description="simulated fleet: GPUs per host")
    sim_seed: int = Field(1, description="simulated fleet: random seed")
    sim_faults_every_s: float | None = Field(
        None,
        **_POSITIVE_S,
        description="simulated fleet: inject a labelled fault (producers/faults.py) about this often, in "
        "event-time seconds, each logged as it starts; unset: none",
    )

    @field_validator("dcgm_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"an http:// or https:// URL is needed, got {url!r}")
        return url

    def system_intervals(self) -> SystemIntervals:
        return SystemIntervals(
            **{f"{group}_s": getattr(self, f"system_{group}_interval_s") for group in GROUPS}
        )


class PseudonymSettings(AimaSettings):
    """The job SDK's pseudonymisation key; there is deliberately no default (a key in the code would be a
    key everybody has)."""

    model_config = SettingsConfigDict(env_prefix="AIMA_PSEUDONYM_")

    key: SecretStr | None = described(
        None, "key for pseudonymising user ids (P1), at least 16 bytes", shown="required by the job SDK"
    )
    key_file: Path | None = Field(None, description="file holding the key, when AIMA_PSEUDONYM_KEY is unset")


class JobGpuSettings(AimaSettings):
    """The GPUs the job's process was given, as the container runtime and CUDA name them: the job SDK reports
    their UUIDs (JobEvent ``gpu_uuids``) so that each GPU's measured energy goes to the job's project. Only a
    list of whole-GPU UUIDs (``GPU-...``) counts: indices, ``all``, ``none`` or MIG instances (``MIG-...``,
    whose energy is counted on their physical GPU) say no GPU UUID."""

    nvidia_visible_devices: str | None = Field(
        None,
        validation_alias="NVIDIA_VISIBLE_DEVICES",
        description="set by the NVIDIA container runtime: the GPUs given to the job's container (the job SDK "
        "reports them as the job's GPUs when they are GPU UUIDs)",
    )
    cuda_visible_devices: str | None = Field(
        None,
        validation_alias="CUDA_VISIBLE_DEVICES",
        description="the GPUs CUDA shows the job's process; read by the job SDK when NVIDIA_VISIBLE_DEVICES "
        "names no GPU UUIDs",
    )

    def gpu_uuids(self) -> list[str] | None:
        """The GPU UUIDs of NVIDIA_VISIBLE_DEVICES, else of CUDA_VISIBLE_DEVICES; None when neither names
        whole GPUs by UUID."""
        for value in (self.nvidia_visible_devices, self.cuda_visible_devices):
            uuids = parse_gpu_uuids(value)
            if uuids is not None:
                return uuids
        return None


def parse_gpu_uuids(value: str | None) -> list[str] | None:
    """``GPU-a,GPU-b`` as a list of UUIDs; None for anything else (unset, indices, all, MIG instances)."""
    if value is None:
        return None
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries or not all(entry.startswith("GPU-") for entry in entries):
        return None
    return list(dict.fromkeys(entries))
