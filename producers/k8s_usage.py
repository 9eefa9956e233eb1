"""Per-pod CPU and memory from the Kubernetes Metrics Server (seed §3.2): the ``metrics.k8s.io/v1beta1``
PodMetrics of every pod (or one namespace's), summed over each pod's containers, as the Metrics Server
reports them (the CPU rate over its window, in cores; the working set, in bytes). Quantities are parsed
as Kubernetes writes them (``250m``, ``1200n``, ``512Mi``, ``1048576Ki``, ``1e3``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

__all__ = ["PodUsage", "UsageApiError", "parse_quantity", "pod_usages", "usage_path"]

API = "/apis/metrics.k8s.io/v1beta1"

_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)")


class UsageApiError(RuntimeError):
    """The Metrics Server's answer could not be had or read (none installed: 404; not ready: 503)."""

    def __init__(self, reason: str, *, url: str, status: int | None = None) -> None:
        super().__init__(f"{reason} ({url})")
        self.reason, self.url, self.status = reason, url, status


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity as a number of base units (cores, bytes)."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number)
        return value * (Decimal(10) ** int(exponent[1:]) if exponent else _SUFFIXES[suffix or ""])
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"not a Kubernetes quantity: {text!r}") from exc


@dataclass(frozen=True)
class PodUsage:
    cpu_cores: float
    memory_bytes: int


def usage_path(namespace: str | None) -> str:
    return f"{API}/namespaces/{namespace}/pods" if namespace else f"{API}/pods"


def pod_usages(
    client: httpx.Client, api_url: str, *, namespace: str | None, headers: Mapping[str, str]
) -> dict[tuple[str, str], PodUsage]:
    """{(namespace, pod): usage} of every pod the Metrics Server reports. A pod whose entry cannot be read
    is left out (its PodStatus then carries null usage); an answer that is no PodMetricsList raises."""
    url = api_url + usage_path(namespace)
    try:
        response = client.get(url, headers=dict(headers))
    except httpx.HTTPError as exc:
        raise UsageApiError(f"no answer: {type(exc).__name__}: {exc}", url=url) from exc
    if response.status_code != 200:
        status = response.status_code
        raise UsageApiError(f"HTTP {status}: {response.text[:200]}", url=url, status=status)
    try:
        body = response.json()
        items = body["items"] or ()
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageApiError(f"not a PodMetricsList: {exc!r}", url=url, status=200) from exc
    usages: dict[tuple[str, str], PodUsage] = {}
    for item in items:
        try:
            key, usage = _pod(item)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # one odd entry must not hide the others' usage
        usages[key] = usage
    return usages


def _pod(item: Mapping[str, Any]) -> tuple[tuple[str, str], PodUsage]:
    metadata = item["metadata"]
    containers = item["containers"]
    if not containers:  # nothing measured yet (a pod just started): unknown, not 0
        raise ValueError("no containers")
    cpu, memory = Decimal(0), Decimal(0)
    for container in containers:
        usage = container["usage"]
        cpu += parse_quantity(str(usage["cpu"]))
        memory += parse_quantity(str(usage["memory"]))
    return (str(metadata["namespace"]), str(metadata["name"])), PodUsage(float(cpu), int(memory))
